"""Shard files of an extraction (VAE latents, encoder features): atomic writes, resume, torchrun.

One process, or the ranks of a torchrun job, each encoding every ``size``-th missing shard. Rank 0
records finished shards in the manifest itself, every other rank in ``manifest.rank<r>.json`` beside
it (one writer per file: no two ranks share a temporary name). A resumed run, with any number of
ranks, takes the union of those records; the last step merges them into the complete manifest.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch


def save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    """``np.save`` to a temporary name, then rename: a kill leaves the old file or none, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def write_json_atomic(path: Path, manifest: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)


def read_own_manifest(path: Path) -> dict:
    """The manifest a resumed run wrote itself; one line naming it when damaged (a copy cut short,
    a hand edit): JSON's own message named no file, and a missing 'shards' was a KeyError."""
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): delete the folder's files or use a new output "
                         "folder") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ValueError(f"{path} lists no shards (not one this tool wrote): delete the folder's files or use a "
                         "new output folder")
    return manifest


class ShardProgress:
    """The finished shards of one extraction folder, kept over ranks, kills and resumes.

    ``old``: the folder's manifest when it matched this run's settings (the caller checks), else None:
    a fresh start, whose stale per-rank records (of a run that never wrote a manifest) are removed.
    ``world``: a ``masked_dit.train.dist.World`` under torchrun, else None.
    """

    def __init__(self, manifest_path: Path, old: dict | None, world=None):
        self.path, self.out = Path(manifest_path), Path(manifest_path).parent
        self.rank, self.size = (world.rank, world.size) if world is not None else (0, 1)
        self.shards = self._finished(old["shards"] + self._rank_records()) if old else []
        self._barrier()  # every rank has read the records before rank 0 removes stale ones
        if self.rank == 0 and not old:
            for p in self._rank_files():
                p.unlink(missing_ok=True)
        self._barrier()

    @property
    def done(self) -> set[int]:
        return {s["index"] for s in self.shards}

    def share(self, todo: list) -> list:
        """This rank's part of the shards still to do."""
        return todo[self.rank::self.size]

    def progress_bar(self, desc: str, todo: list):
        """A tqdm bar over ``todo`` (this rank's share) on rank 0, else None; one process counts the
        shards done before from the start, as a resumed run's bar does."""
        if self.rank != 0:
            return None
        from tqdm import tqdm

        before = len(self.done) if self.size == 1 else 0
        desc += f" (rank 0 of {self.size})" if self.size > 1 else ""
        return tqdm(total=len(todo) + before, initial=before, desc=desc, unit="shard")

    def add(self, entry: dict, header: dict) -> None:
        """Records a finished shard (its files written): rank 0 in the manifest (with ``header``)."""
        self.shards = self._finished(self.shards + [entry])
        if self.rank == 0:
            write_json_atomic(self.path, {**header, "shards": self.shards})
        else:
            write_json_atomic(self._rank_file(self.rank), {"shards": self.shards})

    def finish(self, header, num_shards: int) -> dict:
        """After every rank's share: the complete manifest (written by rank 0, read by all).
        ``header(shards)``: the manifest's other fields, which may depend on every rank's shards."""
        self._barrier()
        if self.rank == 0:
            shards = self._finished(self.shards + self._rank_records())
            missing = sorted(set(range(num_shards)) - {s["index"] for s in shards})
            if missing:
                raise ValueError(f"{self.out}: shards {missing[:8]} were not written by any rank; re-run to finish")
            write_json_atomic(self.path, {**header(shards), "shards": shards, "complete": True})
            for p in self._rank_files():
                p.unlink(missing_ok=True)
        self._barrier()
        return json.loads(self.path.read_text())

    def _finished(self, records: list[dict]) -> list[dict]:
        """One record per index, those whose files are all there, in index order."""
        by_index = {s["index"]: s for s in records if all((self.out / f).exists() for f in s["files"].values())}
        return [by_index[i] for i in sorted(by_index)]

    def _rank_records(self) -> list[dict]:
        """The shards the other ranks recorded (``manifest.rank<r>.json``)."""
        return [s for p in self._rank_files() for s in read_own_manifest(p)["shards"]]

    def _rank_file(self, rank: int) -> Path:
        return self.path.with_name(f"{self.path.stem}.rank{rank}.json")

    def _rank_files(self) -> list[Path]:
        return sorted(self.out.glob(f"{self.path.stem}.rank*.json"))

    def _barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()
