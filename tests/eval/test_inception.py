"""FID Inception-V3 port (architecture, checkpoint names, outputs) and ADM's Inception Score."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from masked_dit.eval import inception as inc
from masked_dit.eval.evaluator import inception_score
from masked_dit.eval.inception import FIDInceptionV3, load_fid_inception, preprocess_images


# -----------------------------------------------------------------------------
# Inception Score

def test_is_of_uniform_predictions_is_one():
    assert inception_score(np.zeros((20, 1008))) == pytest.approx(1.0, abs=1e-12)


def test_is_of_confident_diverse_predictions_is_number_of_classes():
    logits = np.full((30, 1008), -1e4)
    logits[np.arange(30), np.arange(30) % 10] = 0.0   # one-hot over 10 classes, 3 samples each
    assert inception_score(logits) == pytest.approx(10.0, rel=1e-12)


def test_is_of_confident_single_class_is_one():
    logits = np.full((12, 1008), -1e4)
    logits[:, 7] = 0.0
    assert inception_score(logits) == pytest.approx(1.0, abs=1e-12)


def test_is_averages_over_splits_including_a_short_last_one():
    logits = np.full((12, 1008), -1e4)
    logits[np.arange(5), np.arange(5)] = 0.0   # split 1: 5 classes -> 5
    logits[5:10, 3] = 0.0                      # split 2: one class -> 1
    logits[10, 0] = logits[11, 1] = 0.0        # split 3 (2 samples, 2 classes) -> 2
    assert inception_score(logits, split_size=5) == pytest.approx((5 + 1 + 2) / 3, rel=1e-12)


def test_is_matches_adm_formula_on_random_logits():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((64, 1008)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, 64, 25):   # ADM: part * (log(part) - log(mean(part, 0)))
        part = p[i:i + 25]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    assert inception_score(logits, split_size=25) == pytest.approx(np.mean(scores), rel=1e-12)


def test_is_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"logits \[N > 0, C\]"):
        inception_score(np.zeros(10))


def test_is_rejects_non_finite_logits_and_bad_split_size():
    # NaN probabilities failed the "p > 0" test of the 0 * log 0 rule and counted as 0: IS = 1.0
    logits = np.zeros((6, 10))
    logits[2, 4] = np.nan
    with pytest.raises(ValueError, match=r"non-finite value\(s\) \(first in row 2\)"):
        inception_score(logits)
    with pytest.raises(ValueError, match="split_size must be >= 1"):
        inception_score(np.zeros((6, 10)), split_size=0)


# -----------------------------------------------------------------------------
# Architecture and checkpoint names (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)

_CONV_BN = ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
_BRANCHES = {
    "A": ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3",
          "branch_pool"],
    "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    "C": ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2",
          "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"],
    "D": ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"],
    "E": ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"],
}
_BLOCKS = [("Mixed_5b", "A"), ("Mixed_5c", "A"), ("Mixed_5d", "A"), ("Mixed_6a", "B"), ("Mixed_6b", "C"),
           ("Mixed_6c", "C"), ("Mixed_6d", "C"), ("Mixed_6e", "C"), ("Mixed_7a", "D"), ("Mixed_7b", "E"),
           ("Mixed_7c", "E")]


def expected_checkpoint_keys() -> list[str]:
    """Key names of the TF-converted checkpoint: torchvision Inception3 names, no AuxLogits, no
    num_batches_tracked (TF has no such counter)."""
    convs = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    convs += [f"{block}.{branch}" for block, kind in _BLOCKS for branch in _BRANCHES[kind]]
    return [f"{c}.{p}" for c in convs for p in _CONV_BN] + ["fc.weight", "fc.bias"]


@pytest.fixture(scope="module")
def random_model():
    return load_fid_inception(random_init=True)


def test_checkpoint_keys_and_size(random_model):
    keys = [k for k in random_model.state_dict() if not k.endswith("num_batches_tracked")]
    assert sorted(keys) == sorted(expected_checkpoint_keys())
    # torchvision's inception_v3 has 27,161,264 parameters; minus AuxLogits (3,326,696), plus 8 extra
    # classes (8 * 2049) for the 2015 graph's 1008-way classifier
    assert sum(p.numel() for p in random_model.parameters()) == 27_161_264 - 3_326_696 + 8 * 2049
    sd = random_model.state_dict()
    known_shapes = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "fc.weight": (1008, 2048), "fc.bias": (1008,),
                    "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1),
                    "Mixed_6d.branch7x7_2.conv.weight": (160, 160, 1, 7),
                    "Mixed_6e.branch7x7dbl_2.conv.weight": (192, 192, 7, 1),
                    "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
                    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
                    "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1)}
    for name, shape in known_shapes.items():
        assert tuple(sd[name].shape) == shape, name


def test_checkpoint_with_pytorch_fid_names_loads_strict(tmp_path):
    reference = FIDInceptionV3()
    g = torch.Generator().manual_seed(1)
    shapes = reference.state_dict()
    state_dict = {k: torch.randn(shapes[k].shape, generator=g) for k in expected_checkpoint_keys()}
    for k in state_dict:
        if k.endswith("running_var"):
            state_dict[k] = state_dict[k].abs() + 0.5
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state_dict, path)
    model = load_fid_inception(path)
    loaded = model.state_dict()
    for k, v in state_dict.items():
        assert torch.equal(loaded[k], v), k
    assert not model.training and not any(p.requires_grad for p in model.parameters())

    # a key too many or too few is an error, not a silent partial load
    extra = dict(state_dict, **{"AuxLogits.fc.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected.*AuxLogits"):
        inc.load_inception_state_dict(FIDInceptionV3(), extra)
    missing = {k: v for k, v in state_dict.items() if k != "Mixed_6d.branch1x1.conv.weight"}
    with pytest.raises(ValueError, match="missing.*Mixed_6d.branch1x1.conv.weight"):
        inc.load_inception_state_dict(FIDInceptionV3(), missing)


def test_default_weights_come_from_pytorch_fid_release(monkeypatch):
    calls = []

    def fake_download(url, **kwargs):
        calls.append(url)
        return {k: v for k, v in FIDInceptionV3().state_dict().items() if not k.endswith("num_batches_tracked")}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    load_fid_inception()
    assert calls == ["https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                     "pt_inception-2015-12-05-6726825d.pth"]

    def offline(url, **kwargs):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(OSError, match="--inception-weights"):
        load_fid_inception()


def test_missing_weights_file_and_conflicting_options(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_fid_inception(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="not both"):
        load_fid_inception(tmp_path / "nope.pth", random_init=True)
    with pytest.raises(ValueError, match="preprocess"):
        FIDInceptionV3(preprocess="clean-fid")


# -----------------------------------------------------------------------------
# Block quirks of the 2015 graph

def test_block_pools_follow_the_tf_graph(random_model):
    # average pools ignore padding (TF), so a constant map stays constant at the borders
    ones = torch.ones(1, 2, 5, 5)
    assert torch.equal(inc._tf_avg_pool(ones), ones)
    assert random_model.Mixed_7b.pool == "avg" and random_model.Mixed_7c.pool == "max"
    block = inc.InceptionE(4, pool="max").eval()
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        out_max = block(x)
        block.pool = "avg"
        out_avg = block(x)
    # only the pool branch (last 192 channels) differs
    torch.testing.assert_close(out_max[:, :-192], out_avg[:, :-192])
    assert not torch.allclose(out_max[:, -192:], out_avg[:, -192:])


# -----------------------------------------------------------------------------
# Preprocessing

def test_pytorch_fid_preprocessing():
    x = torch.randint(0, 256, (2, 3, 40, 56), dtype=torch.uint8)
    expected = 2 * F.interpolate(x.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
    torch.testing.assert_close(preprocess_images(x, "pytorch-fid"), expected)
    full = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)
    torch.testing.assert_close(preprocess_images(full), full.float() / 255 * 2 - 1)


def _tf_legacy_bilinear_numpy(img: np.ndarray, out: int) -> np.ndarray:
    """TF1 ResizeBilinear(align_corners=False, half_pixel_centers=False) on HxW, float64."""
    h, w = img.shape

    def axis(n):
        src = np.arange(out) * (n / out)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n - 1), src - lo

    y0, y1, dy = axis(h)
    x0, x1, dx = axis(w)
    top = img[y0][:, x0] * (1 - dx) + img[y0][:, x1] * dx
    bottom = img[y1][:, x0] * (1 - dx) + img[y1][:, x1] * dx
    return top * (1 - dy[:, None]) + bottom * dy[:, None]


def test_tf_preprocessing_matches_legacy_resize_and_scaling():
    x = torch.randint(0, 256, (1, 3, 37, 50), dtype=torch.uint8)
    got = preprocess_images(x, "tf").double().numpy()
    for c in range(3):
        expected = (_tf_legacy_bilinear_numpy(x[0, c].double().numpy(), 299) - 128) / 128
        np.testing.assert_allclose(got[0, c], expected, atol=2e-5)
    full = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)
    torch.testing.assert_close(preprocess_images(full, "tf"), (full.float() - 128) / 128)


def test_preprocessing_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        preprocess_images(torch.zeros(2, 64, 64, 3))


# -----------------------------------------------------------------------------
# Outputs: pool_3, mixed_6/conv (7 channels, NHWC order), logits without bias

@pytest.mark.slow
def test_forward_outputs_match_the_tf_tensors_adm_reads(random_model):
    with torch.no_grad():
        random_model.fc.bias.normal_()  # ADM's IS logits ignore the bias: make it matter
    captured = {}
    hooks = [getattr(random_model, name).register_forward_hook(
        lambda mod, inp, out, name=name: captured.__setitem__(name, out[0] if isinstance(out, tuple) else out))
        for name in ("Mixed_6d", "Mixed_7c")]
    hooks.append(random_model.Mixed_6d.branch1x1.register_forward_hook(
        lambda mod, inp, out: captured.__setitem__("mixed_6/conv", out)))
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    try:
        with torch.inference_mode():
            out = random_model(x)
    finally:
        for h in hooks:
            h.remove()
    assert captured["Mixed_6d"].shape == (2, 768, 17, 17)
    assert captured["Mixed_7c"].shape == (2, 2048, 8, 8)
    assert out.pool.shape == (2, 2048) and out.spatial.shape == (2, 2023) and out.logits.shape == (2, 1008)
    torch.testing.assert_close(out.pool, captured["Mixed_7c"].mean(dim=(2, 3)))
    conv = captured["mixed_6/conv"]
    assert conv.shape == (2, 192, 17, 17) and (conv >= 0).all()   # after BN + ReLU
    # TF NHWC: spatial[b, (h * 17 + w) * 7 + c] = conv[b, c, h, w]
    spatial = out.spatial.reshape(2, 17, 17, 7)
    torch.testing.assert_close(spatial[:, 4, 9, 2], conv[:, 2, 4, 9])
    torch.testing.assert_close(out.spatial, conv[:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    torch.testing.assert_close(out.logits, out.pool @ random_model.fc.weight.T)
    # features are informative (not collapsed) for a random network with He init
    assert out.pool.std() > 1e-2 and (out.pool[0] - out.pool[1]).abs().max() > 1e-3


@pytest.mark.gpu
def test_cuda_features_match_cpu_without_tf32(random_model):
    import copy

    from masked_dit.eval.prdc import no_tf32

    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        cpu = random_model(x)
        with no_tf32():
            cuda = copy.deepcopy(random_model).cuda()(x.cuda())
    for name in ("pool", "spatial", "logits"):
        torch.testing.assert_close(getattr(cuda, name).cpu(), getattr(cpu, name), rtol=1e-4, atol=1e-4)
