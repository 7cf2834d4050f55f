"""Our exports name their model in the safetensors metadata: load_official refuses another family's
weights (DiT and SiT share every key and shape) and loads files without a name as before."""
import json

import pytest
import torch
from safetensors.torch import save_file

from masked_dit.cli import main
from masked_dit.models import build_model, load_official
from masked_dit.models.registry import check_model_name
from masked_dit.train.checkpoint import export_ema

KW = {"input_size": 16, "in_channels": 1, "num_classes": 10, "class_dropout_prob": 0.1, "depth": 2,
      "hidden_size": 32, "num_heads": 2, "patch_size": 4}


@pytest.fixture(scope="module")
def dit_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    return export_ema(out, build_model("DiT-S/2", **KW).state_dict(), "DiT-S/2", KW)


def test_other_family_is_refused(dit_export):
    with pytest.raises(ValueError, match=f"^checkpoint {dit_export} holds a DiT-S/2 model, not SiT-S/2$"):
        load_official(dit_export, "SiT-S/2", **KW)
    assert load_official(dit_export, "DiT-S/2", **KW).family == "dit"
    # the same family at another registered size is the same network once its sizes are given
    assert load_official(dit_export, "DiT-B/2", **KW).family == "dit"


def test_sample_other_family_is_one_line(dit_export, tmp_path, capsys):
    argv = ["sample", str(dit_export), "--model", "SiT-S/2", "--model-kwargs", json.dumps(KW),
            "--out", str(tmp_path / "o.png"), "--device", "cpu"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == (f"masked-dit sample: error: checkpoint {dit_export} holds a DiT-S/2 "
                                               "model, not SiT-S/2")
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {"model": "not-a-registered-name"}])
def test_files_without_our_name_load_as_asked(tmp_path, metadata):
    state = {k: v.contiguous() for k, v in build_model("DiT-S/2", **KW).state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"), metadata=metadata)
    model = load_official(tmp_path / "w.safetensors", "SiT-S/2", **KW)
    assert model.family == "sit" and torch.equal(model.pos_embed, state["pos_embed"])


def test_check_model_name():
    check_model_name(None, "SiT-S/2", "x")
    check_model_name("DiT-S/2", "DiT-B/2", "x", same_family=True)
    check_model_name("foreign", "DiT-B/2", "x", same_family=True)
    with pytest.raises(ValueError, match="^x holds a DiT-S/2 model, not DiT-B/2$"):
        check_model_name("DiT-S/2", "DiT-B/2", "x")  # a DCP checkpoint: the whole name
    with pytest.raises(ValueError, match="^x holds a MDTv1-S/2 model, not MDTv2-S/2$"):
        check_model_name("MDTv1-S/2", "MDTv2-S/2", "x", same_family=True)


def test_warm_start_from_another_familys_export_is_refused(dit_export):
    """--run.init_from an export file of another family took its weights without a word (a DCP checkpoint
    of another model was refused already)."""
    from masked_dit.train.warm_start import initial_weights

    sit = build_model("SiT-S/2", **KW)
    with pytest.raises(ValueError, match=f"^--run.init_from {dit_export}: holds a DiT-S/2 model, not SiT-S/2$"):
        initial_weights(str(dit_export), sit, "SiT-S/2")
    weights, ema = initial_weights(str(dit_export), build_model("DiT-S/2", **KW), "DiT-S/2")
    assert set(weights) == set(ema) == set(sit.state_dict())
