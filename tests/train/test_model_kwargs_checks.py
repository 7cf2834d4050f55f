"""--model.extra (train) and --model-kwargs (sample): keys an option owns are refused, and arguments the
constructor rejects give one line naming where they came from."""
import json

import pytest

from masked_dit.cli import main
from masked_dit.configs import ConfigError
from masked_dit.train.build import build_model_from_config, model_kwargs
from tests.train.tiny import tiny_config

KW = {"input_size": 16, "in_channels": 1, "num_classes": 10, "class_dropout_prob": 0.1, "depth": 2,
      "hidden_size": 32, "num_heads": 2, "patch_size": 4}


@pytest.mark.parametrize("preset, extra, option", [
    ("digits-dit", {"depth": 3}, "--model.depth"),  # trained depth 3 while config.json said 2
    ("digits-dit", {"num_classes": 3}, "--model.num_classes"),  # skipped the digits' class-count check
    ("digits-mdtv2", {"decode_layer": 1, "mask_ratio": 0.5}, "--objective.mask_ratio"),
])
def test_extra_refuses_keys_with_their_own_option(tmp_path, preset, extra, option):
    cfg = tiny_config(preset, tmp_path, **{"model.extra": extra})
    with pytest.raises(ConfigError, match=f"^--model.extra=.* use {option} instead$"):
        model_kwargs(cfg)


@pytest.mark.parametrize("extra, error", [
    ({"mlp_ratio": -1}, "RuntimeError: Trying to create tensor with negative dimension"),
    ({"mlp_ratio": "a" * 500}, "ValueError: invalid literal for int()"),
    ({"bogus": 1}, "TypeError: DiT.__init__() got an unexpected keyword argument 'bogus'"),
])
def test_extra_the_constructor_rejects_names_the_option(tmp_path, extra, error):
    cfg = tiny_config("digits-dit", tmp_path, **{"model.extra": extra})
    with pytest.raises(ValueError) as info:
        build_model_from_config(cfg)
    msg = str(info.value)
    assert "\n" not in msg and f"--model.extra={json.dumps(extra)}" in msg and error in msg
    assert len(msg) < 2 * len(json.dumps(extra)) + 600  # the echoed value is cut in the constructor's message


def test_train_extra_error_is_one_line(tmp_path, capsys):
    argv = ["train", "--preset", "digits-dit", f"--run.out_dir={tmp_path}", "--train.device=cpu",
            '--model.extra={"mlp_ratio": -1}']
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("masked-dit train: error: cannot build DiT-S/2 with ") and "\n" not in err
    assert '--model.extra={"mlp_ratio": -1}): RuntimeError: Trying to create tensor with negative dimension' in err


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny DiT-S/2 export as training writes it (ema.safetensors naming its model, config.json)."""
    from masked_dit.models import build_model
    from masked_dit.train.checkpoint import export_ema

    out = tmp_path_factory.mktemp("export")
    return export_ema(out, build_model("DiT-S/2", **KW).state_dict(), "DiT-S/2", KW)


@pytest.mark.parametrize("change, error", [
    ({"hidden_size": -32}, "ValueError: hidden_size must be an integer >= 1 (got -32)"),
    ({"hidden_size": 32.5}, "ValueError: hidden_size must be an integer >= 1 (got 32.5)"),
    ({"mlp_ratio": "a"}, "ValueError: invalid literal for int()"),
])
def test_sample_model_kwargs_the_constructor_rejects(export, tmp_path, capsys, change, error):
    argv = ["sample", str(export), "--model", "DiT-S/2", "--model-kwargs", json.dumps({**KW, **change}),
            "--out", str(tmp_path / "o.png"), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    key, value = next(iter(change.items()))
    assert err.startswith("masked-dit sample: error: --model-kwargs: cannot build DiT-S/2 (with ")
    assert f"{key}={value!r}" in err and error in err and "\n" not in err
    assert not (tmp_path / "o.png").exists()
