"""Hand-edited manifests and damaged shards of extracted latents and cached encoder features: one-line
errors naming the file, when the dataset is built, not a KeyError/IndexError (or a silently skipped
step) somewhere in training."""
import json
import re

import numpy as np
import pytest
import torch

from masked_dit.data import LatentDataset, extract_latents
from masked_dit.data.encoders import EncoderFeatureDataset, EncoderFeatures, extract_encoder_features
from tests.data.tiny_data import PoolEncoder as _PoolEncoder, PoolVAE as _PoolVAE, TensorImages as _Images








@pytest.fixture()
def latents(tmp_path):
    """Latents of 6 images in shards of 4 + 2, with flips, and their 'pool' features."""
    out = tmp_path / "lat"
    extract_latents(_Images(), out, _PoolVAE(), shard_size=4, batch_size=2, flip=True, progress=False)
    extract_encoder_features(_Images(), out, EncoderFeatures(_PoolEncoder()), name="pool", batch_size=2,
                             progress=False)
    return out


def _edit(path, change):
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _drop_flips(manifest):
    for shard in manifest["shards"]:
        shard["files"].pop("flip_mean"), shard["files"].pop("flip_std")


@pytest.mark.parametrize("change, words", [
    (lambda m: m.pop("num_images"), " is not one extract-latents wrote (bad or missing 'num_images')"),
    (lambda m: m.update(num_images=100), ": its shards hold 6 images but num_images is 100"),
    (lambda m: m.update(shards=m["shards"][:1]), ": its shards hold 4 images but num_images is 6"),
    (lambda m: m["shards"][1].update(start=0), ": shard 1 starts at row 0, expected 4"),
    (lambda m: m["shards"][0].pop("files"), ": shard 0 needs an integer start and count and a dict of files"),
    (lambda m: m["shards"][1].pop("count"), ": shard 1 needs an integer start and count and a dict of files"),
    (lambda m: m["shards"][0].update(files={}), ": shard 0 lists no mean file"),
    (_drop_flips, ": shard 0 lists no flip_mean file"),  # flip: true, as if extracted without --flip
], ids=["no-num_images", "num_images-100", "one-shard", "start-0", "no-files", "no-count", "files-empty",
        "flip-without-files"])
def test_inconsistent_latents_manifest_is_a_one_line_error(latents, change, words):
    """Each edit built a dataset that failed later: a KeyError in len(), an IndexError at some step."""
    _edit(latents / "manifest.json", change)
    with pytest.raises(ValueError, match=re.escape(f"latents {latents}: manifest.json{words}")) as err:
        LatentDataset(latents)
    assert "\n" not in str(err.value)


def _truncate(path, size):
    path.write_bytes(path.read_bytes()[:size])


@pytest.mark.parametrize("damage, words", [
    (lambda d: _truncate(d / "shard_00000.npy", 90), "shard file shard_00000.npy is truncated or not a .npy array"),
    (lambda d: _truncate(d / "shard_00001.flip.npy", 200),
     "shard file shard_00001.flip.npy is truncated or not a .npy array"),
    (lambda d: (d / "shard_00001.npy").unlink(), "shard file shard_00001.npy is missing"),
    (lambda d: np.save(d / "shard_00001.npy", np.zeros((2, 16, 2), np.float16)),
     "shard_00001.npy has shape [2, 16, 2], expected [2, 16, 3]"),
    (lambda d: _edit(d / "manifest.json", lambda m: m["shards"][1].update(start=3)),
     "manifest.json: shard 1 starts at row 3, expected 4"),
], ids=["truncated-header", "truncated-data", "missing", "wrong-shape", "start-3"])
def test_damaged_feature_shards_are_found_up_front(latents, damage, words):
    """A truncated shard was numpy's 'EOF: reading array header' naming no file, a missing one an Errno 2
    at the first step: the shards are checked as the latents' are, when the dataset is built."""
    features = latents / "features" / "pool"
    damage(features)
    with pytest.raises(ValueError, match=re.escape(f"features {features}: {words}")) as err:
        EncoderFeatureDataset(features)
    assert "\n" not in str(err.value)


def test_non_finite_features_stop_training_naming_the_file(latents, tmp_path):
    """NaN features made every step non-finite and skipped: the run exited 0 with its initial weights."""
    from masked_dit.train import train
    from tests.train.tiny import tiny_config

    features = latents / "features" / "pool"
    z = np.load(features / "shard_00000.npy")
    z[1, 5] = np.nan
    np.save(features / "shard_00000.npy", z)
    ds = EncoderFeatureDataset(features)
    assert torch.isfinite(ds[0]).all() and torch.isfinite(ds[(1, True)]).all()  # only the plain row 1 is NaN
    with pytest.raises(ValueError, match=re.escape(f"features {features}: non-finite values in shard_00000.npy "
                                                   "row 1")):
        ds[1]
    cfg = tiny_config("digits-repa-sit", tmp_path, **{
        "data.source": "latents", "data.path": str(latents), "data.features": "pool", "data.random_flip": False,
        "model.in_channels": 3, "model.input_size": 8, "model.num_classes": 2, "model.patch_size": 2,
        "train.global_batch": 6, "train.steps": 2, "objective.encoder": "none"})
    with pytest.raises(ValueError, match="non-finite values in shard_00000.npy row 1"):
        train(cfg)


def test_feature_settings_mismatch_names_the_cli_option(latents):
    with pytest.raises(ValueError, match=r"different settings \(dtype\); pass another --name$"):
        extract_encoder_features(_Images(), latents, EncoderFeatures(_PoolEncoder()), name="pool", batch_size=2,
                                 dtype="float32", progress=False)
