"""Official checkpoint *files* as the five repos write them, beyond their key names: SiT / REPA training
dicts name their interpolant in ``args`` (sampled with it), REPA's legacy layout also warm-starts a run,
zip archives are memory-mapped (a training dict's optimizer state is not read to keep its EMA), and a
file of another model, a truncated archive or a foreign pickled object is refused in one line."""
import argparse
import json

import pytest
import torch

from masked_dit.cli import _load_for_sampling, main
from masked_dit.models import build_model, load_official
from masked_dit.models.official import read_checkpoint

SMALL = {"input_size": 8, "in_channels": 4, "num_classes": 10, "depth": 2, "hidden_size": 32, "num_heads": 2}


def _training_dict(path, name, args, **kw):
    """A file as SiT's / REPA's train.py saves it: model, EMA, optimizer state and the argparse args."""
    state = build_model(name, **{**SMALL, **kw}).state_dict()
    torch.save({"model": state, "ema": state, "opt": {"state": {}, "param_groups": []}, "args": args}, path)
    return path


def _load(path, name, command="sample", path_type=None, prediction=None, **kw):
    ns = argparse.Namespace(source=str(path), model=name, model_kwargs=json.dumps({**SMALL, **kw}),
                            path_type=path_type, prediction=prediction, command=command)
    return _load_for_sampling(ns)


def _sit_args(**kw):
    return argparse.Namespace(model="SiT-S/2", num_classes=10, **{"path_type": "Linear", "prediction": "velocity",
                                                                  "loss_weight": None, "train_eps": None,
                                                                  "sample_eps": None, **kw})


def test_sit_file_is_sampled_with_the_interpolant_it_was_trained_with(tmp_path, capsys):
    path = _training_dict(tmp_path / "sit.pt", "SiT-S/2", _sit_args(path_type="GVP", prediction="noise",
                                                                     sample_eps=0.01))
    _, cfg = _load(path, "SiT-S/2")
    oc = cfg.objective
    assert (oc.kind, oc.path_type, oc.prediction, oc.sample_eps, oc.train_eps) == ("transport", "GVP", "noise",
                                                                                     0.01, None)
    # SiT's sample.py flags win over the saved args, and the change is said
    _, cfg = _load(path, "SiT-S/2", path_type="VP")
    assert (cfg.objective.path_type, cfg.objective.prediction) == ("VP", "noise")
    assert "was trained with path_type=GVP; sampling with path_type=VP as given" in capsys.readouterr().err
    # a bare state dict (SiT's released SiT-XL-2-256x256.pt) is Linear velocity unless told
    torch.save(build_model("SiT-S/2", **SMALL).state_dict(), tmp_path / "bare.pt")
    _, cfg = _load(tmp_path / "bare.pt", "SiT-S/2")
    assert (cfg.objective.path_type, cfg.objective.prediction) == ("Linear", "velocity")
    _, cfg = _load(tmp_path / "bare.pt", "SiT-S/2", path_type="GVP", prediction="score")
    assert (cfg.objective.path_type, cfg.objective.prediction) == ("GVP", "score")


def test_sit_velocity_file_drops_cut_offs_sit_ignores(tmp_path):
    """SiT saves --sample-eps for every run; a Linear / GVP velocity model ignores it (refused if given)."""
    path = _training_dict(tmp_path / "sit.pt", "SiT-S/2", _sit_args(path_type="GVP", sample_eps=0.05,
                                                                     train_eps=0.05))
    _, cfg = _load(path, "SiT-S/2")
    assert (cfg.objective.path_type, cfg.objective.sample_eps, cfg.objective.train_eps) == ("GVP", None, None)
    noise = _training_dict(tmp_path / "noise.pt", "SiT-S/2", _sit_args(prediction="noise", sample_eps=0.05))
    _, cfg = _load(noise, "SiT-S/2", prediction="velocity")  # told velocity: the file's cut-off goes too
    assert (cfg.objective.prediction, cfg.objective.sample_eps) == ("velocity", None)


def test_repa_cosine_file_samples_on_gvp(tmp_path):
    args = argparse.Namespace(model="SiT-S/2", num_classes=10, path_type="cosine", prediction="v", encoder_depth=1,
                              cfg_prob=0.1, qk_norm=False)
    path = _training_dict(tmp_path / "repa.pt", "REPA-SiT-S/2", args, encoder_depth=1)
    model, cfg = _load(path, "REPA-SiT-S/2", encoder_depth=1)
    assert (cfg.objective.kind, cfg.objective.path_type) == ("repa", "GVP") and model.encoder_depth == 1
    with pytest.raises(ValueError, match="REPA models predict the velocity only"):
        _load(path, "REPA-SiT-S/2", prediction="noise", encoder_depth=1)


def test_saved_interpolant_reaches_the_samples(tmp_path):
    """End to end: a GVP noise-prediction SiT file samples through its own transport (the velocity read
    off a noise prediction), so the grid differs from the same weights sampled as Linear velocity."""
    path = _training_dict(tmp_path / "sit.pt", "SiT-S/2", _sit_args(path_type="GVP", prediction="noise"))
    common = ["--model", "SiT-S/2", "--model-kwargs", json.dumps(SMALL), "--steps", "3", "--sampler", "ode",
              "--ode-method", "euler", "--num-samples", "4", "--batch-size", "4", "--device", "cpu"]
    assert main(["sample", str(path), "--out", str(tmp_path / "a.npz"), *common]) == 0
    assert main(["sample", str(path), "--out", str(tmp_path / "b.npz"), "--path-type", "Linear",
                 "--prediction", "velocity", *common]) == 0
    import numpy as np

    a, b = np.load(tmp_path / "a.npz")["arr_0"], np.load(tmp_path / "b.npz")["arr_0"]
    assert a.shape == b.shape == (4, 8, 8, 3) and not np.array_equal(a, b)


def test_zip_files_are_memory_mapped_and_legacy_files_still_load(tmp_path, monkeypatch):
    state = build_model("DiT-S/2", **SMALL).state_dict()
    torch.save({"ema": state, "opt": {}}, tmp_path / "zip.pt")
    torch.save({"ema": state}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    seen, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: seen.append(kw.get("mmap")) or load(*a, **kw))
    for name in ("zip.pt", "legacy.pt"):
        model = load_official(tmp_path / name, "DiT-S/2", **SMALL)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert seen == [True, False]


def test_repa_legacy_layout_warm_starts_a_run(tmp_path):
    """REPA's legacy files (``blocks`` = the encoder, then ``decoder_blocks``) load for sampling and for
    --run.init_from alike; an init_from whose encoder depth is not the model's says which to set."""
    from masked_dit.train.warm_start import initial_weights

    model = build_model("REPA-SiT-S/2", **{**SMALL, "depth": 3}, encoder_depth=1)
    state = model.state_dict()
    legacy = {(f"decoder_blocks.{int(k.split('.')[1]) - 1}.{k.split('.', 2)[2]}"
               if k.startswith("blocks.") and int(k.split(".")[1]) >= 1 else k): v for k, v in state.items()}
    assert any(k.startswith("decoder_blocks.1.") for k in legacy)
    torch.save({"model": legacy, "ema": legacy}, tmp_path / "legacy.pt")
    weights, ema = initial_weights(str(tmp_path / "legacy.pt"), model)
    assert weights.keys() == ema.keys() == state.keys()
    assert all(torch.equal(weights[k], v) and torch.equal(ema[k], v) for k, v in state.items())
    other = build_model("REPA-SiT-S/2", **{**SMALL, "depth": 3}, encoder_depth=2)
    with pytest.raises(ValueError, match=r"legacy layout with encoder_depth 1 .* after block 2: pass "
                                         r"--model.extra='\{\"encoder_depth\": 1\}'$"):
        initial_weights(str(tmp_path / "legacy.pt"), other)


def test_another_models_file_names_what_it_gives(tmp_path):
    """A learned-sigma DiT file asked for as MaskDiT: the value read off it is named, not --model-kwargs."""
    torch.save(build_model("DiT-S/2", **SMALL).state_dict(), tmp_path / "dit.pt")
    kw = {k: v for k, v in SMALL.items() if k != "num_classes"}
    with pytest.raises(ValueError, match=rf"^checkpoint {tmp_path}/dit.pt does not fit MaskDiT-S/2: its weights "
                                         r"give learn_sigma=True, which MaskDiT-S/2 cannot be built with \(.*"
                                         r"learn_sigma must be False\)$"):
        load_official(tmp_path / "dit.pt", "MaskDiT-S/2", **kw)


def test_damaged_and_foreign_files_are_named(tmp_path):
    torch.save(build_model("DiT-S/2", **SMALL).state_dict(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.pt: unreadable checkpoint \(ValueError: a torch.save zip archive "
                                         r"without its central directory: the file is truncated or damaged"):
        read_checkpoint(tmp_path / "cut.pt")
    torch.save({"ema": {}, "args": tmp_path}, tmp_path / "obj.pt")  # a pathlib path: not an allowed global
    with pytest.raises(ValueError, match=r"obj.pt: checkpoint holds objects beyond tensors \(unsupported global "
                                         r"pathlib\.\w*Path\); if you trust the file, load it in Python with "
                                         r"weights_only=False"):
        read_checkpoint(tmp_path / "obj.pt")
    assert read_checkpoint(tmp_path / "obj.pt", weights_only=False)["args"] == tmp_path
