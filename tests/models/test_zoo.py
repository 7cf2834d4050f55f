"""The zoo API: registry names, build/build_model, load_official on checkpoints saved as published."""
import argparse

import pytest
import torch
from safetensors.torch import save_file

from masked_dit.models import FAMILIES, MODEL_CONFIGS, build, build_model, load_official
from masked_dit.models.flops import meta_model
from tests.models.zoo_fixtures import constructor_args, load_model_fixture, rel_err

SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


#################################################################################
#                                   Registry                                    #
#################################################################################

def test_families_registered():
    assert {"dit", "sit", "repa_sit", "mdtv2", "mdtv1", "maskdit"} <= set(FAMILIES)


@pytest.mark.parametrize("prefix,family", [("DiT", "dit"), ("SiT", "sit"), ("REPA-SiT", "repa_sit")])
def test_registry_names_build(prefix, family):
    for size, (depth, hidden, heads) in SIZES.items():
        for p in (2, 4, 8):
            name = f"{prefix}-{size}/{p}"
            assert MODEL_CONFIGS[name][0] == family
            m = meta_model(name)
            assert m.family == family and len(m.blocks) == depth
            assert m.pos_embed.shape == (1, (32 // p) ** 2, hidden) and m.num_heads == heads


def test_build_model_overrides_and_errors():
    m = build_model("DiT-S/8", input_size=16, num_classes=10, learn_sigma=False)
    assert m.out_channels == 4 and m.y_embedder.embedding_table.num_embeddings == 11
    assert m.pos_embed.shape == (1, 4, 384)
    with pytest.raises(ValueError, match="unknown model 'DiT-XXL/2'"):
        build_model("DiT-XXL/2")
    with pytest.raises(ValueError, match="unknown model family 'dat'"):
        build("dat")
    with pytest.raises(TypeError):
        build("dit", hiden_size=3)  # typos in official argument names are not swallowed


#################################################################################
#                                 load_official                                 #
#################################################################################

def _tiny(config, **extra):
    """Overrides turning a registered name into the fixture's tiny configuration."""
    keep = ("hidden_size", "depth", "num_heads", "num_classes", "learn_sigma", "z_dims", "encoder_depth",
            "projector_dim", "decode_layer", "decoder_hidden_size", "decoder_depth", "decoder_num_heads")
    return {**{k: v for k, v in constructor_args(config).items() if k in keep}, **extra}


def test_dit_plain_state_dict(fixtures_dir, tmp_path):
    config, state, inputs, outputs = load_model_fixture(fixtures_dir, "dit_sigma")
    path = tmp_path / "DiT-tiny.pt"
    torch.save(state, path)
    # input_size (8) is read from pos_embed: nothing to pass for other resolutions
    model = load_official(path, "DiT-S/2", **_tiny(config))
    assert not model.training and model.input_size == 8
    with torch.no_grad():
        out = model(inputs["x"], inputs["t"], inputs["y"])
    assert rel_err(out, outputs["forward"]) <= 1e-5


def test_training_dict_prefers_ema(fixtures_dir, tmp_path):
    """REPA / MaskDiT style {'model', 'ema', 'opt', 'args'}: the EMA weights are loaded."""
    config, state, inputs, outputs = load_model_fixture(fixtures_dir, "repa_sit")
    raw = {k: v + 1.0 if v.is_floating_point() else v for k, v in state.items()}
    path = tmp_path / "0400000.pt"
    torch.save({"model": raw, "ema": state, "opt": {"state": {}}, "args": argparse.Namespace(model="SiT-XL/2")},
               path)
    model = load_official(path, "REPA-SiT-S/2", **_tiny(config))
    with torch.no_grad():
        out, zs = model(inputs["x"], inputs["t"], inputs["y"])
    assert rel_err(out, outputs["forward"]) <= 1e-5 and rel_err(zs[0], outputs["zs.0"]) <= 1e-5
    # without 'ema', 'model' is used
    torch.save({"model": state, "args": {"lr": 1e-4}}, path)
    model = load_official(path, "REPA-SiT-S/2", **_tiny(config))
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])


def test_wrapper_prefixes_and_safetensors(fixtures_dir, tmp_path):
    config, state, inputs, outputs = load_model_fixture(fixtures_dir, "sit_nosigma")
    path = tmp_path / "ddp.pt"
    torch.save({"ema": {f"module._orig_mod.{k}": v for k, v in state.items()}}, path)
    model = load_official(path, "SiT-S/2", **_tiny(config))
    with torch.no_grad():
        assert rel_err(model(inputs["x"], inputs["t"], inputs["y"]), outputs["forward"]) <= 1e-5
    st = tmp_path / "sit.safetensors"
    save_file(state, str(st))
    model = load_official(st, "SiT-S/2", **_tiny(config))
    with torch.no_grad():
        assert rel_err(model(inputs["x"], inputs["t"], inputs["y"]), outputs["forward"]) <= 1e-5


def test_maskdit_prefixed_keys(fixtures_dir, tmp_path):
    """MaskDiT checkpoints: {'model', 'ema', 'opt', 'args'} with keys prefixed `model.`."""
    config, state, _, _ = load_model_fixture(fixtures_dir, "maskdit")
    assert all(k.startswith("model.") for k in state)
    path = tmp_path / "maskdit.pt"
    torch.save({"model": state, "ema": state, "opt": {}, "args": argparse.Namespace(epochs=1)}, path)
    model = load_official(path, "MaskDiT-XL/2", **_tiny(config))
    ours = {k if k.startswith("model.") else "model." + k: v for k, v in model.state_dict().items()}
    assert ours.keys() == state.keys()
    assert all(torch.equal(ours[k], state[k]) for k in state)
    assert not model.training


def test_mdtv2_plain(fixtures_dir, tmp_path):
    config, state, _, _ = load_model_fixture(fixtures_dir, "mdtv2")
    path = tmp_path / "mdt_xl2_v2_ckpt.pt"
    torch.save(state, path)
    model = load_official(path, "MDTv2-XL/2", **_tiny(config))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


class NotATensor:  # pickled by reference: refused by weights_only loading
    pass


def test_load_official_errors(fixtures_dir, tmp_path):
    config, state, _, _ = load_model_fixture(fixtures_dir, "dit_sigma")
    path = tmp_path / "dit.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match="unknown model 'DiT-XL/3'"):
        load_official(path, "DiT-XL/3")
    # wrong size: one line naming missing keys and shape mismatches
    with pytest.raises(ValueError) as e:
        load_official(path, "DiT-S/2", num_classes=10)
    msg = str(e.value)
    assert "\n" not in msg and "DiT-S/2" in msg
    assert "missing keys (90): blocks.10.adaLN_modulation.1.bias" in msg
    assert "shape mismatches" in msg and "blocks.0.attn.proj.weight [96, 96] vs model [384, 384]" in msg
    # wrong family: REPA's projectors are unexpected in a SiT
    config_r, state_r, _, _ = load_model_fixture(fixtures_dir, "repa_sit")
    torch.save(state_r, path)
    with pytest.raises(ValueError, match=r"unexpected keys \(6\): projectors.0.0.bias"):
        load_official(path, "SiT-S/2", **_tiny(config, learn_sigma=False))
    # files that are not checkpoints
    with pytest.raises(FileNotFoundError):
        load_official(tmp_path / "nope.pt", "DiT-S/2")
    torch.save({"step": 3, "obj": NotATensor()}, path)
    with pytest.raises(ValueError, match="weights_only=False"):
        load_official(path, "DiT-S/2")
    torch.save({"step": 3, "opt": {"lr": 1.0}}, path)
    with pytest.raises(ValueError, match="no weights found"):
        load_official(path, "DiT-S/2")


def test_repa_legacy_checkpoint_layout(fixtures_dir, tmp_path):
    """REPA's legacy layout (`blocks` up to encoder_depth, then `decoder_blocks.i`), which REPA's
    generate.py --legacy renumbers as blocks.(i + encoder_depth): it loads and reproduces the fixture."""
    config, state, inputs, outputs = load_model_fixture(fixtures_dir, "repa_sit")
    enc = config["encoder_depth"]
    legacy = {}
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] == "blocks" and int(parts[1]) >= enc:
            k = ".".join(["decoder_blocks", str(int(parts[1]) - enc)] + parts[2:])
        legacy[k] = v
    assert any(k.startswith("decoder_blocks.") for k in legacy)
    path = tmp_path / "repa_legacy.pt"
    torch.save({"ema": legacy, "args": argparse.Namespace(encoder_depth=enc)}, path)
    model = load_official(path, "REPA-SiT-S/2", **_tiny(config))
    with torch.no_grad():
        out, zs = model(inputs["x"], inputs["t"], inputs["y"])
    assert rel_err(out, outputs["forward"]) <= 1e-5 and rel_err(zs[0], outputs["zs.0"]) <= 1e-5
    # another family keeps its own decoder_blocks (MaskDiT's are real keys): untouched
    config_m, state_m, _, _ = load_model_fixture(fixtures_dir, "maskdit")
    torch.save({"ema": state_m}, path)
    model = load_official(path, "MaskDiT-XL/2", **_tiny(config_m))
    assert torch.equal(model.state_dict()["model.decoder_blocks.1.mlp.fc2.weight"],
                       state_m["model.decoder_blocks.1.mlp.fc2.weight"])


@pytest.mark.parametrize("name,trained", [
    ("DiT-S/2", dict(in_channels=3, learn_sigma=False, num_classes=10)),
    ("SiT-S/4", dict(class_dropout_prob=0.0)),
    ("REPA-SiT-S/2", dict(z_dims=[32, 48], projector_dim=64, encoder_depth=1)),
    ("MDTv2-S/2", dict(decode_layer=2, num_classes=7, learn_sigma=False)),
    ("MDTv2-S/2", dict(decode_layer=0)),
    ("MaskDiT-S/2", dict(num_classes=0, decoder_hidden_size=64, decoder_depth=1, decoder_num_heads=2,
                         mae_loss_coef=0.0)),
    ("MaskDiT-S/2", dict(in_channels=3, use_decoder=False)),
])
def test_load_official_reads_what_the_weights_fix(tmp_path, name, trained):
    """A checkpoint trained with other channels, classes, sigma output, REPA projectors or decoder depths
    than its name's defaults loads by name and size alone: those arguments are read off its shapes."""
    import argparse

    size = dict(hidden_size=64, depth=4, num_heads=2)
    torch.manual_seed(0)
    src = build_model(name, input_size=16, **size, **trained)
    path = tmp_path / "ckpt.pt"
    # REPA's train.py saves its args: the encoder depth (which no shape shows) is read from them
    args = argparse.Namespace(encoder_depth=trained.get("encoder_depth", 8))
    torch.save({"ema": src.state_dict(), "args": args}, path)
    model = load_official(path, name, **size)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in src.state_dict().items())
    x = torch.randn(2, trained.get("in_channels", 4), 16, 16)
    y = torch.tensor([1, 0]) if trained.get("num_classes", 1) else None
    with torch.no_grad():  # same outputs (REPA: its projections too, which the encoder depth places)
        a, b = src.eval()(x, torch.tensor([10.0, 500.0]), y), model(x, torch.tensor([10.0, 500.0]), y)
    flat = lambda o: [o] if torch.is_tensor(o) else [t for part in o for t in flat(part)]  # noqa: E731
    assert len(flat(a)) == len(flat(b)) and all(torch.equal(p, q) for p, q in zip(flat(a), flat(b)))
    # what the caller passes wins over what is read (and a mismatch is reported, not loaded)
    with pytest.raises(ValueError, match="does not fit"):
        load_official(path, name, **size, in_channels=5)


@pytest.mark.parametrize("name", ["DiT-S/2", "SiT-S/2", "REPA-SiT-S/2"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_load_official_reads_num_classes_from_the_saved_args(tmp_path, name, dropout):
    """A 10-row label table is 10 classes without label dropout or 9 plus the null row; DiT's, SiT's and
    REPA's train.py save their args, whose num_classes tells which. Without args the null row is assumed."""
    import argparse

    size = dict(hidden_size=32, depth=1, num_heads=2, input_size=8)
    extra = dict(z_dims=[16], projector_dim=16, encoder_depth=1) if name.startswith("REPA") else {}
    src = build_model(name, num_classes=10 - (dropout > 0), class_dropout_prob=dropout, **size, **extra)
    assert src.state_dict()["y_embedder.embedding_table.weight"].shape[0] == 10
    path = tmp_path / "ckpt.pt"
    args = argparse.Namespace(num_classes=10 - (dropout > 0), encoder_depth=1)
    torch.save({"ema": src.state_dict(), "args": args}, path)
    model = load_official(path, name, **size)
    assert model.y_embedder.num_classes == 10 - (dropout > 0)
    assert (model.y_embedder.dropout_prob > 0) == (dropout > 0)
    torch.save({"ema": src.state_dict(), "args": argparse.Namespace(encoder_depth=1)}, path)
    assert load_official(path, name, **size).y_embedder.num_classes == 9  # the table alone: 9 + null
    # what the caller passes wins over the saved args
    assert load_official(path, name, **size, num_classes=10, class_dropout_prob=0.0).y_embedder.num_classes == 10


def test_load_official_reads_mdtv2_depth_off_its_blocks(tmp_path):
    """The official MDTv2 constructor builds (depth - decode_layer) // 2 blocks per encoder half: a run
    with depth 12 and decode_layer 3 saved 4 + 4 + 3 blocks. Loading it by name (depth 12) reads depth
    11 off the blocks (it failed: "needs depth - decode_layer to be even")."""
    src = build_model("MDTv2-S/2", input_size=8, hidden_size=16, num_heads=2, depth=11, decode_layer=3)
    path = tmp_path / "mdt.pt"
    torch.save({"ema": src.state_dict()}, path)
    model = load_official(path, "MDTv2-S/2", hidden_size=16, num_heads=2)
    assert (model.depth, len(model.en_inblocks), len(model.de_blocks)) == (11, 4, 3)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in src.state_dict().items())


@pytest.mark.parametrize("depth,decode_layer", [(2, 2), (6, 6), (3, 1)])
def test_load_official_reads_mdtv2_decode_layer_without_encoder_blocks(tmp_path, depth, decode_layer):
    """depth == decode_layer leaves MDTv2 without en_inblocks/en_outblocks keys: decode_layer is still
    read off de_blocks (it was left at the default 4, and the build then failed)."""
    src = build_model("MDTv2-S/2", input_size=8, hidden_size=16, num_heads=2, depth=depth, decode_layer=decode_layer)
    path = tmp_path / "mdt.pt"
    torch.save(src.state_dict(), path)
    model = load_official(path, "MDTv2-S/2", hidden_size=16, num_heads=2, depth=depth)
    assert model.decode_layer == decode_layer and len(model.de_blocks) == decode_layer
    assert all(torch.equal(model.state_dict()[k], v) for k, v in src.state_dict().items())


@pytest.mark.parametrize("kwargs, match", [
    ({"hidden_size": 0}, r"hidden_size must be an integer >= 1 \(got 0\)"),
    ({"patch_size": 0}, r"patch_size must be an integer >= 1 \(got 0\)"),
    ({"depth": 2.5}, r"depth must be an integer >= 1 \(got 2.5\)"),
    ({"depth": -1}, r"depth must be an integer >= 1 \(got -1\)"),
    ({"in_channels": 0}, r"in_channels must be an integer >= 1 \(got 0\)"),
    ({"num_classes": -1}, r"num_classes must be an integer >= 0 \(got -1\)"),
    ({"class_dropout_prob": 2.0}, r"class_dropout_prob must be in \[0, 1\) \(got 2.0\)"),
])
def test_sizes_are_checked_before_the_constructor(kwargs, match):
    """Were a ZeroDivisionError in the weight init, a modulo by zero, or a model without blocks."""
    for name in ("DiT-S/2", "MDTv2-S/2", "REPA-SiT-S/2"):
        with pytest.raises(ValueError, match=match):
            build_model(name, **kwargs)
