"""Markdown tables and an MFU plot from the benchmark JSON files.

    python benchmarks/report.py                                   # tables to stdout, plot to results/mfu.png
    python benchmarks/report.py --results benchmarks/results --out benchmarks/RESULTS.md --plot mfu.png

Reads every ``train_step-*.json`` and ``sampling-*.json`` under ``--results``. The training table
gives img/s, TFLOP/s, MFU against the datasheet peak and against the measured GEMM ceiling (each
column names its peak), peak memory and the speed-up over the reference-style step; the sampling
table gives img/s and the speed-up over eager. ``reference`` is the official recipe (its precision),
``reference_bf16`` the same code at our precision: the two ratios separate precision from code. The plot shows MFU (datasheet peak) per model and
variant for each training file, with the MFU targets as dashed lines; files without a peak (CPU
runs) are plotted as img/s instead. A headline table comes first: per model the fastest of our
variants against the reference step (target >= 1.5x) and its MFU target (DiT-XL/2 50%, MaskDiT-/
MDTv2-XL/2 45%, datasheet peak), and DiT-XL/2 250-step sampling against 4 img/s. Sampling rows of a
shortened run (``--steps``) show img/s of the steps that ran and, marked as an estimate, at the
published steps; the training table flags rows that compiled while timing, hit the recompile limit,
broke graphs or backed off their batch.

``--readme README.md`` also rewrites the part of the README between the ``README_BEGIN`` and
``README_END`` markers: the headline table, the plot and a pointer to the full tables (``--out``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR

MFU_TARGETS = (50.0, 45.0)  # % of the datasheet bf16 peak (DiT-XL/2; MaskDiT-XL/2 and MDTv2-XL/2)
# The issue's targets: MFU (datasheet bf16 peak) per model, >= 1.5x the reference-style step for every
# family, and DiT-XL/2 250-step DDPM + CFG sampling >= 4 img/s.
MFU_TARGET = {"DiT-XL/2": 0.50, "MaskDiT-XL/2": 0.45, "MDTv2-XL/2": 0.45}
SPEEDUP_TARGET = 1.5
SAMPLING_TARGET = ("dit_ddpm250_cfg", "DiT-XL/2", 4.0)
README_BEGIN = "<!-- benchmark-results:begin (benchmarks/report.py --readme writes this part) -->"
README_END = "<!-- benchmark-results:end -->"
NO_GPU_RESULTS = ("No GPU numbers yet: no GPU has been lent to this project's sessions so far "
                  "(`benchmarks/NOTES.md` has the runbook for the first one; `benchmarks/gpu_session.sh` runs "
                  "it stage by stage).")
TRAIN_VARIANTS = ("reference", "reference_bf16", "eager", "eager_fused", "compiled", "compiled_fused",
                  "compiled_fused_mlp", "compiled_fused_fsdp")


def load_results(results_dir: str | Path) -> list[dict]:
    """Every benchmark JSON in ``results_dir`` and its sub-folders (``gpu_session.sh`` writes to
    ``results/session-<date>/``), sorted by path, with its path under '_path'. A file whose exact
    content was already read (a copy in another folder) is read once."""
    out, seen = [], set()
    for path in sorted(Path(results_dir).rglob("*.json")):
        text = path.read_text()
        if text in seen:
            continue
        seen.add(text)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(data, dict) or data.get("kind") not in ("train_step", "sampling"):
            continue  # another tool's file
        data["_path"] = str(path)
        out.append(data)
    return out


def _ratio(row: dict, rows: list[dict], field: str, base_variant: str, keys) -> float | None:
    """``row[field]``, else img/s over the ``base_variant`` row with the same ``keys`` (rows merged
    from separate runs of the day have no stored ratio)."""
    if row.get(field) is not None:
        return row[field]
    base = next((r for r in rows if r.get("variant") == base_variant and r.get("status") == "ok"
                 and all(r.get(k) == row.get(k) for k in keys)), None)
    return row["img_per_s"] / base["img_per_s"] if base else None


def _f(value, fmt: str, scale: float | None = None) -> str:
    if value is None:
        return "–"
    return format(value * scale if scale is not None else value, fmt)


def _header(run: dict) -> str:
    peaks = run.get("peaks") or {}
    peak = (f"datasheet {peaks['datasheet_tflops']:g} TFLOP/s, measured GEMM "
            f"{_f(peaks.get('measured_gemm_tflops'), 'g')} TFLOP/s") if peaks.get("datasheet_tflops") else "no peak (CPU)"
    return (f"**{run['device']}** — torch {run['torch']}, triton {run.get('triton')}, commit "
            f"`{(run.get('commit') or '?')[:12]}`, {run['date']}; bf16 peaks: {peak}")


def train_table(run: dict) -> str:
    lines = [_header(run), "",
             "| model | variant | batch | img/s | TFLOP/s | MFU (datasheet) | MFU (GEMM ceiling) | peak mem (GiB) "
             "| × reference | × reference bf16 | flags |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in run["results"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {r['variant']} | | {r.get('status')}: {r.get('reason', '')} | | | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['img_per_s']:.1f} | "
                     f"{_f(r.get('tflops'), '.1f')} | {_f(r.get('mfu_datasheet'), '.1f', 100)}"
                     f"{'%' if r.get('mfu_datasheet') is not None else ''} | "
                     f"{_f(r.get('mfu_measured_gemm'), '.1f', 100)}{'%' if r.get('mfu_measured_gemm') is not None else ''}"
                     f" | {_f(r.get('peak_mem_gib'), '.1f')} | "
                     f"{_f(_ratio(r, run['results'], 'speedup_vs_reference', 'reference', ('model',)), '.2f')} | "
                     f"{_f(_ratio(r, run['results'], 'speedup_vs_reference_bf16', 'reference_bf16', ('model',)), '.2f')} | "
                     f"{train_flags(r)} |")
    return "\n".join(lines)


def train_flags(r: dict) -> str:
    """What makes a row's number suspect: compiles inside the timed loop, recompile-limit hits
    (blocks fell back to eager), graph breaks, or a batch backed off after an out-of-memory."""
    flags = []
    dyn = r.get("dynamo") or {}
    if dyn.get("compiled_while_timing"):
        flags.append(f"{dyn['compiled_while_timing']} graph(s) compiled while timing")
    if dyn.get("recompile_limit_hits"):
        flags.append(f"{dyn['recompile_limit_hits']} recompile-limit hit(s)")
    if dyn.get("graph_breaks"):
        flags.append(f"{dyn['graph_breaks']} graph break(s)")
    if r.get("backed_off"):
        flags.append("batch backed off after OOM")
    return "; ".join(flags)


def sampling_table(run: dict) -> str:
    """img/s and s / batch are of the steps that ran (``steps``); when fewer than the sampler's
    published steps ran, the last column gives the linear estimate at the published count, marked
    'est.', and img/s is never shown under the published count alone."""
    lines = [_header(run), "",
             "| sampler | model | batch | variant | steps run | NFE | img/s (steps run) | s / batch | "
             "img/s at published steps | × eager |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in run["results"]:
        steps = r.get("steps")
        if r.get("status") != "ok":
            lines.append(f"| {r['sampler']} | {r['model']} | {r['batch']} | {r['variant']} | {_f(steps, 'd')} | | "
                         f"{r.get('status')}: {r.get('reason', '')} | | | |")
            continue
        published = r.get("published_steps")
        if r.get("published_steps_estimate"):
            at_published = f"≈ {r['img_per_s_at_published_steps']:.2f} (est. from {steps} of {published})"
        elif published is not None and steps == published:
            at_published = f"{r['img_per_s']:.2f}"
        else:  # an older file without published_steps: unknown
            at_published = "–"
        keys = ("sampler", "model", "batch", "steps")
        lines.append(f"| {r['sampler']} | {r['model']} | {r['batch']} | {r['variant']} | {_f(steps, 'd')} | "
                     f"{_f(r.get('nfe'), 'd')} | {r['img_per_s']:.2f} | {r['seconds_per_batch']:.2f} | {at_published} | "
                     f"{_f(_ratio(r, run['results'], 'speedup_vs_eager', 'eager', keys), '.2f')} |")
    return "\n".join(lines)


def _mark(ok: bool | None) -> str:
    return "–" if ok is None else ("yes" if ok else "**no**")


def headline_table(train: list[dict], sampling: list[dict]) -> str:
    """Per model of every GPU training file: the fastest of our variants against the reference-style
    step (the headline ratio) and the MFU target; then DiT-XL/2 sampling against 4 img/s (a
    shortened run counts by its estimate at 250 steps, marked). CPU files (no peak) are left out."""
    lines = ["| device | model | best variant | img/s | MFU (datasheet) | MFU target met | reference img/s | "
             "× reference | ≥ 1.5× |", "|---|---|---|---:|---:|---|---:|---:|---|"]
    for run in train:
        if not (run.get("peaks") or {}).get("datasheet_tflops"):
            continue
        ok = [r for r in run["results"] if r.get("status") == "ok"]
        for model in dict.fromkeys(r["model"] for r in ok):
            ours = [r for r in ok if r["model"] == model and not r["variant"].startswith("reference")]
            ref = next((r for r in ok if r["model"] == model and r["variant"] == "reference"), None)
            if not ours:
                continue
            best = max(ours, key=lambda r: r["img_per_s"])
            ratio = best["img_per_s"] / ref["img_per_s"] if ref else None
            target = MFU_TARGET.get(model)
            mfu = best.get("mfu_datasheet")
            met = None if target is None or mfu is None else mfu >= target
            lines.append(f"| {run['device']} | {model} | {best['variant']} | {best['img_per_s']:.1f} | "
                         f"{_f(mfu, '.1f', 100)}{'%' if mfu is not None else ''}"
                         f"{f' (target {100 * target:.0f}%)' if target else ''} | {_mark(met)} | "
                         f"{_f(ref['img_per_s'] if ref else None, '.1f')} | {_f(ratio, '.2f')} | "
                         f"{_mark(None if ratio is None else ratio >= SPEEDUP_TARGET)} |")
    name, model, need = SAMPLING_TARGET
    for run in sampling:
        rows = [r for r in run["results"] if r.get("status") == "ok" and r["sampler"] == name and r["model"] == model]
        for batch in sorted({r["batch"] for r in rows}):
            def full(r):
                if r.get("published_steps_estimate"):
                    return r["img_per_s_at_published_steps"]
                return r["img_per_s"] if r.get("steps") == r.get("published_steps") else None
            cands = [r for r in rows if r["batch"] == batch and full(r) is not None]
            if not cands:
                continue
            best = max(cands, key=full)
            est = " (est. from {} of {} steps)".format(best["steps"], best["published_steps"]) \
                if best.get("published_steps_estimate") else ""
            lines.append(f"| {run['device']} | {model} sampling, 250-step DDPM + CFG, batch {batch} | "
                         f"{best['variant']} | {full(best):.2f}{est} | | {_mark(full(best) >= need)} (≥ {need:g} img/s) "
                         f"| | | |")
    return "\n".join(lines) if len(lines) > 2 else ""


def markdown(runs: list[dict]) -> str:
    parts = []
    train = [r for r in runs if r["kind"] == "train_step"]
    sampling = [r for r in runs if r["kind"] == "sampling"]
    head = headline_table(train, sampling)
    if head:
        parts.append("## Headline: targets\n")
        parts.append(head + "\n")
    if train:
        parts.append("## Training step\n")
        parts.extend(train_table(r) + "\n" for r in train)
    if sampling:
        parts.append("## Sampling\n")
        parts.extend(sampling_table(r) + "\n" for r in sampling)
    if not parts:
        return "No benchmark results yet.\n"
    return "\n".join(parts)


def readme_section(runs: list[dict], readme: Path, plot_path: Path | None, full: Path | None) -> str:
    """What goes between the README markers: the headline of the GPU runs, the plot and where the
    full tables are (paths relative to the README); the no-GPU sentence while there are none."""
    import os

    head = headline_table([r for r in runs if r["kind"] == "train_step"], [r for r in runs if r["kind"] == "sampling"])
    if not head:
        return NO_GPU_RESULTS
    rel = lambda p: Path(os.path.relpath(Path(p).resolve(), readme.resolve().parent)).as_posix()  # noqa: E731
    parts = [head]
    if plot_path is not None:
        parts.append(f"![MFU per model and variant]({rel(plot_path)})")
    if full is not None:
        parts.append(f"Every row, with batch, memory and flags: [{rel(full)}]({rel(full)}).")
    return "\n\n".join(parts)


def splice_readme(readme: Path, section: str) -> None:
    """Replaces the text between the README markers (each on a line of its own) with ``section``."""
    text = readme.read_text()
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1 or text.index(README_BEGIN) > text.index(README_END):
        raise ValueError(f"--readme {readme}: needs one '{README_BEGIN}' line followed by one '{README_END}' line")
    before, rest = text.split(README_BEGIN)
    _, after = rest.split(README_END)
    readme.write_text(f"{before}{README_BEGIN}\n{section.strip()}\n{README_END}{after}")


def plot(runs: list[dict], path: str | Path) -> Path | None:
    """Grouped bars, one panel per training file: MFU (datasheet peak) per model and variant,
    or img/s when the file has no peak. Returns the PNG path (None when there is nothing to plot)."""
    train = [r for r in runs if r["kind"] == "train_step" and any(x.get("status") == "ok" for x in r["results"])]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(train), 1, figsize=(12, 4.5 * len(train)), squeeze=False)
    for ax, run in zip(axes[:, 0], train):
        ok = [r for r in run["results"] if r.get("status") == "ok"]
        use_mfu = any(r.get("mfu_datasheet") is not None for r in ok)
        models = list(dict.fromkeys(r["model"] for r in ok))
        variants = [v for v in TRAIN_VARIANTS if any(r["variant"] == v for r in ok)]
        width = 0.8 / max(len(variants), 1)
        for i, variant in enumerate(variants):
            values = []
            for m in models:
                r = next((r for r in ok if r["model"] == m and r["variant"] == variant), None)
                v = None if r is None else (r.get("mfu_datasheet") if use_mfu else r["img_per_s"])
                values.append(0.0 if v is None else (100 * v if use_mfu else v))
            ax.bar([j + (i - (len(variants) - 1) / 2) * width for j in range(len(models))], values, width,
                   label=variant)
        if use_mfu:  # the issue's MFU targets (datasheet peak): DiT-XL/2 50%, MaskDiT-/MDTv2-XL/2 45%
            for target in MFU_TARGETS:
                ax.axhline(target, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, rotation=30, ha="right")
        peak = (run.get("peaks") or {}).get("datasheet_tflops")
        ax.set_ylabel(f"MFU (% of {peak:g} TFLOP/s datasheet bf16)" if use_mfu else "img/s (no peak known)")
        ax.set_title(f"{run['device']} — {run['date']} — commit {(run.get('commit') or '?')[:12]}")
        ax.legend(fontsize=8, ncol=3)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default=str(RESULTS_DIR), help="folder of benchmark JSON files")
    p.add_argument("--out", default=None, help="write the markdown here (default: stdout)")
    p.add_argument("--plot", default=None, help="PNG path of the MFU plot (default <results>/mfu.png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--readme", default=None, help="also rewrite this README's results section (between the markers)")
    args = p.parse_args(argv)
    if not Path(args.results).is_dir():
        raise ValueError(f"--results {args.results}: not a folder")
    runs = load_results(args.results)
    text = markdown(runs)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    png = None
    if not args.no_plot:
        png = plot(runs, args.plot or Path(args.results) / "mfu.png")
        if png is not None:
            print(f"# plot: {png}", file=sys.stderr)
    if args.readme:
        readme = Path(args.readme)
        if not readme.is_file():
            raise ValueError(f"--readme {readme}: no such file")
        splice_readme(readme, readme_section(runs, readme, png, Path(args.out) if args.out else None))
        print(f"# rewrote the results section of {readme}", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
