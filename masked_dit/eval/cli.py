"""``masked-dit eval REF_BATCH SAMPLE_BATCH``: FID, sFID, Inception Score, precision and recall.

Same inputs and metrics as ADM's ``evaluations/evaluator.py`` (see ``evaluator.py`` for the
layout and ``inception.py`` for how our PyTorch Inception differs from ADM's TF graph)::

    masked-dit eval VIRTUAL_imagenet256_labeled.npz samples_50000.npz --out metrics.json
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from pathlib import Path

import torch

from masked_dit.eval.inception import PREPROCESS_MODES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="masked-dit eval",
        description="FID, sFID, Inception Score, precision and recall of a sample batch against an "
                    "ADM reference batch (PyTorch port of ADM's TF Inception).")
    p.add_argument("ref_batch", help="reference .npz (ADM layout: 'arr_0' uint8 [N, H, W, 3]; "
                                     "precomputed 'mu','sigma','mu_s','sigma_s' are used when present), or "
                                     "'digits': the embedded data set's offline metric (class accuracy and "
                                     "feature Fréchet distance of a labelled sample .npz; no download)")
    p.add_argument("sample_batch", help="sample .npz ('arr_0' uint8 [N, H, W, 3] or grayscale [N, H, W, 1]) "
                                        "or a folder of PNG/JPEG/WebP/BMP/TIFF images")
    p.add_argument("--inception-weights", metavar="PATH", default=None,
                   help="local pt_inception-2015-12-05-6726825d.pth (default: download pytorch-fid's release "
                        "into the torch hub cache)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--batch-size", type=int, default=64, help="images per Inception forward (default 64, as ADM)")
    p.add_argument("--preprocess", choices=PREPROCESS_MODES, default="pytorch-fid",
                   help="input resize/scaling: pytorch-fid's (default) or TF1's legacy bilinear as in ADM's graph")
    p.add_argument("--out", metavar="JSON", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--random-init-inception", action="store_true",
                   help="FOR TESTS ONLY: a seeded random Inception instead of the real weights; "
                        "the numbers are meaningless")
    return p


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {name!r}") from None
    if device.type not in ("cpu", "cuda"):  # mps, meta, ...: nothing here runs there
        raise ValueError(f"--device {name}: use 'auto', 'cpu' or 'cuda[:N]'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available")
    # else "invalid device ordinal" surfaces later, reported as unloadable Inception weights
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.ref_batch == "digits":
        return _digits_main(args)
    from masked_dit.eval.evaluator import evaluate, open_batches
    from masked_dit.eval.inception import load_fid_inception

    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.random_init_inception and args.inception_weights:
            raise ValueError("--random-init-inception and --inception-weights exclude each other")
        if args.out:
            _check_out(Path(args.out))
        open_batches(args.ref_batch, args.sample_batch)  # bad input fails before weights load
        device = resolve_device(args.device)
        try:
            model = load_fid_inception(args.inception_weights, random_init=args.random_init_inception,
                                       device=device, preprocess=args.preprocess)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:  # a file that is not the weights
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"--inception-weights {args.inception_weights}: not loadable Inception weights "
                             f"({type(exc).__name__}: {detail})") from None
        metrics = evaluate(args.ref_batch, args.sample_batch, model, batch_size=args.batch_size, device=device,
                           progress=not args.no_progress)
    except (ValueError, OSError) as err:  # bad input or no weights: one line, no traceback
        print(f"masked-dit eval: error: {err}", file=sys.stderr)
        return 2
    metrics["inception"] = "random-init (test only)" if args.random_init_inception else "pytorch-fid 2015-12-05"
    metrics["preprocess"] = args.preprocess
    for name, key in (("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
                      ("Precision", "precision"), ("Recall", "recall")):
        print(f"{name}: {_fmt(metrics[key])}")
    return _write(args, metrics)


def _digits_main(args) -> int:
    """``masked-dit eval digits samples.npz``: the trainer's digits record for a sampled .npz (its
    labels in 'arr_1', as ``masked-dit sample`` writes them)."""
    import numpy as np

    from masked_dit.eval.digits import score_digits
    from masked_dit.eval.evaluator import NpzImages, _read_member

    try:
        if args.out:
            _check_out(Path(args.out))
        path = Path(args.sample_batch)
        if path.suffix != ".npz" or not path.is_file():
            raise ValueError(f"{path}: the digits metric scores a sample .npz with its labels (masked-dit sample "
                             f"--out NAME.npz)")
        images = NpzImages(path)  # uint8 [N, H, W, 1 or 3]; anything else (or damaged) is one line
        with np.load(path) as f:
            if "arr_1" not in f:
                raise ValueError(f"{path}: needs 'arr_0' images and 'arr_1' labels (has {sorted(f.keys())})")
            labels = _read_member(f, path, "arr_1")
        if labels.shape != (len(images),):
            raise ValueError(f"{path}: 'arr_1' must hold one label per image ({len(images)}), got shape "
                             f"{list(labels.shape)}")
        x = torch.from_numpy(np.concatenate(list(images.batches(4096)))).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        score = score_digits(x, torch.from_numpy(labels.astype(np.int64)))
    except (ValueError, OSError) as err:
        print(f"masked-dit eval: error: {err}", file=sys.stderr)
        return 2
    metrics = {**score.as_dict(), "num_samples": len(images)}
    print(f"Digits class accuracy: {_fmt(metrics['digits_cond_acc'])}")
    print(f"Digits feature FD: {_fmt(metrics['digits_fd'])}")
    return _write(args, metrics)


def _write(args, metrics: dict) -> int:
    if args.out:
        try:
            Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
        except OSError as err:  # the metrics are printed above: nothing is lost
            print(f"masked-dit eval: error: --out {args.out}: cannot write ({err.strerror or err})", file=sys.stderr)
            return 2
        print(f"wrote {args.out}")
    return 0


def _check_out(out: Path) -> None:
    """--out is a .json file (so never an input batch: .npz or a folder) in a folder that exists or can
    be made: found before the evaluation, not after it."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; name a .json file")
    if out.suffix != ".json":
        raise ValueError(f"--out {out}: must end in .json (the metrics are JSON)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out {out}: cannot create its folder ({err.strerror or err})") from None
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"--out {out}: its folder is not writable")
    run = _run_owning(out)
    if run is not None:
        raise ValueError(f"--out {out} is a file of the run {run}: writing it would replace part of the run; "
                         f"name a new file")


def _run_owning(out: Path) -> Path | None:
    """The run folder whose own file ``out`` is (its config.json, or anything in export/ or checkpoints/),
    if ``out`` exists; an earlier evaluation's JSON kept in a run folder may be written over."""
    if not out.is_file():
        return None
    for run in list(out.resolve().parents)[:3]:  # run/checkpoints/step_N/file is three levels down
        if (run / "config.json").is_file() and ((run / "checkpoints").is_dir() or (run / "export").is_dir()):
            rel = out.resolve().relative_to(run).parts
            return run if rel == ("config.json",) or rel[0] in ("export", "checkpoints") else None
    return None


if __name__ == "__main__":
    sys.exit(main())
