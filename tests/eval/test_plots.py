import json

import pytest
import torch

from masked_dit.eval import plots


def test_sample_grid_png(tmp_path):
    imgs = torch.rand(12, 1, 16, 16) * 2 - 1
    p = plots.save_sample_grid(imgs, tmp_path / "g.png", labels=list(range(10)) + [0, 1], ncol=6)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rgb = plots.to_uint8(torch.ones(2, 3, 4, 4))
    assert rgb.shape == (2, 4, 4, 3) and rgb.max() == 255


def test_plot_run_writes_both_pictures(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for s in range(1, 6):
            f.write(json.dumps({"step": s, "loss": 1.0 / s, "loss_mse": 0.5 / s, "lr": 1e-4}) + "\n")
        f.write(json.dumps({"step": 5, "digits_cond_acc": 0.9, "digits_fd": 3.0}) + "\n")
    out = plots.plot_run(tmp_path)
    assert {p.name for p in out} == {"loss_curves.png", "metric_curves.png"}


def test_plot_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        plots.plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not a JSON record"):
        plots.plot_run(tmp_path)
