import json

import pytest

from masked_dit.eval import plots


def test_plot_run_writes_both_pictures(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for s in range(1, 6):
            f.write(json.dumps({"step": s, "loss": 1.0 / s, "loss_mse": 0.5 / s, "lr": 1e-4}) + "\n")
        f.write(json.dumps({"step": 5, "digits_cond_acc": 0.9, "digits_fd": 3.0}) + "\n")
    out = plots.plot_run(tmp_path)
    assert {p.name for p in out} == {"loss_curves.png", "metric_curves.png"}


def test_loss_curves_take_every_term_of_each_family():
    """Only keys starting with 'loss' were drawn: DiT's mse / vb, MaskDiT's mae and REPA's denoising and
    projection losses never appeared under "training loss per term"."""
    bookkeeping = ["step", "grad_norm", "lr", "img_per_s", "tflops_per_device", "mfu", "peak_mem_gib",
                   "nonfinite_steps", "mask_ratio", "digits_fd", "digits_cond_acc", "fid"]
    for terms in (["loss", "mse", "vb"], ["loss", "loss_full", "loss_masked", "mse", "vb"], ["loss", "mae"],
                  ["denoising_loss", "loss", "proj_loss"]):
        assert plots.loss_terms(terms + bookkeeping) == terms


def test_a_repa_run_draws_its_denoising_and_projection_losses(tmp_path):
    from masked_dit.train import Trainer
    from tests.train.tiny import tiny_config

    Trainer(tiny_config("digits-repa-sit", tmp_path, **{"train.steps": 1})).fit()
    records = plots.read_jsonl(tmp_path / "digits-repa-sit" / "metrics.jsonl")
    assert plots.loss_terms({k for r in records for k in r}) == ["denoising_loss", "loss", "proj_loss"]


def test_plot_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        plots.plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not a JSON record"):
        plots.plot_run(tmp_path)
