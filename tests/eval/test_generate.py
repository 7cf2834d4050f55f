"""`masked-dit sample ... --out x.npz`: per-batch noise, resumable parts, torchrun sharding, same bytes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from masked_dit.cli import main
from masked_dit.eval import generate
from masked_dit.models import build_model

KWARGS = {"input_size": 8, "patch_size": 4, "in_channels": 4, "hidden_size": 32, "depth": 2, "num_heads": 2,
          "num_classes": 5}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("DiT-S/2", **KWARGS)
    for p in model.parameters():  # adaLN-Zero starts at zero: make the output depend on the input
        torch.nn.init.normal_(p, std=0.05)
    path = tmp_path_factory.mktemp("ckpt") / "dit.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def _argv(checkpoint, out, *extra):
    return ["sample", str(checkpoint), "--model", "DiT-S/2", "--model-kwargs", json.dumps(KWARGS), "--out", str(out),
            "--num-samples", "7", "--batch-size", "3", "--steps", "4", "--cfg-scale", "1.5", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "a.npz"
    assert main(_argv(checkpoint, out)) == 0
    with np.load(out) as f:
        return f["arr_0"], f["arr_1"]


def test_npz_layout_and_parts_removed(reference, checkpoint, tmp_path):
    images, labels = reference
    assert images.shape == (7, 8, 8, 3) and images.dtype == np.uint8 and labels.shape == (7,)
    assert labels.max() < 5 and len(np.unique(images.reshape(7, -1), axis=0)) == 7  # every sample differs
    assert main(_argv(checkpoint, tmp_path / "b.npz")) == 0
    assert not (tmp_path / "b.npz.parts").exists()
    with np.load(tmp_path / "b.npz") as f:  # deterministic from the seed
        assert np.array_equal(f["arr_0"], images) and np.array_equal(f["arr_1"], labels)


def test_killed_run_resumes_with_the_same_samples(reference, checkpoint, tmp_path, monkeypatch, capsys):
    """A run dies after its first batch; the re-run samples only the two missing batches and the
    result is byte-identical. A re-run with other settings refuses the parts (one line)."""
    real = generate.sample_batch
    calls = []

    def dies_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(args[4])
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "sample_batch", dies_after_one)
    out = tmp_path / "c.npz"
    assert main(_argv(checkpoint, out)) == 130  # Ctrl-C: one line, the finished batch kept
    assert capsys.readouterr().err.strip().splitlines()[-1] == "masked-dit sample: interrupted"
    assert sorted(p.name for p in (tmp_path / "c.npz.parts").iterdir()) == ["batch_000000.npz", "settings.json"]

    capsys.readouterr()
    assert main(_argv(checkpoint, out, "--cfg-scale", "2.0")) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"masked-dit sample: error: {tmp_path}/c.npz.parts holds batches made with other settings "
                   "(cfg_scale differ): remove it or choose another --out")

    # --model-kwargs change the network without changing its weights (MDTv1's decode_layer, a label table
    # read as N classes): they are settings too
    assert main(_argv(checkpoint, out, "--model-kwargs", json.dumps({**KWARGS, "class_dropout_prob": 0.1}))) == 2
    assert "(model_kwargs differ)" in capsys.readouterr().err
    # batches without settings.json (a clean-up killed after deleting it first) are not taken as this run's
    settings = (tmp_path / "c.npz.parts" / "settings.json").read_bytes()
    (tmp_path / "c.npz.parts" / "settings.json").unlink()
    assert main(_argv(checkpoint, out)) == 2
    assert capsys.readouterr().err.strip() == (f"masked-dit sample: error: {tmp_path}/c.npz.parts holds batches but "
                                               "no readable settings.json: remove it or choose another --out")
    (tmp_path / "c.npz.parts" / "settings.json").write_bytes(settings)

    resumed = []
    monkeypatch.setattr(generate, "sample_batch", lambda *a, **k: (resumed.append(a[4]), real(*a, **k))[1])
    assert main(_argv(checkpoint, out)) == 0
    assert resumed == [1, 2]
    assert not (tmp_path / "c.npz.parts").exists()
    with np.load(out) as f:
        assert np.array_equal(f["arr_0"], reference[0]) and np.array_equal(f["arr_1"], reference[1])


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_same_file(reference, checkpoint, tmp_path):
    out = tmp_path / "d.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "masked_dit",
           *_argv(checkpoint, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out) as f:
        assert np.array_equal(f["arr_0"], reference[0]) and np.array_equal(f["arr_1"], reference[1])


def test_bad_outputs_are_one_line(checkpoint, tmp_path, capsys):
    assert main(_argv(checkpoint, tmp_path / "x.jpg")) == 2
    assert capsys.readouterr().err.strip() == (f"masked-dit sample: error: --out {tmp_path}/x.jpg: must end in .npz "
                                               "(samples for FID) or .png (a grid)")
    assert main(_argv(checkpoint, tmp_path / "x.npz", "--classes", "9")) == 2
    assert capsys.readouterr().err.strip() == "masked-dit sample: error: --classes [9] are outside [0, 4]"


def test_latent_samples_without_a_vae_warn(checkpoint, tmp_path, capsys):
    assert main(_argv(checkpoint, tmp_path / "w.npz", "--num-samples", "1")) == 0
    assert ("masked-dit sample: warning: " + f"{tmp_path}/w.npz holds latent channels 0-2 as images"
            in capsys.readouterr().err)


def test_samples_become_uint8_as_dits_sample_ddp():
    """[-1, 1] -> uint8 exactly as DiT's (and SiT's) sample_ddp.py: clamp(127.5 x + 128, 0, 255) then a
    truncating cast, i.e. floor(127.5 (x + 1) + 0.5). Rounding (x + 1) * 127.5 to even differed on the
    exact ties k + 0.5 with k even (a decoder's 1/255 grid) and, by float rounding, on a few random values."""
    from masked_dit.train.grid import to_uint8

    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 32, 32, generator=g) * 2.2 - 1.1  # a little out of range too, as VAE decodes are
    ties = torch.cat([torch.arange(256) / 127.5 - 1, (torch.arange(256) + 0.5) / 127.5 - 1]).view(1, 1, 4, 128)
    for images in (x, ties.expand(1, 3, 4, 128)):
        dit = torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
        np.testing.assert_array_equal(to_uint8(images), dit)
    assert to_uint8(torch.zeros(1, 1, 1, 1)).item() == 128 and to_uint8(torch.full((1, 1, 1, 1), -1.0)).item() == 0


def test_unconditional_maskdit_to_npz(tmp_path, capsys):
    """An unconditional model (num_classes=0) samples to an .npz with labels 0 (torch.randint(0, 0) raised);
    classes other than 0 for it are a one-line error."""
    kwargs = {"input_size": 8, "patch_size": 4, "in_channels": 4, "hidden_size": 32, "depth": 1, "num_heads": 2,
              "num_classes": 0, "decoder_hidden_size": 32, "decoder_depth": 1, "decoder_num_heads": 2}
    torch.manual_seed(0)
    path = tmp_path / "uncond.safetensors"
    save_file(build_model("MaskDiT-S/2", **kwargs).state_dict(), str(path))
    argv = ["sample", str(path), "--model", "MaskDiT-S/2", "--model-kwargs", json.dumps(kwargs), "--num-samples",
            "3", "--steps", "2", "--cfg-scale", "1", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "u.npz")]) == 0
    with np.load(tmp_path / "u.npz") as f:
        assert f["arr_0"].shape == (3, 8, 8, 3) and f["arr_1"].tolist() == [0, 0, 0]
    assert torch.equal(generate.sample_labels(4, 0, seed=0, classes=[0]), torch.zeros(4, dtype=torch.long))
    assert main([*argv, "--out", str(tmp_path / "v.npz"), "--classes", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "masked-dit sample: error: --classes [1]: the model is unconditional (num_classes=0); leave them out")
    # without --cfg-scale: no guidance (the MaskDiT preset's 1.5 needs labels), not a late error
    unguided = [a for a in argv if a not in ("--cfg-scale", "1")]
    assert main([*unguided, "--out", str(tmp_path / "w.npz")]) == 0
    with np.load(tmp_path / "u.npz") as u, np.load(tmp_path / "w.npz") as w:
        assert np.array_equal(u["arr_0"], w["arr_0"])
    assert main([*unguided, "--out", str(tmp_path / "x.npz"), "--cfg-scale", "1.5"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "masked-dit sample: error: --cfg-scale 1.5: the model is unconditional (num_classes=0), there is nothing "
        "to guide: leave it out")
    assert not (tmp_path / "x.npz.parts").exists()


def test_labels_and_cpu_batches_have_streams_of_their_own():
    """At seed 0 the labels were drawn from batch 0's noise generator (seed << 24 | 0 == seed); and a CPU
    generator keeps the low 32 bits of its seed, so seed << 24 | index repeated every 256 seeds."""
    cpu = torch.device("cpu")
    draw = lambda g: torch.randint(0, 10, (64,), generator=g)  # noqa: E731
    labels = generate.sample_labels(64, 10, seed=0)
    assert not torch.equal(labels, draw(generate.batch_generator(0, 0, cpu)))
    assert torch.equal(labels, generate.sample_labels(64, 10, seed=0))  # still a function of the seed
    streams = {(s, b): draw(generate.batch_generator(s, b, cpu)) for s in (0, 1, 256, 2**24) for b in (0, 1, 255)}
    assert len({tuple(v.tolist()) for v in streams.values()}) == len(streams)
    assert torch.equal(streams[(256, 1)], draw(generate.batch_generator(256, 1, cpu)))


def test_non_finite_samples_are_an_error_not_black_images():
    """A diverged model (or --sigma-max 1e30) gave NaN, which to_uint8 wrote as black images, exit 0."""
    import torch

    from masked_dit.eval.generate import sample_batch

    def draw(noise, y, g):
        return torch.where(torch.arange(len(y)).view(-1, 1, 1, 1) == 1, float("nan"), noise)

    with pytest.raises(FloatingPointError, match=r"^batch 3: 1 of 4 samples are not finite"):
        sample_batch(draw, torch.zeros(4, dtype=torch.long), (1, 2, 2), seed=0, index=3)
    fine = sample_batch(lambda noise, y, g: noise, torch.zeros(4, dtype=torch.long), (1, 2, 2), seed=0, index=3)
    assert fine.shape == (4, 1, 2, 2) and torch.isfinite(fine).all()
