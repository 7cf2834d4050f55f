"""convergence_digits.py: equal-size configs, the --toy run end to end (JSON, table, plot), bad options."""
import json
import math

import pytest
import torch

from benchmarks import convergence_digits as cd

MODELS = ("dit", "mdtv2", "maskdit")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """One --toy run of all three models (4 steps, 1 evaluation each) on the CPU."""
    out = tmp_path_factory.mktemp("convergence")
    threads = torch.get_num_threads()
    paths = cd.main(["--toy", "--device", "cpu", "--threads", "1", "--out-dir", str(out)])
    assert torch.get_num_threads() == threads  # --threads does not leak into the caller
    return out, paths


#################################################################################
#                                    Configs                                    #
#################################################################################

def _blocks(model):
    """(blocks on the full token set at inference, their widths)."""
    m = getattr(model, "model", model)  # MaskDiT wraps the network as .model
    if hasattr(m, "de_blocks"):  # MDTv2: encoder halves + decoder (the side block is training-only)
        blocks = list(m.en_inblocks) + list(m.en_outblocks) + list(m.de_blocks)
    else:  # DiT: blocks; MaskDiT: encoder blocks + decoder blocks
        blocks = list(m.blocks) + list(getattr(m, "decoder_blocks", []))
    return len(blocks), {b.hidden_size for b in blocks}


def test_models_have_equal_width_and_depth():
    from masked_dit.train.build import build_model_from_config

    args = cd.parse_args(["--width", "32", "--depth", "4", "--num-heads", "2", "--decoder-depth", "2"])
    for name in MODELS:
        cfg = cd.build_config(name, args, seed=0, run_root="unused")
        model = build_model_from_config(cfg)
        depth, widths = _blocks(model)
        assert depth == 4, name
        assert widths == {32}, (name, widths)
        # the shared schedule and data are the same for every model
        assert (cfg.train.steps, cfg.train.global_batch, cfg.optim.lr, cfg.optim.ema_decay) == (1000, 64, 1e-3, 0.995)
        assert (cfg.data.source, cfg.data.image_size) == ("digits", 16)
    assert cd.build_config("mdtv2", args, 0, "x").optim.name == "adan"  # the preset's recipe
    same = cd.parse_args(["--optimizer", "adamw"])
    assert {cd.build_config(m, same, 0, "x").optim.name for m in MODELS} == {"adamw"}


def test_samplers_use_the_same_number_of_network_evaluations():
    for steps in (4, 20, 50):
        assert cd.sampler_settings("dit", steps) == ("ddpm", steps)
        sampler, heun_steps = cd.sampler_settings("maskdit", steps)
        assert sampler == "heun" and 2 * heun_steps - 1 in (steps, steps - 1)  # Heun: 2n - 1 NFEs


def test_eval_inputs_are_fixed_and_balanced():
    noise_a, labels_a = cd.eval_inputs(30, 1, 16, seed=0)
    noise_b, labels_b = cd.eval_inputs(30, 1, 16, seed=0)
    assert torch.equal(noise_a, noise_b) and torch.equal(labels_a, labels_b)
    assert noise_a.shape == (30, 1, 16, 16)
    assert torch.bincount(labels_a).tolist() == [3] * 10


@pytest.mark.parametrize("argv, words", [
    (["--models", "dit,foo"], "--models"),
    (["--seeds", "a"], "--seeds"),
    (["--steps", "0"], "--steps"),
    (["--num-samples", "1"], "--num-samples"),
    (["--width", "30", "--num-heads", "4"], "--width"),
    (["--depth", "4", "--decoder-depth", "1"], "--decoder-depth"),
    (["--depth", "4", "--decoder-depth", "4"], "--decoder-depth"),
])
def test_bad_options_give_one_line_errors(argv, words):
    with pytest.raises(ValueError, match=words) as err:
        cd.parse_args(argv)
    assert "\n" not in str(err.value)


#################################################################################
#                              The --toy run, end to end                        #
#################################################################################

@pytest.mark.slow
def test_toy_run_writes_json_table_and_plot(toy_run):
    out, paths = toy_run
    assert {k: paths[k] for k in ("json", "md", "png")} == {
        "json": str(out / "convergence_digits.json"), "md": str(out / "convergence_digits.md"),
        "png": str(out / "convergence_digits.png")}
    data = json.loads((out / "convergence_digits.json").read_text())
    assert data["kind"] == "convergence_digits" and data["device"].startswith("cpu")
    assert data["settings"]["steps"] == 4 and data["settings"]["seeds"] == [0]
    assert data["settings"]["torch_threads"] == 1
    assert set(data["models"]) == set(MODELS)
    for name, m in data["models"].items():
        assert m["steps"] == [4]
        for key in ("seconds", "cpu_seconds", "cond_acc", "fd", "loss"):
            assert len(m[key]) == 1 and math.isfinite(m[key][0]), (name, key)
        assert m["seconds"][0] > 0 and m["seconds_per_step"] == pytest.approx(m["seconds"][0] / 4)
        assert 0.0 <= m["cond_acc"][0] <= 1.0 and m["fd"][0] >= 0.0
        assert m["params"] > 0 and m["config"]["model"]["hidden_size"] == 32
        assert len(m["runs"]) == 1 and m["runs"][0]["seed"] == 0
        assert m["runs"][0]["eval_seconds"] > 0  # measured, and kept out of "seconds"


@pytest.mark.slow
def test_toy_table_has_a_row_per_model(toy_run):
    out, _ = toy_run
    text = (out / "convergence_digits.md").read_text()
    summary = text.split("| model |", 1)[1].split("\n\n", 1)[0]  # the first table, up to the blank line
    rows = [line for line in summary.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == ["DiT", "MDTv2", "MaskDiT"]
    for row in rows:
        assert len(row.strip("|").split("|")) == 10
    assert "\n| 4 | " in text  # the per-evaluation table: one row per eval step
    assert "python benchmarks/convergence_digits.py --models dit,mdtv2,maskdit" in text  # how to rerun it


@pytest.mark.slow
def test_toy_plot_is_a_png(toy_run):
    from PIL import Image

    out, _ = toy_run
    with Image.open(out / "convergence_digits.png") as img:
        assert img.format == "PNG" and img.size[0] >= 800 and img.size[1] >= 600


@pytest.mark.slow
def test_replot_rewrites_table_and_plot_from_the_json(toy_run, tmp_path):
    out, _ = toy_run
    copy = tmp_path / "convergence_digits.json"
    copy.write_text((out / "convergence_digits.json").read_text())
    paths = cd.main(["--replot", str(copy)])
    assert (tmp_path / "convergence_digits.md").read_text() == (out / "convergence_digits.md").read_text()
    assert (tmp_path / "convergence_digits.png").stat().st_size > 0
    assert paths["png"] == str(tmp_path / "convergence_digits.png")


def test_replot_rejects_other_files(tmp_path):
    other = tmp_path / "x.json"
    other.write_text(json.dumps({"kind": "sampling"}))
    with pytest.raises(ValueError, match="--replot"):
        cd.main(["--replot", str(other)])
    with pytest.raises(ValueError, match="--replot"):
        cd.main(["--replot", str(tmp_path / "missing.json")])
