"""Few-step runs of every family, bit-exact resume, EMA export."""
import json

import pytest
import torch

from masked_dit.train import Trainer, train
from masked_dit.train import checkpoint as ckpt
from tests.train.tiny import PRESETS, assert_same_weights_and_ema, full_and_resumed, tiny_config


def _losses(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("preset", PRESETS)
def test_few_steps_of_every_family(preset, tmp_path):
    cfg = tiny_config(preset, tmp_path)
    result = train(cfg)
    run = tmp_path / cfg.run.name
    records = _losses(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert all(torch.isfinite(torch.tensor(v)) for k, v in r.items() if isinstance(v, float))
        assert r["grad_norm"] > 0 and "img_per_s" in r and "tflops_per_device" in r
    assert json.loads((run / "config.json").read_text())["preset"] == preset
    assert (run / "samples.png").exists()
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000002", "step_00000003"]
    # The export loads without torch.distributed and holds the EMA weights.
    model = ckpt.load_export(run / "export")
    assert result["step"] == 3 and not model.training


def test_objective_terms_are_logged(tmp_path):
    train(tiny_config("digits-mdtv2", tmp_path, **{"train.steps": 1}))
    r = _losses(tmp_path / "digits-mdtv2")[0]
    assert abs(r["loss"] - (r["loss_full"] + r["loss_masked"])) < 1e-5
    assert {"mse", "vb", "lr", "grad_norm"} <= set(r)


def test_resume_is_bit_exact(tmp_path):
    """Kill after the step-2 checkpoint, resume 'latest': the same losses and weights as one run."""
    over = {"train.steps": 4, "train.ckpt_every": 2, "optim.grad_clip": 1.0, "train.global_batch": 8,
            "train.micro_batch": 4}  # gradient accumulation too
    full = Trainer(tiny_config("digits-mdtv2", tmp_path / "a", **over))
    full.fit()
    part = Trainer(tiny_config("digits-mdtv2", tmp_path / "b", **over))
    assert part.fit(stop_at=3)["stopped"]  # killed at step 3, after the step-2 checkpoint
    resumed = Trainer(tiny_config("digits-mdtv2", tmp_path / "b", **{**over, "run.resume": "latest"}))
    assert resumed.step == 2
    resumed.fit()
    a = [(r["step"], r["loss"]) for r in _losses(tmp_path / "a" / "digits-mdtv2") if "loss" in r]
    b = [(r["step"], r["loss"]) for r in _losses(tmp_path / "b" / "digits-mdtv2") if "loss" in r]
    assert a == b  # one record per step: the killed run's step-3 record was dropped on resume
    assert_same_weights_and_ema(full, resumed)


def test_resume_is_bit_exact_with_sample_grids_at_checkpoints(tmp_path):
    """A sample grid and digits metric right after a checkpoint (both every 2 steps) must not move the
    training RNG: they did (random init of the EMA copy), so the resumed run drew other noise."""
    over = {"train.steps": 4, "train.ckpt_every": 2, "train.sample_every": 2, "train.global_batch": 8,
            "sample.eval_num": 4}  # the digits metric too (it builds a classifier)
    full, resumed = full_and_resumed("digits-dit", tmp_path, over)
    assert resumed.resume_step == 2
    a = [(r["step"], r["loss"]) for r in _losses(tmp_path / "a" / "digits-dit") if "loss" in r]
    b = [(r["step"], r["loss"]) for r in _losses(tmp_path / "b" / "digits-dit") if "loss" in r]
    assert a == b
    assert_same_weights_and_ema(full, resumed)


def test_log_window_across_a_resume_and_a_rerun_finished_run_keep_one_run_s_records(tmp_path):
    """Records every 3 steps, checkpoints every 2: the step-3 record spans the step-2 checkpoint and
    averages steps 1-3 after a resume too (the open window is in the checkpoint). Re-running the
    finished run re-evaluates its end once (no second final digits record)."""
    over = {"train.steps": 6, "train.ckpt_every": 2, "train.log_every": 3, "sample.eval_num": 4}
    Trainer(tiny_config("digits-dit", tmp_path / "a", **over)).fit()
    Trainer(tiny_config("digits-dit", tmp_path / "b", **over)).fit(stop_at=3)
    Trainer(tiny_config("digits-dit", tmp_path / "b", **{**over, "run.resume": "latest"})).fit()
    Trainer(tiny_config("digits-dit", tmp_path / "b", **{**over, "run.resume": "latest"})).fit()  # finished
    a, b = (_losses(tmp_path / run / "digits-dit") for run in ("a", "b"))
    timing = ("img_per_s", "tflops_per_device")
    assert [{k: v for k, v in r.items() if k not in timing} for r in a] == \
        [{k: v for k, v in r.items() if k not in timing} for r in b]
    assert [r["step"] for r in a] == [3, 6, 6]  # two log records, one final evaluation


def test_incomplete_checkpoint_is_ignored(tmp_path):
    cfg = tiny_config("digits-dit", tmp_path, **{"train.steps": 2})
    train(cfg)
    root = tmp_path / "digits-dit" / "checkpoints"
    (root / "step_00000009.tmp").mkdir()           # a crash mid-save
    (root / "step_00000007").mkdir()               # no meta.json: incomplete
    assert ckpt.resolve_resume("latest", root).name == "step_00000002"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(root / "step_00000007"), root)


def test_export_equals_ema(tmp_path):
    t = Trainer(tiny_config("digits-sit", tmp_path, **{"train.steps": 2}))
    t.fit()
    model = ckpt.load_export(tmp_path / "digits-sit" / "export")
    for n, p in model.named_parameters():
        assert torch.equal(p, t.ema.shadow[n]), n


def test_activation_checkpointing_and_bf16(tmp_path):
    """AC recomputes the same numbers (fp32: identical losses); bf16 autocast stays close."""
    base = Trainer(tiny_config("digits-mdtv2", tmp_path / "a", **{"train.steps": 2}))
    base.fit()
    ac = Trainer(tiny_config("digits-mdtv2", tmp_path / "b", **{"train.steps": 2,
                                                                "parallel.activation_checkpointing": True}))
    ac.fit()
    losses_a = [r["loss"] for r in _losses(tmp_path / "a" / "digits-mdtv2")]
    losses_b = [r["loss"] for r in _losses(tmp_path / "b" / "digits-mdtv2")]
    torch.testing.assert_close(torch.tensor(losses_b), torch.tensor(losses_a), rtol=1e-6, atol=0)
    for p, q in zip(base.module.parameters(), ac.module.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    bf = Trainer(tiny_config("digits-mdtv2", tmp_path / "c", **{"train.steps": 2, "parallel.precision": "bf16"}))
    bf.fit()
    a, c = _losses(tmp_path / "a" / "digits-mdtv2"), _losses(tmp_path / "c" / "digits-mdtv2")
    assert abs(a[0]["loss"] - c[0]["loss"]) < 0.05 * a[0]["loss"]


def test_digits_run_reports_offline_metric_and_pictures(tmp_path):
    """Digits runs score their EMA samples with the offline metric (metrics file + result) and
    leave loss/metric curves beside samples.png."""
    cfg = tiny_config("digits-dit", tmp_path, **{"train.steps": 2, "sample.eval_num": 20})
    result = train(cfg)
    run = tmp_path / cfg.run.name
    evals = [r for r in _losses(run) if "digits_cond_acc" in r]
    assert len(evals) == 1 and evals[0]["step"] == 2
    assert 0.0 <= evals[0]["digits_cond_acc"] <= 1.0 and evals[0]["digits_fd"] > 0
    assert result["eval"] == evals[0]
    assert (run / "loss_curves.png").exists() and (run / "metric_curves.png").exists()


def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    """Without --resume, a run folder holding checkpoints is not started over (that would prune them)."""
    over = {"train.steps": 2, "train.ckpt_every": 1}
    Trainer(tiny_config("digits-dit", tmp_path, **over)).fit(stop_at=1)
    run_dir = tmp_path / "digits-dit"
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="already has checkpoints .*--resume latest"):
        Trainer(tiny_config("digits-dit", tmp_path, **over))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    assert Trainer(tiny_config("digits-dit", tmp_path, **{**over, "run.resume": "latest"})).step == 1


def test_resume_with_another_batch_geometry_or_world_size_keeps_the_data_position(tmp_path):
    """Saved at step 2 with micro-batches of 4 (2 per step): 16 samples into the epoch. Resumed without
    accumulation (micro 8), and from a checkpoint marked as written by 2 ranks (whose per-rank RNG
    cannot be reused), the stream continues at sample 16, not at the start of the epoch."""
    import json as _json

    over = {"train.steps": 4, "train.ckpt_every": 2, "train.global_batch": 8, "train.micro_batch": 4}
    Trainer(tiny_config("digits-dit", tmp_path, **over)).fit(stop_at=2)
    resumed = Trainer(tiny_config("digits-dit", tmp_path, **{**over, "train.micro_batch": 8,
                                                             "run.resume": "latest"}))
    assert resumed.step == 2 and resumed.stream.state_dict() == {"epoch": 0, "batch": 2, "samples_per_batch": 8,
                                                                 "dataset_len": len(resumed.stream.dataset)}
    meta_path = tmp_path / "digits-dit" / "checkpoints" / "step_00000002" / "meta.json"
    meta = _json.loads(meta_path.read_text())
    meta_path.write_text(_json.dumps({**meta, "world_size": 2}))
    other_world = Trainer(tiny_config("digits-dit", tmp_path, **{**over, "run.resume": "latest"}))
    assert other_world.step == 2 and other_world.stream.state_dict()["batch"] == 4


def test_fsdp_where_this_torch_cannot_is_one_line(monkeypatch):
    """torch 2.6's FSDP2 has no CPU path (detected, not version-matched): a clear error, not a deep one."""
    from types import SimpleNamespace

    from masked_dit.train import parallel

    monkeypatch.delattr(torch.cpu.Stream, "record_event", raising=False)
    ok, why = parallel.fsdp_supported("cpu")
    assert not ok and why.startswith(f"FSDP2 of torch {torch.__version__} cannot run on CPU")
    assert parallel.fsdp_supported("cuda")[0]
    with pytest.raises(ValueError, match=r"^--parallel.mode=fsdp: FSDP2 of torch .* use --parallel.mode=ddp"):
        parallel.apply_fsdp(torch.nn.Linear(2, 2), SimpleNamespace(device=torch.device("cpu")), "fp32")


def test_grids_sample_with_the_configs_sit_options(tmp_path, monkeypatch):
    """--sample.sde_method / diffusion_form / ... reach the SiT sampler of the training grids."""
    from masked_dit.diffusion import sde

    seen = {}
    real = sde.sample_sde

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(sde, "sample_sde", spy)
    over = {"train.steps": 1, "sample.sampler": "sde", "sample.sde_method": "Heun", "sample.diffusion_form": "SBDM",
            "sample.diffusion_norm": 0.5, "sample.last_step": "Tweedie", "sample.last_step_size": 0.1}
    trainer = Trainer(tiny_config("digits-sit", tmp_path, **over))
    trainer.sample_grid(tmp_path / "g.png", trainer.module)
    assert {k: seen[k] for k in ("method", "diffusion_form", "diffusion_norm", "last_step", "last_step_size")} == \
        {"method": "Heun", "diffusion_form": "SBDM", "diffusion_norm": 0.5, "last_step": "Tweedie", "last_step_size": 0.1}
    assert (tmp_path / "g.png").exists()


def test_maskdit_mask_ratio_schedule_runs_by_step_and_counts_its_flops(tmp_path):
    """--objective.mask_ratio_fn=cosine4: each step masks at ratio(step / steps), logged as mask_ratio, and
    the record's TFLOP/s counts each step at its own ratio (fewer kept patches: fewer FLOPs)."""
    from masked_dit.nn.masking import scheduled_mask_ratio
    from masked_dit.train.metrics import training_flops_per_image

    cfg = tiny_config("digits-maskdit", tmp_path, **{"train.steps": 4, "objective.mask_ratio_fn": "cosine4",
                                                     "objective.mask_ratio": 0.75})
    trainer = Trainer(cfg)
    flops = []
    add = trainer.metrics.add
    trainer.metrics.add = lambda values, images, fpi=None: flops.append(fpi) or add(values, images, fpi)
    trainer.fit()
    records = [r for r in _losses(tmp_path / "digits-maskdit") if "loss" in r]
    ratios = [scheduled_mask_ratio(s / 4, "cosine4", 0.75) for s in range(4)]
    assert [r["mask_ratio"] for r in records] == pytest.approx(ratios, rel=1e-6)
    assert flops == [training_flops_per_image(trainer.module, cfg.objective, mask_ratio=r) for r in ratios]
    assert flops[0] < flops[-1]  # more kept patches late in the schedule


def test_adan_runs_clip_with_adans_eps(tmp_path):
    """MDT's loop leaves clipping to Adan(max_grad_norm=1): gradients times min(max / (norm + eps), 1) with
    Adan's eps. The trainer clipped with clip_grad_norm_'s norm + 1e-6 instead. One step equals
    objective -> backward -> that clip -> an unclipped Adan step."""
    import copy

    from masked_dit.train.optim import Adan

    tr = Trainer(tiny_config("digits-mdtv2", tmp_path, **{"optim.grad_clip": 0.01, "optim.eps": 0.05}))
    batch = next(tr.stream)
    tr.stream = iter([{k: v.clone() for k, v in batch.items()}])
    ref = copy.deepcopy(tr.module)
    oc = tr.cfg.optim
    opt = Adan(ref.parameters(), lr=oc.lr, betas=oc.betas, eps=oc.eps, fused=False)
    torch.manual_seed(5)
    totals = tr.train_step()
    torch.manual_seed(5)
    tr.objective(ref, batch)["loss"].backward()
    grads = [p.grad for p in ref.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert totals["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)  # logged before clipping
    assert norm > 10 * oc.grad_clip  # every step clips
    for g in grads:
        g.mul_(min(oc.grad_clip / (norm.item() + oc.eps), 1.0))
    opt.step()
    for (n, p), q in zip(tr.module.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("accum", [1, 2])
def test_mdtv2_full_pass_is_backpropagated_before_the_masked_pass_runs(tmp_path, monkeypatch, accum):
    """One pass's activations at a time: when the masked pass starts, the full pass's backward has run
    (its gradients are there). Under DDP the first pass runs without sync (the test in
    test_distributed.py checks 2 ranks against one process)."""
    from masked_dit.diffusion.objectives import MDTv2Objective

    real = MDTv2Objective.passes
    seen = []

    def passes(self, model, batch, **kw):
        gen = real(self, model, batch, **kw)
        yield next(gen)
        seen.append(any(p.grad is not None for p in model.parameters()))
        yield from gen
    monkeypatch.setattr(MDTv2Objective, "passes", passes)
    over = {"train.steps": 2, "train.global_batch": 8 * accum, "train.micro_batch": 8}
    out = Trainer(tiny_config("digits-mdtv2", tmp_path, **over)).fit()
    assert seen == [True] * (2 * accum) and out["step"] == 2
    record = json.loads((tmp_path / "digits-mdtv2" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(record["loss"] - (record["loss_full"] + record["loss_masked"])) < 1e-5
