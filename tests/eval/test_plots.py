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


def test_plot_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        plots.plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')
    with pytest.raises(ValueError, match="metrics.jsonl:2: not a JSON record"):
        plots.plot_run(tmp_path)
