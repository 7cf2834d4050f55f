"""The training objectives against the official references' numbers (fixtures made by running
DiT/MDT/MaskDiT/REPA loss code on analytic models with stored draws), and the draw order."""
import json
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from masked_dit.configs import get_preset
from masked_dit.diffusion.objectives import (ADMObjective, EDMMaskDiTObjective, MDTv2Objective, REPAObjective,
                                             TransportObjective, build_objective, loss_passes)
from masked_dit.diffusion.ode import sample_ode
from masked_dit.diffusion.respace import create_diffusion
from masked_dit.diffusion.sde import sample_sde
from masked_dit.models import build_model


def _fixture(fixtures_dir: Path, name: str) -> dict:
    return load_file(str(fixtures_dir / "diffusion" / f"{name}.safetensors"))


class AnalyticADM(nn.Module):
    """The fixtures' ADM model: eps = 0.3x + 0.1 sin(3x) + 0.001 t, var = 0.9 tanh(x); ignores masks.
    It has no ``family``: it stands in for DiT and MDTv2 alike."""
    learn_sigma, in_channels, num_classes, num_patches = True, 4, 10, 4

    def forward(self, x, t, y, ids_keep=None, ids_restore=None):
        tt = t.to(x.dtype).view(-1, 1, 1, 1)
        return torch.cat([0.3 * x + 0.1 * torch.sin(3 * x) + 0.001 * tt, 0.9 * torch.tanh(x)], dim=1)


def test_adm_objective_matches_dit(fixtures_dir):
    f = _fixture(fixtures_dir, "adm_training_losses")
    obj = ADMObjective()
    batch = {"x": f["x_start"], "y": torch.zeros(3, dtype=torch.long)}
    out = obj(AnalyticADM(), batch, t=f["t"], noise=f["noise"])
    torch.testing.assert_close(out["loss"], f["loss"].mean(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out["vb"], f["vb"].mean(), rtol=1e-6, atol=1e-9)


def test_mdtv2_objective_two_passes_with_min_snr(fixtures_dir):
    f = _fixture(fixtures_dir, "mdt_minsnr_losses")
    obj = MDTv2Objective()
    batch = {"x": f["x_start"], "y": torch.zeros(3, dtype=torch.long)}
    ids_keep = torch.tensor([[0, 2], [1, 3], [3, 0]])
    out = obj(AnalyticADM(), batch, t=f["t"], noise=f["noise"], ids_keep=ids_keep)
    # the analytic model ignores the mask, so each pass reproduces MDT's per-sample loss
    torch.testing.assert_close(out["loss_full"], f["loss"].mean(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out["loss_masked"], f["loss"].mean(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out["loss"], 2 * f["loss"].mean(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out["mse"], 2 * f["mse"].mean(), rtol=1e-6, atol=1e-9)


def test_mdtv2_passes_share_t_but_draw_their_own_noise():
    """As MDT's train_util (training_losses called twice with noise=None): same t, independent noise.
    Each pass's x_t is q_sample(x, t, eps) with an eps of its own."""
    seen = []

    class Recorder(AnalyticADM):
        def forward(self, x, t, y, ids_keep=None, ids_restore=None):
            seen.append((x.clone(), t.clone(), ids_keep))
            return super().forward(x, t, y)

    torch.manual_seed(0)
    x = torch.randn(2, 4, 4, 4)
    obj = MDTv2Objective()
    obj(Recorder(), {"x": x, "y": torch.zeros(2, dtype=torch.long)})
    # one model call per pass: full (no mask) then masked, on the same t and different x_t
    (x_full, t_full, keep_full), (x_mask, t_mask, keep_mask) = seen
    assert torch.equal(t_full, t_mask) and not torch.allclose(x_full, x_mask)
    ab = obj.diffusion.alphas_cumprod[t_full].view(-1, 1, 1, 1).float()
    eps_full, eps_mask = ((xt - ab.sqrt() * x) / (1 - ab).sqrt() for xt in (x_full, x_mask))
    assert not torch.allclose(eps_full, eps_mask, atol=1e-3)
    assert keep_full is None and keep_mask.shape[0] == 2
    assert keep_mask.shape[1] in (2, 3)  # int(4 (1 - r)) with r = 0.3 + 0.2 U(0, 1)


class AnalyticEDM(nn.Module):
    """The fixture's denoiser D(x; sigma) = x / (1 + sigma^2) + 0.1 sin(x)."""
    num_classes, class_dropout_prob, family = 10, 0.0, "maskdit"

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.num_patches, self.model.patch_size = 16, 2

    def forward(self, x, sigma, labels=None, ids_keep=None, ids_restore=None):
        s = sigma.view(-1, 1, 1, 1)
        return x / (1 + s ** 2) + 0.1 * torch.sin(x)


@pytest.mark.parametrize("mask_ratio, mae, key", [(0.0, 0.0, "loss_plain"), (0.5, 0.0, "loss_masked"),
                                                  (0.5, 0.1, "loss_masked_mae")])
def test_maskdit_objective_matches_reference(fixtures_dir, mask_ratio, mae, key):
    f = _fixture(fixtures_dir, "edm_maskdit_loss")
    obj = EDMMaskDiTObjective(mask_ratio=mask_ratio, mae_loss_coef=mae)
    batch = {"x": f["images"], "y": torch.zeros(3, dtype=torch.long)}
    ids_keep = None
    if mask_ratio > 0:
        ids_keep = torch.stack([torch.nonzero(row == 0).flatten() for row in f["mask"]])
    out = obj(AnalyticEDM(), batch, rnd_normal=f["rnd_normal"].flatten(), noise=f["noise_unit"], ids_keep=ids_keep)
    torch.testing.assert_close(out["loss"], f[key].mean(), rtol=1e-6, atol=1e-9)


class AnalyticREPA(nn.Module):
    num_classes, family = 1000, "repa_sit"

    def __init__(self, projs):
        super().__init__()
        self.projs = projs

    def forward(self, x, t, y):
        tt = t.view(-1, 1, 1, 1).to(x.dtype)
        cond = torch.where(y < 1000, 0.05 * (y.to(x.dtype) - 3), torch.full_like(y, -0.3, dtype=x.dtype))
        v = 0.4 * x - 0.2 * tt + cond.view(-1, 1, 1, 1)
        return v, [torch.tanh(p * (1 + t.view(-1, 1, 1).to(x.dtype))) for p in self.projs]


def test_repa_objective_matches_reference(fixtures_dir):
    f = _fixture(fixtures_dir, "repa_loss")
    obj = REPAObjective(proj_coeff=0.5)
    batch = {"x": f["images"], "y": f["y"], "zs": [f["zs.0"], f["zs.1"]]}
    out = obj(AnalyticREPA([f["proj.0"], f["proj.1"]]), batch, t=f["time_input"], noise=f["noises"])
    torch.testing.assert_close(out["denoising_loss"], f["denoising_loss"].mean(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out["proj_loss"], f["proj_loss"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(out["loss"], f["denoising_loss"].mean() + 0.5 * f["proj_loss"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("path_type, weighting", [("Linear", "uniform"), ("GVP", "lognormal")])
def test_repa_config_path_and_weighting_reach_the_loss(path_type, weighting):
    """REPA's --path-type cosine and --weighting lognormal (config: --objective.path_type=GVP,
    --objective.weighting=lognormal) used to be dropped: a config always trained linear + uniform."""
    from masked_dit.configs import ObjectiveConfig
    from masked_dit.diffusion.repa import repa_training_losses

    obj = build_objective(ObjectiveConfig(kind="repa", path_type=path_type, weighting=weighting))
    assert (obj.path_type, obj.weighting) == ({"Linear": "linear", "GVP": "cosine"}[path_type], weighting)
    g = torch.Generator().manual_seed(0)
    x, zs = torch.randn(4, 4, 4, 4, generator=g), [torch.randn(4, 4, 8, generator=g)]
    model = AnalyticREPA([torch.randn(4, 4, 8, generator=g)])
    batch = {"x": x, "y": torch.tensor([1, 2, 3, 1000]), "zs": zs}
    torch.manual_seed(1)
    out = obj(model, batch)
    torch.manual_seed(1)
    ref = repa_training_losses(model, x, zs, model_kwargs={"y": batch["y"]}, path_type=obj.path_type,
                               weighting=weighting, proj_coeff=0.5)
    assert torch.equal(out["loss"], ref["loss"])
    with pytest.raises(ValueError, match="REPA's paths are Linear"):
        build_objective(ObjectiveConfig(kind="repa", path_type="VP"))


def test_repa_needs_features():
    with pytest.raises(ValueError, match="put them in the batch as 'zs'"):
        REPAObjective()(AnalyticREPA([]), {"x": torch.zeros(1, 4, 4, 4), "y": torch.zeros(1, dtype=torch.long)})


def test_transport_objective_is_sit_loss():
    class Lin(nn.Module):
        def forward(self, x, t, y):
            return 0.5 * x - 0.25 * t.view(-1, 1, 1, 1)
    obj = TransportObjective()
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    torch.manual_seed(5)
    out = obj(Lin(), {"x": x, "y": torch.zeros(4, dtype=torch.long)})
    torch.manual_seed(5)
    ref = obj.transport.training_losses(Lin(), x, model_kwargs={"y": None})["loss"].mean()
    torch.testing.assert_close(out["loss"], ref)


def test_build_objective_checks_family():
    from masked_dit.models import build_model
    model = build_model("DiT-S/4", input_size=16, in_channels=1, num_classes=10)
    with pytest.raises(ValueError, match="trains maskdit models, not 'dit'"):
        build_objective(get_preset("digits-maskdit").objective, model)
    assert isinstance(build_objective(get_preset("digits-dit").objective, model), ADMObjective)
    assert json.dumps(create_diffusion("").num_timesteps) == "1000"


@pytest.mark.parametrize("obj, name", [(ADMObjective(), "SiT-S/4"), (MDTv2Objective(), "DiT-S/4"),
                                       (TransportObjective(), "MaskDiT-S/4"), (EDMMaskDiTObjective(), "SiT-S/4"),
                                       (REPAObjective(), "DiT-S/4")])
def test_objective_called_on_another_family_names_it(obj, name):
    # Called directly (not through build_objective), these failed deep inside: an AttributeError
    # (num_patches, class_dropout_prob), a shape mismatch or an unexpected keyword.
    model = build_model(name, input_size=8, in_channels=4, num_classes=10)
    batch = {"x": torch.randn(2, 4, 8, 8), "y": torch.tensor([1, 2])}
    with pytest.raises(ValueError, match=f"objective '{obj.kind}' trains .* models, not '{model.family}'"):
        obj(model, batch)
    with pytest.raises(ValueError, match=f"objective '{obj.kind}' trains .* models, not '{model.family}'"):
        obj.sample(model, torch.randn(2, 4, 8, 8), batch["y"], steps=2)


@pytest.mark.parametrize("cls", [ADMObjective, MDTv2Objective, TransportObjective, EDMMaskDiTObjective, REPAObjective])
def test_sample_refuses_a_sampler_of_another_objective_with_its_own_list(cls):
    """``sample`` and the trainer's up-front check (``SAMPLERS``) read the same per-class list."""
    from masked_dit.diffusion.objectives import FAMILIES, SAMPLERS

    assert set(SAMPLERS) == set(FAMILIES) and SAMPLERS[cls.kind] == cls.samplers
    objective = cls.__new__(cls)  # the check comes before anything the constructor sets up
    with pytest.raises(ValueError, match=r"^sampler 'bogus' does not apply to .*; valid: " + ", ".join(cls.samplers)):
        objective.sample(nn.Identity(), torch.zeros(1, 4, 8, 8), torch.zeros(1, dtype=torch.long), sampler="bogus")


@pytest.mark.parametrize("sampler,options,call", [
    ("ode", {"ode_method": "midpoint", "atol": 1e-5, "rtol": 1e-4},
     lambda t, f, x, kw: sample_ode(t, f, x, method="midpoint", num_steps=6, atol=1e-5, rtol=1e-4, **kw)),
    ("ode", {}, lambda t, f, x, kw: sample_ode(t, f, x, method="dopri5", num_steps=6, **kw)),
    ("heun", {"ode_method": "rk4"}, lambda t, f, x, kw: sample_ode(t, f, x, method="heun", num_steps=6, **kw)),
    ("sde", {"sde_method": "Heun", "diffusion_form": "SBDM", "diffusion_norm": 0.5, "last_step": "Tweedie",
             "last_step_size": 0.1},
     lambda t, f, x, kw: sample_sde(t, f, x, method="Heun", diffusion_form="SBDM", diffusion_norm=0.5,
                                    last_step="Tweedie", last_step_size=0.1, num_steps=6,
                                    generator=torch.Generator().manual_seed(3), **kw)),
])
def test_transport_sample_passes_sits_sampler_options(sampler, options, call):
    """SiT's sample.py knobs (configs.SIT_SAMPLE_KEYS) reach the ODE / SDE samplers; SiT's defaults otherwise."""
    class Curved(nn.Module):
        num_classes = 10

        def forward(self, x, t, y):
            return torch.tanh(x) * (1 + t.view(-1, 1, 1, 1)) - 0.3 * x

    obj, model = TransportObjective("GVP", "velocity"), Curved()
    noise, y = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1)), torch.zeros(2, dtype=torch.long)
    out = obj.sample(model, noise, y, sampler=sampler, steps=6, generator=torch.Generator().manual_seed(3), **options)
    ref = call(obj.transport, model, noise, {"model_kwargs": {"y": y}})
    assert torch.equal(out, ref)


@pytest.mark.parametrize("cls", [ADMObjective, MDTv2Objective])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_adm_sample_passes_ddim_eta(cls, eta):
    """``eta`` reaches ADM's DDIM loop (the family's respacing, the objective's guidance); 0 is the
    deterministic default, and a stochastic eta draws its step noise from ``generator``."""
    obj, model = cls(diffusion_steps=100), AnalyticADM()
    noise, y = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 7])
    out = obj.sample(model, noise, y, sampler="ddim", steps=10, cfg_scale=1.5, eta=eta,
                     generator=torch.Generator().manual_seed(3))
    respaced = create_diffusion("ddim10" if cls is ADMObjective else "10", "linear", learn_sigma=True,
                                diffusion_steps=100)
    ref = respaced.ddim_sample_loop(obj._guided(model, 1.5), tuple(noise.shape), noise=noise, clip_denoised=False,
                                    model_kwargs={"y": y}, generator=torch.Generator().manual_seed(3), eta=eta)
    assert torch.equal(out, ref)
    deterministic = obj.sample(model, noise, y, sampler="ddim", steps=10, cfg_scale=1.5)
    assert torch.equal(out, deterministic) == (eta == 0.0)


@pytest.mark.parametrize("cls, steps, first", [(ADMObjective, 50, 980), (ADMObjective, 250, 996),
                                                (MDTv2Objective, 50, 999), (MDTv2Objective, 250, 999),
                                                (MDTv2Objective, 300, 999)])
def test_ddim_grid_is_the_familys(cls, steps, first):
    """MDT's image_sample.py --use_ddim keeps its DDPM respacing (str(N): N evenly rounded steps from
    t = 999, any N); DiT has no DDIM script, so ADM's "ddimN" stride (from t = 1000 - 1000/N) stays."""
    seen = []

    class Spy(AnalyticADM):
        def forward(self, x, t, y, **kw):
            seen.append(int(t[0]))
            return super().forward(x, t, y)

    cls().sample(Spy(), torch.randn(1, 4, 4, 4), torch.tensor([3]), sampler="ddim", steps=steps)
    assert len(seen) == steps and seen[0] == first and seen[-1] == 0
    even = [round(i * 999 / (steps - 1)) for i in range(steps)]  # space_timesteps' rounding, one section
    assert seen[::-1] == (even if cls is MDTv2Objective else list(range(0, 1000, 1000 // steps)))


def test_adm_sample_refuses_an_eta_it_would_ignore_or_cannot_use():
    obj, model = ADMObjective(diffusion_steps=100), AnalyticADM()
    noise, y = torch.randn(1, 4, 4, 4), torch.tensor([3])
    with pytest.raises(ValueError, match=r"^eta is read by the ddim sampler only \(this run samples with ddpm\)$"):
        obj.sample(model, noise, y, sampler="ddpm", steps=10, eta=0.5)
    for eta in (-0.1, 1.5, float("nan")):  # past 1, sqrt(1 - abar_prev - sigma^2) can be NaN
        with pytest.raises(ValueError, match=r"^eta=.* must be a number in \[0, 1\] \(0: deterministic DDIM"):
            obj.sample(model, noise, y, sampler="ddim", steps=10, eta=eta)


def test_check_sit_sampling_names_the_option():
    from masked_dit.configs import SIT_SAMPLE_KEYS, SampleConfig
    from masked_dit.diffusion.sample_settings import check_sit_sampling

    oc = get_preset("digits-sit").objective
    good = {k: getattr(SampleConfig, k) for k in SIT_SAMPLE_KEYS}
    for sampler in ("ode", "sde", "euler", "heun", "auto"):
        check_sit_sampling(oc, sampler, good, lambda k: k)
    bad = [({"rtol": float("nan")}, "ode", r"^rtol must be a finite number > 0 \(got nan\)$"),
           ({"diffusion_norm": -1.0}, "sde", r"^diffusion_norm must be a finite number >= 0"),
           ({"last_step_size": 1.0}, "sde", r"^last_step_size must be a finite number in \[0, 1\)"),
           ({"sde_method": "euler"}, "sde", r"^sde_method is not valid; choose one of: Euler, Heun$"),
           ({"last_step": "mean"}, "sde", r"^last_step is not valid; choose one of: Mean, Tweedie, Euler, None$"),
           ({"ode_method": "rk45"}, "ode", r"^ode_method: unknown ODE method 'rk45'"),
           ({"sde_method": "Heun", "last_step": None}, "sde", r"^sde_method: sample_sde: method='Heun'")]
    for change, sampler, message in bad:
        with pytest.raises(ValueError, match=message):
            check_sit_sampling(oc, sampler, {**good, **change}, lambda k: k)


class LabelledEDM(nn.Module):
    """A denoiser with one-hot labels (MaskDiT's interface) for the sampler options' plumbing."""
    num_classes, family, class_dropout_prob = 10, "maskdit", 0.1

    def forward(self, x, sigma, labels=None):
        s = sigma.view(-1, 1, 1, 1).to(x.dtype)
        return x / (1 + s ** 2) + 0.1 * torch.sin(x) * s / (1 + s) + 0.05 * labels.argmax(1).view(-1, 1, 1, 1)


@pytest.mark.parametrize("sampler,options", [
    ("heun", {}),
    ("auto", {"S_churn": 20.0, "S_min": 0.1, "S_max": 10.0, "S_noise": 1.01}),
    ("euler", {"sigma_min": 0.01, "sigma_max": 20.0, "rho": 3.0}),
    ("heun", {"discretization": "vp", "schedule": "vp", "scaling": "vp"}),
    ("heun", {"discretization": "iddpm", "schedule": "ve", "scaling": "none", "S_churn": 5.0}),
])
def test_maskdit_sample_passes_edm_sampler_options(sampler, options):
    """MaskDiT's sample.py knobs (configs.EDM_SAMPLE_KEYS) reach EDM's sampler; ``euler`` is its solver."""
    from masked_dit.diffusion.edm_sampling import edm_sampler

    obj, model = EDMMaskDiTObjective(), LabelledEDM()
    noise, y = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 7])
    out = obj.sample(model, noise, y, sampler=sampler, steps=6, cfg_scale=1.5,
                     generator=torch.Generator().manual_seed(3), **options)
    ref = edm_sampler(model, noise, torch.eye(10)[y], num_steps=6, solver="euler" if sampler == "euler" else "heun",
                      cfg_scale=1.5, generator=torch.Generator().manual_seed(3), **options).float()
    assert torch.equal(out, ref)


def test_check_edm_sampling_names_the_option():
    from masked_dit.configs import EDM_SAMPLE_KEYS, SampleConfig
    from masked_dit.diffusion.sample_settings import check_edm_sampling

    good = {k: getattr(SampleConfig, k) for k in EDM_SAMPLE_KEYS}
    check_edm_sampling(good, 40, lambda k: k)
    check_edm_sampling({**good, "S_churn": 40.0, "S_min": 0.05, "S_max": 50.0, "discretization": "iddpm"}, 18,
                       lambda k: k)
    bad = [({"S_churn": -1.0}, r"^S_churn must be a finite number >= 0 \(got -1.0\)$"),
           ({"S_noise": float("nan")}, r"^S_noise must be a finite number >= 0"),
           ({"S_max": float("nan")}, r"^S_max must be a number >= 0 \(inf: no upper bound\)"),
           ({"S_min": 2.0, "S_max": 1.0}, r"^S_min must be <= S_max"),
           ({"sigma_min": float("inf")}, r"^sigma_min must be a finite number > 0"),
           ({"sigma_min": 3.0, "sigma_max": 2.0}, r"^sigma_min must be <= sigma_max$"),
           ({"sigma_min": 100.0}, r"^sigma_min: need 0 < sigma_min <= sigma_max"),
           ({"rho": 0.0}, r"^rho must be a finite number > 0"),
           ({"scaling": "ve"}, r"^scaling is not valid; choose one of: none, vp$"),
           ({"schedule": "vp", "discretization": "vp", "sigma_min": 5.0, "sigma_max": 10.0},
            r"^discretization: the vp discretization cannot span sigma_min=5.0 .. sigma_max=10.0: its sigma\(t\) "
            r"peaks above sigma_max inside \[epsilon_s, 1\] \(beta_d = -6513\); lower sigma_min or raise sigma_max$"),
           ({"discretization": "iddpm", "sigma_min": 1e6, "sigma_max": 2e6},
            r"^discretization: the iddpm discretization has no noise level")]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            check_edm_sampling({**good, **change}, 40, lambda k: k)


def test_maskdit_mask_ratio_schedule_follows_the_progress():
    """MaskDiT's cosine4 fine-tune: the kept patches follow ratio(progress); at the end (no patch removed)
    the step is the plain EDM loss, as a ratio-0 objective's with the same draws."""
    obj = EDMMaskDiTObjective(mask_ratio=0.5, mae_loss_coef=0.1, mask_ratio_fn="cosine4")
    seen = []

    class Net(AnalyticEDM):
        def forward(self, x, sigma, labels=None, ids_keep=None, ids_restore=None):
            seen.append(None if ids_keep is None else ids_keep.shape[1])
            return super().forward(x, sigma, labels)

    batch = {"x": torch.randn(2, 4, 8, 8), "y": torch.zeros(2, dtype=torch.long)}
    for progress, kept in ((0.0, 8), (0.5, 14), (1.0, None)):  # 16 patches; ratio 0.5, 0.125, 0
        obj.progress = progress
        out = obj(Net(), batch, rnd_normal=torch.zeros(2), noise=torch.ones(2, 4, 8, 8))
        assert seen[-1] == kept and out["mask_ratio"].item() == pytest.approx(obj.current_mask_ratio())
        assert ("mae" in out) == (kept is not None)
    plain = EDMMaskDiTObjective(mask_ratio=0.0)(Net(), batch, rnd_normal=torch.zeros(2), noise=torch.ones(2, 4, 8, 8))
    assert torch.equal(out["loss"], plain["loss"])
    with pytest.raises(ValueError, match="unknown mask ratio schedule"):
        EDMMaskDiTObjective(mask_ratio_fn="cos4")


def test_maskdit_step_without_masking_keeps_the_mask_token_under_ddp(tmp_path):
    """A scheduled ratio that removes no patch (cosine / linear to 0) leaves the mask token out of the
    graph: DDP then failed the next step ("Expected to have finished reduction in the prior iteration").
    The objective gives it a zero gradient under DDP; the loss value is unchanged."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from masked_dit.models import build

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = build("maskdit", input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=10,
                    decoder_hidden_size=32, decoder_depth=1, decoder_num_heads=2)
        ddp = DistributedDataParallel(net, broadcast_buffers=False)
        objective = EDMMaskDiTObjective(mask_ratio=0.5, mask_ratio_fn="linear", mask_ratio_min=0.0)
        batch = {"x": torch.randn(2, 4, 8, 8), "y": torch.tensor([1, 2])}
        for progress in (0.0, 1.0, 0.0, 0.0):
            objective.progress = progress
            torch.manual_seed(1)
            loss = objective(ddp, batch)["loss"]
            torch.manual_seed(1)
            assert torch.equal(loss, objective(net, batch)["loss"])  # no wrapper: no extra term
            loss.backward()
            if objective.current_mask_ratio() == 0:
                assert torch.equal(net.model.mask_token.grad, torch.zeros_like(net.model.mask_token))
            net.zero_grad(set_to_none=True)
    finally:
        dist.destroy_process_group()


def _saved_peak_and_grads(step):
    """Peak bytes saved for backward and alive at once during ``step()``, and the gradients it left."""
    torch.manual_seed(0)
    model = build_model("MDTv2-S/2", input_size=8, in_channels=4, num_classes=10, depth=4, hidden_size=64, num_heads=4)
    torch.manual_seed(1)
    batch = {"x": torch.randn(8, 4, 8, 8), "y": torch.arange(8) % 10}
    live, peak = {}, [0]  # storage -> (bytes, weak references to the saved tensors viewing it)

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            key = t.untyped_storage().data_ptr()
            nbytes, refs = live.setdefault(key, (t.untyped_storage().nbytes(), []))
            refs.append(weakref.ref(t))
            peak[0] = max(peak[0], sum(n for n, _ in live.values()))
        return t

    def unpack(t):
        return t

    def forget_freed():  # storages whose saved tensors backward has freed leave the count
        for key in [k for k, (_, refs) in live.items() if all(r() is None for r in refs)]:
            del live[key]
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        step(model, batch, forget_freed)
    return peak[0], {n: p.grad for n, p in model.named_parameters()}


def test_mdtv2_passes_backpropagated_one_by_one_hold_one_graph_and_give_the_same_gradients():
    """The trainer backpropagates the full pass before the masked one runs: the peak of activations
    saved for backward drops to about one pass's (both graphs were alive at once, 1.9x), and the fp32
    gradients are bit-identical to one backward of the summed loss."""
    objective = MDTv2Objective()

    def together(model, batch, forget):
        torch.manual_seed(2)
        objective(model, batch)["loss"].backward()

    def one_by_one(model, batch, forget):
        torch.manual_seed(2)
        for terms in loss_passes(objective, model, batch):
            terms["loss"].backward()
            del terms
            forget()
    peak_both, grads_both = _saved_peak_and_grads(together)
    peak_one, grads_one = _saved_peak_and_grads(one_by_one)
    # measured 0.64 at this toy size (the image-sized loss tensors weigh more than at real sizes); 1.0 before
    assert peak_one < 0.7 * peak_both, (peak_one, peak_both)
    assert {n for n, g in grads_both.items() if g is None} == {n for n, g in grads_one.items() if g is None}
    for name, g in grads_both.items():
        assert g is None or torch.equal(g, grads_one[name]), name


def test_model_cast_to_bf16_samples_and_trains_from_float32_state():
    """The samplers and losses keep x_t in float32; a model cast to bf16 (``model.to(torch.bfloat16)``,
    for speed) takes it in its own dtype, as it takes its timestep frequencies, and gives what the
    float32 model gives to bf16 rounding."""
    from masked_dit.diffusion.transport import create_transport

    kw = dict(input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([1, 2])
    for name in ("DiT-S/2", "SiT-S/2", "MDTv2-S/2"):
        model = build_model(name, **kw, **({"decode_layer": 0} if name.startswith("MDT") else {})).eval()
        ref = model(z, torch.tensor([5.0, 5.0]), y)
        low = model.to(torch.bfloat16)(z, torch.tensor([5.0, 5.0]), y)
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)
    dit = build_model("DiT-S/2", **kw).eval().to(torch.bfloat16)
    assert create_diffusion("4").p_sample_loop(dit, z.shape, z, model_kwargs={"y": y}).isfinite().all()
    assert ADMObjective()(dit, {"x": z, "y": y})["loss"].isfinite()
    sit = build_model("SiT-S/2", **kw).eval().to(torch.bfloat16)
    out = sample_ode(create_transport(), sit, z, method="euler", num_steps=3, model_kwargs={"y": y})
    assert out.dtype == torch.float32 and out.isfinite().all()
    assert TransportObjective()(sit, {"x": z, "y": y})["loss"].isfinite()


def test_sample_refuses_options_it_does_not_read():
    """Were silently dropped: a misspelt option, or another family's (EDM's S_churn to SiT); the shared
    guidance keys, which the trainer and the CLI pass to every objective, stay accepted."""
    model, noise, y = nn.Identity(), torch.zeros(1, 4, 8, 8), torch.zeros(1, dtype=torch.long)
    with pytest.raises(TypeError, match=r"^ADMObjective.sample\(\) got options it does not read: cfg_scal$"):
        ADMObjective().sample(model, noise, y, cfg_scal=4.0)
    with pytest.raises(TypeError, match=r"^TransportObjective.sample\(\) got options it does not read: S_churn, eta$"):
        TransportObjective().sample(model, noise, y, S_churn=40.0, eta=1.0)
    with pytest.raises(TypeError, match=r"^EDMMaskDiTObjective.sample\(\) got options it does not read: ode_method$"):
        EDMMaskDiTObjective().sample(model, noise, y, ode_method="euler")
    with pytest.raises(TypeError, match=r"^REPAObjective.sample\(\) got options it does not read: eta$"):
        REPAObjective().sample(model, noise, y, eta=0.5)


def test_losses_name_bad_timesteps():
    """Were a bare IndexError (t = 1000), silently the last step (t = -1), or an alpha of 2 (SiT t = 2)."""
    from masked_dit.diffusion.transport import create_transport

    diffusion, x = create_diffusion("", learn_sigma=False), torch.randn(2, 4, 2, 2)
    model = lambda x, t, **kw: x  # noqa: E731
    for t, match in [(torch.tensor([0, 1000]), r"must be in \[0, 999\] \(got min 0, max 1000\)"),
                     (torch.tensor([-1, 5]), r"must be in \[0, 999\] \(got min -1, max 5\)"),
                     (torch.tensor([1.0, 5.0]), r"integer timestep indices in \[0, 1000\), got torch.float32"),
                     ([1, 5], r"must be a \[2\] tensor of timestep indices, got list")]:
        with pytest.raises(ValueError, match=match):
            diffusion.training_losses(model, x, t=t)
    assert diffusion.training_losses(model, x, t=torch.tensor([0, 999]))["loss"].shape == (2,)
    with pytest.raises(ValueError, match=r"times t must be in \[0, 1\] \(got min 0.5, max 2.0\)"):
        create_transport().training_losses(model, x, t=torch.tensor([0.5, 2.0]))


def test_sampler_settings_that_divided_by_zero_or_flipped_a_sign_are_named():
    """Were a ZeroDivisionError (rho 0, zero diffusion steps) or accepted (DDIM eta < 0)."""
    from masked_dit.diffusion.edm_sampling import karras_sigmas

    with pytest.raises(ValueError, match=r"^rho must be a finite number > 0 \(EDM: 7\), got 0$"):
        karras_sigmas(4, rho=0)
    with pytest.raises(ValueError, match=r"^diffusion_steps must be an integer >= 1 \(got 0\)$"):
        create_diffusion("", diffusion_steps=0)
    with pytest.raises(ValueError, match=r"^eta must be a finite number >= 0 .*got -1$"):
        create_diffusion("4").ddim_sample_loop(lambda x, t, **kw: torch.cat([x, x], 1), (1, 4, 2, 2), eta=-1)
