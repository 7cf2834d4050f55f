"""Valid but unusual configurations found by fuzzing the command line: each must simply work (or,
where it cannot, stop with one line before any work is done). Bad-input lines are in the CASES table
of test_bad_input.py; these are the regressions that need a run."""
import json

import numpy as np
import pytest

from masked_dit.cli import main
from tests.reliability.common import TINY


def _train_args(out_dir, preset="digits-dit", *extra):
    return ["train", "--preset", preset, *[f"--{k}={v}" for k, v in TINY.items()], f"--run.out_dir={out_dir}",
            "--train.steps=2", "--sample.eval_num=0", *extra]


@pytest.mark.parametrize("extra", [
    ("--train.global_batch=6", "--train.micro_batch=2"),             # accumulation of 3 micro-batches
    ("--train.keep_last=1", "--train.log_every=100", "--train.ckpt_every=100", "--train.sample_every=100"),
    ("--model.learn_sigma=false",),
    ("--model.class_dropout_prob=0", "--sample.cfg_scale=1"),       # no null class, no guidance
], ids=["accumulation", "every-past-steps", "no-learn-sigma", "no-null-class"])
def test_unusual_valid_configs_train(tmp_path, extra):
    assert main(_train_args(tmp_path, "digits-dit", *extra)) == 0
    assert (tmp_path / "digits-dit" / "samples.png").exists()


def test_unconditional_maskdit_on_labelled_digits(tmp_path):
    """num_classes=0 (MaskDiT's unconditional form) ignores the data's labels instead of refusing them."""
    """It was 'cannot write empty image' (no grid rows) after training, and a ZeroDivisionError in the
    digits metric."""
    extra = '--model.extra={"decoder_hidden_size": 16, "decoder_depth": 1, "decoder_num_heads": 2}'
    assert main(_train_args(tmp_path, "digits-maskdit", "--model.num_classes=0", "--sample.cfg_scale=1", extra,
                            "--sample.eval_num=4")) == 0
    assert (tmp_path / "digits-maskdit" / "samples.png").exists()


def test_sampling_without_null_class_refuses_guidance(tmp_path, capsys):
    """A model trained with class_dropout_prob=0 has no null-class row: --cfg-scale != 1 is one line
    (it was 'labels must be in [0, 9] (got max 10)'), --cfg-scale 1 samples."""
    assert main(_train_args(tmp_path, "digits-dit", "--model.class_dropout_prob=0", "--sample.cfg_scale=1")) == 0
    run = str(tmp_path / "digits-dit")
    capsys.readouterr()
    assert main(["sample", run, "--out", str(tmp_path / "g.png"), "--steps", "2", "--cfg-scale", "2"]) == 2
    assert capsys.readouterr().err.strip() == ("masked-dit sample: error: --cfg-scale 2.0 needs a null class, which "
                                               "this model lacks (trained with class_dropout_prob=0): sample with "
                                               "--cfg-scale 1")
    assert not (tmp_path / "g.png").exists()
    assert main(["sample", run, "--out", str(tmp_path / "g.png"), "--steps", "2", "--cfg-scale", "1"]) == 0


def test_print_config_round_trip(tmp_path, capsys):
    """--print-config, saved and loaded with --config, prints the same config; a partial file fills defaults."""
    capsys.readouterr()
    assert main(["train", "--preset", "imagenet256-mdtv2-xl2", "--train.steps=7", "--print-config"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "c.json").write_text(printed)
    assert main(["train", "--config", str(tmp_path / "c.json"), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(printed)
    (tmp_path / "part.json").write_text('{"train": {"steps": 3}}')
    assert main(["train", "--config", str(tmp_path / "part.json"), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["steps"] == 3


def test_eval_refuses_bad_out_and_weights_before_work(tmp_path, capsys):
    """--out naming a folder was an IsADirectoryError after the whole evaluation; a file that is not
    Inception weights was an UnpicklingError traceback."""
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "out").mkdir()
    (tmp_path / "w.pth").write_text("not weights")
    batch = str(tmp_path / "ref.npz")
    capsys.readouterr()
    argv = ["eval", batch, batch, "--random-init-inception", "--device", "cpu", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"masked-dit eval: error: --out {tmp_path}/out is a folder; name a .json file"
    assert main(["eval", batch, batch, "--device", "cpu", "--inception-weights", str(tmp_path / "w.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"masked-dit eval: error: --inception-weights {tmp_path}/w.pth: "
                                              "not loadable Inception weights (UnpicklingError: ")


def test_sample_vae_of_other_channels_is_one_line(tmp_path, capsys):
    """--vae with a pixel-space (1-channel) model was a conv RuntimeError traceback from inside the VAE."""
    diffusers = pytest.importorskip("diffusers")
    import torch

    torch.manual_seed(0)
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                            down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                            layers_per_block=1, norm_num_groups=4, sample_size=8).save_pretrained(tmp_path / "vae")
    assert main(_train_args(tmp_path, "digits-dit", "--train.steps=1")) == 0
    capsys.readouterr()
    argv = ["sample", str(tmp_path / "digits-dit"), "--out", str(tmp_path / "g.png"), "--steps", "2",
            "--vae", str(tmp_path / "vae")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()  # (diffusers may log a warning about `accelerate` first)
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (f"masked-dit sample: error: --vae {tmp_path}/vae decodes 4-channel "
                                               "latents but the model samples 1-channel images; leave --vae out for "
                                               "a pixel-space model")


def test_resume_with_other_optimizer_state_is_one_line(tmp_path, capsys):
    """A checkpoint without the optimizer's name in meta.json (older ones), resumed with another
    optimizer, was a DCP CheckpointException traceback (a BaseException)."""
    assert main(_train_args(tmp_path, "digits-dit", "--train.steps=1")) == 0
    ckpt = tmp_path / "digits-dit" / "checkpoints" / "step_00000001"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta.pop("optimizer") == "AdamW"
    (ckpt / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(_train_args(tmp_path, "digits-dit", "--optim.name=adan", "--optim.betas=0.98,0.92,0.99",
                            "--resume", "latest")) == 2
    assert capsys.readouterr().err.strip() == (
        f"masked-dit train: error: checkpoint {ckpt} does not hold this run's training state (it lacks "
        "optim.state.x_embedder.proj.weight.exp_avg_diff); was a setting such as --optim.name changed since it was "
        "saved?")


def test_eval_out_is_checked_before_the_evaluation(tmp_path, capsys):
    """--out naming the sample batch replaced it with JSON; a non-.json name was taken; an --out under a
    file was a traceback after the whole evaluation (the metrics lost); --device mps / meta were
    tracebacks or blamed the weights."""
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "smp.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    (tmp_path / "afile").write_text("")
    ref, smp = str(tmp_path / "ref.npz"), str(tmp_path / "smp.npz")
    before = (tmp_path / "smp.npz").read_bytes()
    cases = [(smp, f"--out {smp}: must end in .json (the metrics are JSON)"),
             (str(tmp_path / "m.txt"), f"--out {tmp_path}/m.txt: must end in .json (the metrics are JSON)"),
             (str(tmp_path / "afile/m.json"), f"--out {tmp_path}/afile/m.json: cannot create its folder (")]
    for out, message in cases:
        capsys.readouterr()
        assert main(["eval", ref, smp, "--random-init-inception", "--device", "cpu", "--out", out]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith(f"masked-dit eval: error: {message}"), err
    assert (tmp_path / "smp.npz").read_bytes() == before
    for device in ("mps", "meta"):
        assert main(["eval", ref, smp, "--random-init-inception", "--device", device]) == 2
        assert capsys.readouterr().err.strip() == (f"masked-dit eval: error: --device {device}: use 'auto', 'cpu' "
                                                   "or 'cuda[:N]'")
