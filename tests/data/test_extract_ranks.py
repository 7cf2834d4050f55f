"""extract-latents / extract-features under torchrun: each rank encodes every world-size-th missing shard
(no two ranks write one file), and a folder left by a run of any world size resumes under another."""
import json
import os
import subprocess
import sys
from pathlib import Path

import diffusers  # noqa: F401 - CI installs it (the "vae" extra): these tests require it

from masked_dit.data import ImageFolderDataset, extract_latents
from tests.data.test_encoders import _PoolVAE
from tests.data.tiny_data import save_tiny_vae, write_image_folder

REPO = Path(__file__).resolve().parents[2]

# Latents through the CLI, then features through the library, in one process or under torchrun.
_SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from masked_dit.cli import main
from masked_dit.data import ImageFolderDataset
from masked_dit.data.encoders import EncoderFeatures, extract_encoder_features
from masked_dit.train.dist import init_world, shutdown
from tests.data.test_latents import _PoolEncoder
images, out, vae = sys.argv[1:4]
world = init_world("cpu")  # one process group for both (the CLI uses it and leaves it up)
assert main(["extract-latents", images, out, "--vae", vae, "--image-size", "16", "--flip", "--shard-size", "2",
             "--batch-size", "2", "--device", "cpu"]) == 0
extract_encoder_features(ImageFolderDataset(images, 16), out, EncoderFeatures(_PoolEncoder()), name="pool",
                         batch_size=2, dtype="float32", progress=False, world=world)
shutdown(world)
"""


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_ranks_write_what_one_process_writes(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=5)  # 10 images: 5 shards, 3 + 2 per rank
    vae = save_tiny_vae(tmp_path / "vae")
    script = tmp_path / "extract.py"
    script.write_text(_SCRIPT.format(repo=str(REPO)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    one = subprocess.run([sys.executable, str(script), str(images), str(tmp_path / "one"), str(vae)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script), str(images), str(tmp_path / "two"), str(vae)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("10 images -> ") == 1  # rank 0 reports
    a, b = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert sorted(a) == sorted(b) and "features/pool/manifest.json" in a  # no per-rank records left
    assert len([k for k in a if k.endswith(".npy")]) == 5 * 5 + 5 * 2
    for name in a:
        assert a[name] == b[name], name


def _killed_two_rank_run(out: Path, ds, vae) -> dict:
    """The folder a 2-rank run leaves when killed: rank 0 recorded shard 0 in the manifest, rank 1 shard 1
    in manifest.rank1.json, shard 2 was never written."""
    full = extract_latents(ds, out, vae, shard_size=2, batch_size=2, progress=False)
    first, second, third = full["shards"]
    header = {k: v for k, v in full.items() if k not in ("shards", "complete")}
    (out / "manifest.json").write_text(json.dumps({**header, "shards": [first]}))
    (out / "manifest.rank1.json").write_text(json.dumps({"shards": [first, second]}))
    for name in third["files"].values():
        (out / name).unlink()
    return full


def test_a_killed_two_rank_run_resumes_in_one_process(tmp_path):
    ds, vae, out = ImageFolderDataset(str(write_image_folder(tmp_path / "images")), 16), _PoolVAE(), tmp_path / "lat"
    full = _killed_two_rank_run(out, ds, vae)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_0000[01].*")}
    resumed = extract_latents(ds, out, vae, shard_size=2, batch_size=2, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard_0000[01].*")} == stamps  # rank 1's work kept
    assert resumed == full and not (out / "manifest.rank1.json").exists()


def test_a_fresh_start_drops_the_records_of_a_run_without_manifest(tmp_path):
    """No manifest: the rank records are of a run whose settings nobody knows; its shards are redone."""
    ds, vae, out = ImageFolderDataset(str(write_image_folder(tmp_path / "images")), 16), _PoolVAE(), tmp_path / "lat"
    full = _killed_two_rank_run(out, ds, vae)
    (out / "manifest.json").unlink()
    stamp = (out / "shard_00001.mean.npy").stat().st_mtime_ns
    os.utime(out / "shard_00001.mean.npy", ns=(stamp - 10**9, stamp - 10**9))
    assert extract_latents(ds, out, vae, shard_size=2, batch_size=2, progress=False) == full
    assert (out / "shard_00001.mean.npy").stat().st_mtime_ns != stamp - 10**9
    assert not (out / "manifest.rank1.json").exists()


def test_a_device_index_under_torchrun_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from masked_dit.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["extract-latents", str(tmp_path), str(tmp_path / "o"), "--device", "cuda:1"]) == 2
    assert capsys.readouterr().err.strip() == ("masked-dit extract-latents: error: --device cuda:1: under torchrun "
                                               "each rank takes the GPU of its LOCAL_RANK; pass --device cuda (or "
                                               "auto, cpu)")
