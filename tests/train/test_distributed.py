"""DDP and FSDP2 on 2 gloo ranks (torchrun) against one process doing the same math.

The reference runs both ranks' micro-batches in one process: rank r's RNG stream (seed
100003 * seed + r) and data slice, gradients averaged over ranks, then the same clip / Adan /
EMA updates. Tolerance: 1e-5 relative on losses and 2e-5 absolute on EMA weights (float32
all-reduce order only).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from masked_dit.data import BatchStream, build_dataset
from masked_dit.diffusion.objectives import build_objective
from masked_dit.train.build import build_model_from_config
from masked_dit.train.ema import EMA
from masked_dit.train.optim import build_optimizer, clip_eps, lr_at
from masked_dit.train.trainer import grad_norm_and_clip
from tests.train.tiny import cpu_fsdp_skip, tiny_config

OVERRIDES = {"train.steps": 3, "train.global_batch": 8, "train.ckpt_every": 1000, "optim.grad_clip": 1.0}


def reference_run(cfg, world_size=2):
    dataset = build_dataset(cfg.data, cfg.model)
    torch.manual_seed(cfg.run.seed)
    model = build_model_from_config(cfg)
    objective = build_objective(cfg.objective, model, pixel_space=True)
    ema = EMA(model, cfg.optim.ema_decay)
    opt = build_optimizer(model.parameters(), cfg.optim)
    micro = cfg.train.global_batch // world_size
    streams = [BatchStream(dataset, micro, rank=r, world=world_size, seed=cfg.run.seed) for r in range(world_size)]
    rngs = []
    for r in range(world_size):
        torch.manual_seed(cfg.run.seed * 100_003 + r)
        rngs.append(torch.get_rng_state())
    losses = []
    model.train()
    for step in range(cfg.train.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.optim)
        total = 0.0
        for r in range(world_size):
            torch.set_rng_state(rngs[r])
            loss = objective(model, next(streams[r]))["loss"]
            (loss / world_size).backward()
            rngs[r] = torch.get_rng_state()
            total += float(loss) / world_size
        grad_norm_and_clip(list(model.parameters()), cfg.optim.grad_clip, clip_eps(cfg.optim))
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update()
        losses.append(total)
    return losses, ema


def torchrun(tmp_path, preset, mode):
    args = [f"--{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in
            {**tiny_overrides(preset, tmp_path), "parallel.mode": mode}.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "masked_dit", "train", "--preset", preset, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path / preset


def tiny_overrides(preset, out_dir):
    cfg = tiny_config(preset, out_dir, **OVERRIDES)
    from masked_dit.configs import get_preset
    base = get_preset(preset).to_dict()
    flat = {}
    for section, values in cfg.to_dict().items():
        if section == "preset":
            continue
        for k, v in values.items():
            if base[section][k] != v:
                flat[f"{section}.{k}"] = list(v) if isinstance(v, tuple) else v
    return {k: (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in flat.items()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp", marks=cpu_fsdp_skip())])
@pytest.mark.parametrize("preset", ["digits-mdtv2", "digits-maskdit", "digits-repa-sit"])
def test_two_ranks_match_one_process(mode, preset, tmp_path):
    """MDTv2: two passes per step, each backpropagated on its own (the hardest case for DDP/FSDP hooks);
    MaskDiT: the EDM wrapper around its network and masked tokens; REPA: a projector only the loss uses."""
    run = torchrun(tmp_path, preset, mode)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref_losses, ref_ema = reference_run(tiny_config(preset, tmp_path / "ref", **OVERRIDES))
    got = [r["loss"] for r in records]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    from safetensors.torch import load_file
    exported = load_file(str(run / "export" / "ema.safetensors"))
    for name, value in ref_ema.shadow.items():
        torch.testing.assert_close(exported[name], value, rtol=0, atol=2e-5, msg=name)
