"""Tiny configs of every family for fast CPU tests (16x16 digits, patch 4 -> 16 tokens)."""
from masked_dit.configs import apply_overrides, get_preset

TINY_MODEL = {"model.depth": 2, "model.hidden_size": 32, "model.num_heads": 2, "model.patch_size": 4}
FAMILY_EXTRA = {
    "digits-mdtv2": {"model.depth": 3, "model.extra": {"decode_layer": 1}},
    "digits-maskdit": {"model.extra": {"decoder_hidden_size": 32, "decoder_depth": 1, "decoder_num_heads": 2}},
    "digits-repa-sit": {"model.extra": {"encoder_depth": 1, "projector_dim": 32}},
}
PRESETS = ["digits-mdtv2", "digits-dit", "digits-sit", "digits-repa-sit", "digits-maskdit"]


def tiny_config(preset: str, out_dir, **overrides):
    o = {**TINY_MODEL, **FAMILY_EXTRA.get(preset, {}),
         "run.out_dir": str(out_dir), "train.steps": 3, "train.global_batch": 8, "train.log_every": 1,
         "train.ckpt_every": 2, "train.sample_every": 1000, "train.progress": False, "train.device": "cpu",
         "optim.warmup_steps": 0, "sample.steps": 2, "sample.num_per_class": 1, "sample.eval_num": 0, "parallel.tf32": False}
    o.update(overrides)
    return apply_overrides(get_preset(preset), o)


def full_and_resumed(preset: str, tmp_path, over: dict, stop_at: int = 3):
    """An uninterrupted run in tmp_path/a, and one in tmp_path/b killed at ``stop_at`` and resumed from
    its latest checkpoint to the end: (full, resumed) trainers."""
    from masked_dit.train import Trainer

    full = Trainer(tiny_config(preset, tmp_path / "a", **over))
    full.fit()
    Trainer(tiny_config(preset, tmp_path / "b", **over)).fit(stop_at=stop_at)
    resumed = Trainer(tiny_config(preset, tmp_path / "b", **{**over, "run.resume": "latest"}))
    resume_step = resumed.step
    resumed.fit()
    resumed.resume_step = resume_step
    return full, resumed


def assert_same_weights_and_ema(full, resumed):
    """Bit-identical parameters and EMA shadows of two trainers (an uninterrupted and a resumed run)."""
    import torch

    for (n, p), q in zip(full.module.named_parameters(), resumed.module.parameters()):
        assert torch.equal(p, q), n
    for n in full.ema.shadow:
        assert torch.equal(full.ema.shadow[n], resumed.ema.shadow[n]), n


def cpu_fsdp_skip():
    """A skipif mark for tests that run FSDP2 on CPU ranks (torch 2.6's FSDP2 cannot)."""
    import pytest

    from masked_dit.train.parallel import fsdp_supported

    ok, why = fsdp_supported("cpu")
    return pytest.mark.skipif(not ok, reason=why)
