"""Timestep respacing (sampling with fewer steps) and DiT's ``create_diffusion`` factory.

A respaced diffusion keeps a subset S of the original timesteps and uses the betas that make its
alpha_bar equal the original alpha_bar on S; the network still receives original timesteps.
"""
from __future__ import annotations

import operator
from typing import Iterable, Sequence

import torch

from .gaussian import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, get_named_beta_schedule


#################################################################################
#                               Timestep spacing                                #
#################################################################################

def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """Sorted original timesteps to keep (ADM's semantics).

    section_counts:
      * "ddimN": the largest integer stride giving exactly N steps, range(0, T, stride);
      * "a,b,c" or [a, b, c]: split [0, T) into equal sections (the first T % k one longer) and take a,
        b, c evenly spaced steps (rounded) in each, both ends included (0 skips a section);
      * an int N or "N": one section of N steps.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired = int(section_counts[len("ddim"):])
            except ValueError:
                raise ValueError(f"timestep_respacing {section_counts!r} is not 'ddimN' (N an integer)") from None
            for stride in range(1, num_timesteps + 1):  # (+ 1: "ddim1" is the single step [0], as "1")
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride from {num_timesteps}")
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"timestep_respacing {section_counts!r} is not 'ddimN' or comma-separated ints") from None
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    try:
        section_counts = [operator.index(c) for c in section_counts]  # ints (numpy's too), not floats
    except TypeError:
        raise ValueError(f"timestep_respacing must be 'ddimN', 'a,b,c', an int or a list of ints; "
                         f"got {section_counts!r}") from None
    if not section_counts:
        raise ValueError("section_counts is empty")

    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count < 0 or size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        # (count 0 skips the section, as ADM: e.g. "10,0,5")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the float stride and round each point, exactly as ADM does (ties to even).
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    if not steps:
        raise ValueError(f"section_counts {section_counts} keep no timestep")
    return sorted(set(steps))


#################################################################################
#                              Respaced diffusion                               #
#################################################################################

class SpacedDiffusion(GaussianDiffusion):
    """GaussianDiffusion restricted to `use_timesteps` of the diffusion defined by `betas`."""

    def __init__(self, use_timesteps: Iterable[int], betas, **kwargs):
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        keep = sorted(set(int(i) for i in use_timesteps))
        if not keep or keep[0] < 0 or keep[-1] >= betas.numel():
            raise ValueError(f"use_timesteps must be a non-empty subset of 0..{betas.numel() - 1}")
        self.original_num_steps = betas.numel()
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).tolist()
        new_betas, last = [], 1.0
        for i in keep:
            new_betas.append(1.0 - alphas_cumprod[i] / last)
            last = alphas_cumprod[i]
        super().__init__(torch.tensor(new_betas, dtype=torch.float64), timestep_map=keep, **kwargs)


def create_diffusion(timestep_respacing: str | int | Sequence[int] | None = "", noise_schedule: str = "linear",
                     use_kl: bool = False, sigma_small: bool = False, predict_xstart: bool = False,
                     learn_sigma: bool = True, rescale_learned_sigmas: bool = False, diffusion_steps: int = 1000,
                     predict_v: bool = False, coefficient_dtype: torch.dtype = torch.float32) -> SpacedDiffusion:
    """DiT's factory with its defaults: linear schedule, eps prediction, learned-range sigma, MSE + raw VLB.

    timestep_respacing: "" or None for all `diffusion_steps`, else see `space_timesteps` ("250", "ddim50").
    """
    if predict_xstart and predict_v:
        raise ValueError("predict_xstart and predict_v are exclusive")
    if isinstance(diffusion_steps, bool) or not isinstance(diffusion_steps, int) or diffusion_steps < 1:
        raise ValueError(f"diffusion_steps must be an integer >= 1 (got {diffusion_steps!r})")
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    mean_type = (ModelMeanType.START_X if predict_xstart else
                 ModelMeanType.VELOCITY if predict_v else ModelMeanType.EPSILON)
    var_type = (ModelVarType.LEARNED_RANGE if learn_sigma else
                ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE)
    return SpacedDiffusion(space_timesteps(diffusion_steps, timestep_respacing), betas,
                           model_mean_type=mean_type, model_var_type=var_type, loss_type=loss_type,
                           coefficient_dtype=coefficient_dtype)
