"""`masked-dit eval`: inputs, precomputed reference statistics, errors, and one end-to-end run with a
randomly initialised FID Inception (same architecture; the real weights are not available offline)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from masked_dit.eval import cli
from masked_dit.eval.evaluator import NpzImages, evaluate, open_batches
from masked_dit.eval.fid import feature_statistics, frechet_distance
from masked_dit.eval.inception import InceptionOutputs


STUB_DIMS = (32, 24, 10)   # pool, spatial, logits: small, so 2048-d Fréchet distances stay out of
STUB = {"dims": None}      # the fast tests (precomputed statistics are then checked against these sizes)


class StubFeatures:
    """Cheap deterministic stand-in for the Inception (fixed random projections of the pixels)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.proj = {dim: torch.randn(3 * 8 * 8, dim, generator=g) for dim in STUB_DIMS}
        self.calls = 0

    def __call__(self, images: torch.Tensor) -> InceptionOutputs:
        self.calls += 1
        x = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 8).flatten(1)
        return InceptionOutputs(*(torch.relu(x @ self.proj[d]) for d in STUB_DIMS))


def _images(n, seed, size=16):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture
def batches(tmp_path):
    ref, samples = _images(12, 0), _images(10, 1)
    np.savez(tmp_path / "ref.npz", ref)
    np.savez(tmp_path / "samples.npz", samples, np.arange(10))   # arr_1 labels, ignored
    return tmp_path / "ref.npz", tmp_path / "samples.npz", ref, samples


def _png_folder(folder, images, name=lambda i: f"{i}.png"):
    """``images`` written as PNG files ``name(i)`` into the new folder ``folder``."""
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / name(i))
    return folder


def _features(images):
    out = StubFeatures()(torch.from_numpy(images).permute(0, 3, 1, 2))
    return [t.numpy().astype(np.float64) for t in out]


# -----------------------------------------------------------------------------
# Evaluator logic (stub features)

def test_metrics_from_images(batches):
    ref_path, sample_path, ref, samples = batches
    m = evaluate(ref_path, sample_path, StubFeatures(), batch_size=4, **STUB)
    (ref_pool, ref_spatial, _), (pool, spatial, _) = _features(ref), _features(samples)
    assert m["fid"] == pytest.approx(frechet_distance(*feature_statistics(pool), *feature_statistics(ref_pool)),
                                     rel=1e-5)
    assert m["sfid"] == pytest.approx(frechet_distance(*feature_statistics(spatial),
                                                       *feature_statistics(ref_spatial)), rel=1e-5)
    assert m["num_samples"] == 10 and m["num_reference"] == 12
    assert m["reference_statistics"] == {"fid": "computed", "sfid": "computed"}
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1 and m["inception_score"] >= 1


def test_precomputed_reference_statistics_are_used(batches, tmp_path):
    ref_path, sample_path, ref, samples = batches
    rng = np.random.default_rng(5)
    stats = {"mu": rng.standard_normal(32), "sigma": np.eye(32) * 0.5,
             "mu_s": rng.standard_normal(24), "sigma_s": np.eye(24) * 2.0}
    np.savez(tmp_path / "ref_stats.npz", ref, **stats)   # as VIRTUAL_imagenet256_labeled.npz
    m = evaluate(tmp_path / "ref_stats.npz", sample_path, StubFeatures(), batch_size=8, **STUB)
    pool, spatial, _ = _features(samples)
    assert m["reference_statistics"] == {"fid": "precomputed", "sfid": "precomputed"}
    assert m["fid"] == pytest.approx(frechet_distance(*feature_statistics(pool), stats["mu"], stats["sigma"]),
                                     rel=1e-5)
    assert m["sfid"] == pytest.approx(frechet_distance(*feature_statistics(spatial), stats["mu_s"],
                                                       stats["sigma_s"]), rel=1e-5)
    # the reference images still give precision/recall, identical to the run without statistics
    plain = evaluate(ref_path, sample_path, StubFeatures(), batch_size=8, **STUB)
    assert (m["precision"], m["recall"]) == (plain["precision"], plain["recall"])
    assert m["fid"] != pytest.approx(plain["fid"])


def test_statistics_only_reference_and_partial_statistics(batches, tmp_path):
    _, sample_path, ref, samples = batches
    ref_pool, _, _ = _features(ref)
    mu, sigma = feature_statistics(ref_pool)
    np.savez(tmp_path / "stats_only.npz", mu=mu, sigma=sigma)   # pytorch-fid style: pool stats only
    stub = StubFeatures()
    m = evaluate(tmp_path / "stats_only.npz", sample_path, stub, batch_size=16, **STUB)
    assert stub.calls == 1   # only the samples went through the network
    assert m["sfid"] is None and m["precision"] is None and m["recall"] is None
    assert m["reference_statistics"] == {"fid": "precomputed", "sfid": "unavailable"}
    np.savez(tmp_path / "pool_stats.npz", ref, mu=mu, sigma=sigma)
    m2 = evaluate(tmp_path / "pool_stats.npz", sample_path, StubFeatures(), batch_size=16, **STUB)
    assert m2["reference_statistics"] == {"fid": "precomputed", "sfid": "computed"}
    assert m2["fid"] == pytest.approx(m["fid"], rel=1e-9) and m2["sfid"] is not None


def test_image_folder_equals_npz(batches, tmp_path):
    ref_path, sample_path, _, samples = batches
    folder = _png_folder(tmp_path / "pngs", samples, lambda i: f"{i:06d}.{'png' if i % 2 else 'PNG'}")
    (folder / "notes.txt").write_text("ignored")
    from_npz = evaluate(ref_path, sample_path, StubFeatures(), batch_size=3, **STUB)
    from_folder = evaluate(ref_path, folder, StubFeatures(), batch_size=3, **STUB)
    assert from_folder == from_npz


def test_lossless_formats_of_other_tools_equal_npz(batches, tmp_path):
    # the formats the training folders and pytorch-fid read: a folder of .webp/.bmp/.tif/.ppm samples
    ref_path, sample_path, _, samples = batches
    folder = tmp_path / "mixed_formats"
    folder.mkdir()
    for i, img in enumerate(samples):
        ext = (".webp", ".bmp", ".tif", ".ppm", ".PNG")[i % 5]
        Image.fromarray(img).save(folder / f"{i:03d}{ext}", **({"lossless": True} if ext == ".webp" else {}))
    from_npz = evaluate(ref_path, sample_path, StubFeatures(), batch_size=3, **STUB)
    assert evaluate(ref_path, folder, StubFeatures(), batch_size=3, **STUB) == from_npz


def test_npz_streaming_reads_all_images_in_order(tmp_path):
    images = _images(11, 3, size=5)
    np.savez_compressed(tmp_path / "c.npz", images)
    np.savez(tmp_path / "u.npz", np.asfortranarray(images))
    for name in ("c.npz", "u.npz"):
        got = np.concatenate(list(NpzImages(tmp_path / name).batches(4)))
        np.testing.assert_array_equal(got, images)


def test_grayscale_npz_equals_its_rgb_copy(batches, tmp_path):
    # [N, H, W, 1] is repeated to RGB, as a folder of grayscale PNGs is by PIL's convert("RGB")
    ref_path = batches[0]
    gray = _images(10, 4)[..., :1]
    np.savez(tmp_path / "gray.npz", gray)
    np.savez(tmp_path / "rgb.npz", np.repeat(gray, 3, axis=-1))
    folder = tmp_path / "gray_pngs"
    folder.mkdir()
    for i, img in enumerate(gray):
        Image.fromarray(img[..., 0], mode="L").save(folder / f"{i}.png")
    from_rgb = evaluate(ref_path, tmp_path / "rgb.npz", StubFeatures(), batch_size=4, **STUB)
    assert evaluate(ref_path, tmp_path / "gray.npz", StubFeatures(), batch_size=4, **STUB) == from_rgb
    assert evaluate(ref_path, folder, StubFeatures(), batch_size=4, **STUB) == from_rgb


# -----------------------------------------------------------------------------
# Errors: one line, naming what is wrong

@pytest.mark.parametrize("arrays, match", [
    ({"arr_0": np.zeros((4, 8, 8, 3), np.float32)}, "must be uint8"),
    ({"arr_0": np.zeros((4, 8, 8), np.uint8)}, r"shape \[N > 0, H, W, 3\]"),
    ({"arr_0": np.zeros((4, 3, 8, 8), np.uint8)}, r"shape \[N > 0, H, W, 3\]"),
    ({"arr_0": np.zeros((4, 0, 8, 3), np.uint8)}, r"shape \[N > 0, H, W, 3\]"),
    ({"images": np.zeros((4, 8, 8, 3), np.uint8)}, "no 'arr_0'"),
    ({"arr_0": np.zeros((1, 8, 8, 3), np.uint8)}, r"holds 1 image\(s\); the metrics need at least 4"),
])
def test_bad_sample_batches(batches, tmp_path, arrays, match):
    ref_path = batches[0]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        open_batches(ref_path, tmp_path / "bad.npz")


def test_bad_reference_statistics(batches, tmp_path):
    _, sample_path, ref, _ = batches
    np.savez(tmp_path / "r1.npz", ref, mu=np.zeros(2048))
    with pytest.raises(ValueError, match="has 'mu' but not 'sigma'"):
        open_batches(tmp_path / "r1.npz", sample_path)
    np.savez(tmp_path / "r2.npz", ref, mu=np.zeros(2048), sigma=np.eye(16))
    with pytest.raises(ValueError, match=r"\(2048, 2048\)"):
        open_batches(tmp_path / "r2.npz", sample_path)
    np.savez(tmp_path / "r5.npz", ref, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="fid: reference statistics have 2048 features, the samples 32"):
        evaluate(tmp_path / "r5.npz", sample_path, StubFeatures(), **STUB)
    np.savez(tmp_path / "r3.npz", labels=np.arange(3))
    with pytest.raises(ValueError, match="neither 'arr_0' images nor 'mu'/'sigma'"):
        open_batches(tmp_path / "r3.npz", sample_path)
    (tmp_path / "r4.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not an .npz archive"):
        open_batches(tmp_path / "r4.npz", sample_path)


def test_non_finite_statistics_and_features_name_their_source(batches, tmp_path):
    _, sample_path, ref, _ = batches
    sigma = np.eye(32)
    sigma[5, 5] = np.nan
    np.savez(tmp_path / "nan_stats.npz", ref, mu=np.zeros(32), sigma=sigma)
    with pytest.raises(ValueError, match=r"nan_stats.npz: 'sigma' hold 1 non-finite value\(s\) \(first in row 5\)"):
        open_batches(tmp_path / "nan_stats.npz", sample_path, dims=None)

    class NaNForThirdImage(StubFeatures):   # e.g. corrupt weights or an fp16 overflow
        def __call__(self, images):
            out = super().__call__(images)
            if self.calls == 1:   # the first batch of the reference: its image 2
                out.pool[2] = float("nan")
            return out

    with pytest.raises(ValueError, match=r"pool outputs for the reference hold 32 non-finite value\(s\) "
                                         r"\(first in row 2\)"):
        evaluate(batches[0], sample_path, NaNForThirdImage(), batch_size=4, **STUB)


def test_bad_folders(batches, tmp_path):
    ref_path = batches[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .jpg/.jpeg/.png/"):
        open_batches(ref_path, tmp_path / "empty")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(_images(1, 0, 8)[0]).save(mixed / "a.png")
    Image.fromarray(_images(1, 0, 9)[0]).save(mixed / "b.png")
    for name in ("c.png", "d.png"):  # four images: enough for every metric, so the size check is reached
        Image.fromarray(_images(1, 0, 8)[0]).save(mixed / name)
    with pytest.raises(ValueError, match="b.png is 9x9 but the folder's images are 8x8"):
        evaluate(ref_path, mixed, StubFeatures())
    with pytest.raises(ValueError, match="must be an .npz file"):
        open_batches(mixed, mixed)


def test_damaged_files_name_themselves(batches, tmp_path):
    ref_path, sample_path, _, samples = batches
    folder = _png_folder(tmp_path / "pngs", samples)
    data = (folder / "7.png").read_bytes()
    (folder / "7.png").write_bytes(data[:len(data) // 2])   # a copy cut short
    with pytest.raises(ValueError, match=r"7.png is not a readable image \(OSError: image file is truncated"):
        evaluate(ref_path, folder, StubFeatures(), **STUB)
    for name, save in (("stored.npz", np.savez), ("deflated.npz", np.savez_compressed)):
        save(tmp_path / name, samples)
        data = bytearray((tmp_path / name).read_bytes())
        data[len(data) // 2] ^= 0xFF   # one flipped byte inside arr_0's data
        (tmp_path / name).write_bytes(bytes(data))
        with pytest.raises(ValueError, match=rf"{name}\['arr_0'\] is corrupt \((BadZipFile|error): "):
            evaluate(ref_path, tmp_path / name, StubFeatures(), **STUB)


@pytest.mark.parametrize("sigma, match", [
    (None, r"\['sigma'\] is corrupt \((BadZipFile|error): "),  # one flipped byte
    (np.full((2, 2), "x"), r"\['sigma'\] must hold real numbers, got dtype <U1"),
    (np.eye(2) * (1 + 1j), r"\['sigma'\] must hold real numbers, got dtype complex128"),  # was cast to real
    (np.array([[None, 1], [1, None]], dtype=object), r"\['sigma'\] must hold real numbers, got pickled objects"),
])
def test_damaged_or_non_numeric_statistics_name_themselves(tmp_path, sigma, match):
    """Precomputed mu / sigma (ADM reference batches) are read with the same one-line errors as arr_0."""
    from masked_dit.eval.evaluator import read_statistics

    path = tmp_path / "ref.npz"
    np.savez(path, mu=np.zeros(2), sigma=np.eye(64) if sigma is None else sigma)
    if sigma is None:
        data = bytearray(path.read_bytes())
        start = data.index(b"sigma.npy") + 2000  # inside sigma's 32 kB of data
        data[start] ^= 0xFF
        path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=match):
        read_statistics(path, dims=None)


@pytest.mark.parametrize("extra, match", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--device", "tpu:7"], "--device"),
    (["--random-init-inception", "--inception-weights", "w.pth"], "exclude each other"),
])
def test_cli_option_errors(batches, capsys, extra, match):
    ref_path, sample_path = batches[0], batches[1]
    assert cli.main([str(ref_path), str(sample_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err


def test_cli_out_never_replaces_a_runs_own_files(batches, tmp_path, capsys):
    """--out <run>/export/config.json replaced the export's config with metrics (sample then refused the
    run); an earlier evaluation's JSON in the run folder may still be written over."""
    run = tmp_path / "run"
    for name in ("config.json", "export/config.json", "checkpoints/step_00000002/meta.json"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("{}")
    for name in ("config.json", "export/config.json", "checkpoints/step_00000002/meta.json"):
        assert cli.main([str(batches[0]), str(batches[1]), "--out", str(run / name), "--random-init-inception"]) == 2
        assert capsys.readouterr().err.strip() == (f"masked-dit eval: error: --out {run / name} is a file of the run "
                                                   f"{run}: writing it would replace part of the run; name a new file")
        assert (run / name).read_text() == "{}"
    (run / "fid.json").write_text("{}")
    assert cli._run_owning(run / "fid.json") is None and cli._run_owning(run / "export" / "new.json") is None


def test_cli_cuda_index_beyond_the_visible_devices(batches, capsys, monkeypatch):
    # cuda:1 on a one-GPU machine used to fail inside the weights' .to(device) and be reported as
    # "--inception-weights None: not loadable Inception weights (RuntimeError: ... invalid device ordinal)"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.resolve_device("cuda:0") == torch.device("cuda:0")
    assert cli.main([str(batches[0]), str(batches[1]), "--device", "cuda:1", "--random-init-inception"]) == 2
    assert capsys.readouterr().err.strip() == ("masked-dit eval: error: --device cuda:1: only 1 CUDA device(s) "
                                               "are visible")


def test_cli_missing_files_fail_before_loading_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("masked_dit.eval.inception.load_fid_inception",
                        lambda *a, **k: pytest.fail("weights loaded before inputs were checked"))
    assert cli.main([str(tmp_path / "ref.npz"), str(tmp_path / "s.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"masked-dit eval: error: reference batch not found: {tmp_path / 'ref.npz'}"
    assert cli.main([str(tmp_path / "ref.npz"), str(tmp_path), "--inception-weights", "/no/such.pth"]) == 2


def test_cli_weights_file_not_found(batches, capsys):
    ref_path, sample_path = batches[0], batches[1]
    assert cli.main([str(ref_path), str(sample_path), "--inception-weights", "/no/such/w.pth"]) == 2
    assert "Inception weights not found: /no/such/w.pth" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# End to end with the real architecture (random weights)

@pytest.mark.slow
def test_cli_end_to_end_random_init_inception(tmp_path, capsys):
    # 4 images of 24x24 (resized to 299 inside), as .npz reference and a PNG folder of the same images:
    # FID/sFID ~ 0, precision = recall = 1 (with k = 3 every point of a 4-set covers the others)
    images = _images(4, 7, size=24)
    np.savez(tmp_path / "ref.npz", images)
    folder = _png_folder(tmp_path / "samples", images)
    out = tmp_path / "out" / "metrics.json"
    rc = cli.main([str(tmp_path / "ref.npz"), str(folder), "--random-init-inception", "--device", "cpu",
                   "--batch-size", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    for name in ("Inception Score:", "FID:", "sFID:", "Precision:", "Recall:"):
        assert name in printed
    metrics = json.loads(out.read_text())
    assert {"fid", "sfid", "inception_score", "precision", "recall", "num_samples", "num_reference",
            "reference_statistics", "inception", "preprocess"} <= set(metrics)
    assert abs(metrics["fid"]) < 1e-6 and abs(metrics["sfid"]) < 1e-6
    assert metrics["precision"] == 1.0 and metrics["recall"] == 1.0
    assert 1.0 <= metrics["inception_score"] <= 4.0   # at most the number of samples
    assert metrics["num_samples"] == metrics["num_reference"] == 4
    assert metrics["inception"] == "random-init (test only)"


def test_16bit_grayscale_samples_read_as_the_training_folders_do(tmp_path):
    """Sample folders read images through the training folders' to_rgb: PIL's convert("RGB") clipped
    16-bit grayscale ('I;16') values to 255, so such PNGs were scored as nearly white images."""
    from masked_dit.eval.evaluator import FolderImages

    g = np.random.default_rng(0)
    wide = g.integers(0, 65536, (3, 8, 8), dtype=np.uint16)
    folder = tmp_path / "s"
    folder.mkdir()
    for i, arr in enumerate(wide):
        Image.fromarray(arr).save(folder / f"{i}.png")
    assert Image.open(folder / "0.png").mode.startswith("I;16")
    got = np.concatenate(list(FolderImages(folder).batches(2)))
    assert got.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(got, np.repeat((wide >> 8).astype(np.uint8)[..., None], 3, axis=-1))


@pytest.mark.parametrize("sigma, match", [
    (np.diag([1.0, -0.5, 2.0]), r"'sigma' is not positive semi-definite \(eigenvalue -0\.5, largest 2\)"),
    (np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), r"'sigma' is not symmetric"),
])
def test_statistics_that_are_no_covariance_are_refused(tmp_path, sigma, match):
    """A non-PSD precomputed sigma (edited, or the wrong array) gave FID -1962.7 without a word."""
    from masked_dit.eval.evaluator import read_statistics

    np.savez(tmp_path / "ref.npz", mu=np.zeros(3), sigma=sigma)
    with pytest.raises(ValueError, match=match):
        read_statistics(tmp_path / "ref.npz", dims=None)
    # a rank-deficient covariance (fewer samples than features), stored in float32, is one
    x = np.random.default_rng(0).standard_normal((2, 3))
    np.savez(tmp_path / "ok.npz", mu=np.zeros(3), sigma=np.cov(x, rowvar=False).astype(np.float32))
    assert read_statistics(tmp_path / "ok.npz", dims=None)["fid"][1].shape == (3, 3)
