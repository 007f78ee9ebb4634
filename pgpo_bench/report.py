"""Reports of a benchmark run: the JSON document, a rich (or plain) table, a markdown table, the GB/s plot, targets.

The JSON schema is documented in benchmarks/README.md ("JSON schema"); SCHEMA names its version.
Run `python -m pgpo_bench.report RESULT.json` to print the markdown table of a saved run (for the README).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import shutil
import sys
from typing import Any

SCHEMA = "pgpo-bench/1"
# Keys of the JSON document and of each result record (documented in benchmarks/README.md; the tests check them).
REPORT_KEYS = ("schema", "created_utc", "command", "argv", "device", "copy_bandwidth", "versions", "config",
               "peak_memory_method", "results", "targets")
RECORD_KEYS = ("op", "tokens", "shape", "dtype", "backend", "bytes", "flops", "status", "reason", "time_ms",
               "first_call_ms", "GBps", "copy_fraction", "TFLOPs", "peak_extra_bytes", "max_abs_err", "errors",
               "err_rows")
STATUSES = ("ok", "unavailable", "error")

# the kernels' performance targets (benchmarks/README.md, "targets"), checked when our Triton kernels ran (on CUDA)
KL_COPY_FRACTION_TARGET = 0.90
KL_TARGET_MIN_TOKENS = 1024
RESHAPE_OVER_KL_TARGET = 0.02
# our choice: "extra memory O(tokens)" read as <= 1 MiB + 64 bytes per token, i.e. nothing that scales with vocab
EXTRA_MEMORY_BASE_BYTES = 1 << 20
EXTRA_MEMORY_PER_TOKEN = 64


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "liger_kernel": _version("liger-kernel"),
        "pgpo": _version("pgpo") or _pgpo_version(),
    }


def _pgpo_version() -> str | None:
    try:  # run from a checkout without `pip install`: the package's own version
        import pgpo_kernels

        return pgpo_kernels.__version__
    except ImportError:
        return None


def build_report(*, argv: list[str], device: dict, copy: dict | None, config: dict, records: list[dict],
                 peak_memory_method: str) -> dict[str, Any]:
    """The whole run as one JSON-ready dict (see benchmarks/README.md, "JSON schema")."""
    report = {
        "schema": SCHEMA,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["pgpo-bench", *argv]),
        "argv": list(argv),
        "device": device,
        "copy_bandwidth": copy,
        "versions": versions(),
        "config": config,
        "peak_memory_method": peak_memory_method,
        "results": records,
    }
    report["targets"] = evaluate_targets(records)
    return report


def _ok(records: list[dict], op: str, backend: str | None = None) -> dict[int, dict]:
    return {r["tokens"]: r for r in records
            if r["op"] == op and r["status"] == "ok" and (backend is None or r["backend"] == backend)}


def evaluate_targets(records: list[dict]) -> list[dict]:
    """The performance targets of our Triton kernels, one entry per (target, tokens); empty when they did not run."""
    out: list[dict] = []
    kl = _ok(records, "kl", "pgpo-triton")
    for n, r in sorted(kl.items()):
        if n >= KL_TARGET_MIN_TOKENS and r["copy_fraction"] is not None:
            out.append({"target": "kl_copy_fraction", "tokens": n, "value": r["copy_fraction"],
                        "threshold": KL_COPY_FRACTION_TARGET, "met": r["copy_fraction"] >= KL_COPY_FRACTION_TARGET})
        if r["peak_extra_bytes"] is not None:
            limit = EXTRA_MEMORY_BASE_BYTES + EXTRA_MEMORY_PER_TOKEN * n
            out.append({"target": "kl_extra_memory_bytes", "tokens": n, "value": r["peak_extra_bytes"],
                        "threshold": limit, "met": r["peak_extra_bytes"] <= limit})
        others = [o for o in records if o["op"] == "kl" and o["tokens"] == n and o["status"] == "ok"
                  and o["backend"] != "pgpo-triton"]
        if others:
            best = min(others, key=lambda o: o["time_ms"]["median"])
            ratio = r["time_ms"]["median"] / best["time_ms"]["median"]
            out.append({"target": "kl_time_over_best_baseline", "tokens": n, "value": ratio, "threshold": 1.0,
                        "met": ratio < 1.0, "best_baseline": best["backend"]})
    reshape = _ok(records, "reshape", "pgpo-triton")
    for n, r in sorted(reshape.items()):
        if n in kl:
            ratio = r["time_ms"]["median"] / kl[n]["time_ms"]["median"]
            out.append({"target": "reshape_over_kl_time", "tokens": n, "value": ratio,
                        "threshold": RESHAPE_OVER_KL_TARGET, "met": ratio < RESHAPE_OVER_KL_TARGET})
    return out


def merge_reports(reports: list[dict]) -> dict:
    """Several runs on one device (e.g. one per op from gpu_sweep.sh) as one report; targets judged on the union.

    Each record keeps the copy fraction of its own run; the merged copy_bandwidth is the first run's, "command" joins
    the commands with " ; ", "argv" is None and "config" is {"merged": [each run's config]}.
    """
    if not reports:
        raise ValueError("merge_reports needs at least one report")
    names = {r["device"]["name"] for r in reports}
    if len(names) > 1:
        raise ValueError(f"refusing to merge runs from different devices: {sorted(names)}")
    merged = dict(reports[0])
    merged["command"] = " ; ".join(r["command"] for r in reports)
    merged["argv"] = None
    merged["config"] = {"merged": [r["config"] for r in reports]}
    merged["results"] = [rec for r in reports for rec in r["results"]]
    merged["targets"] = evaluate_targets(merged["results"])
    return merged


def write_json(report: dict, path: str) -> None:
    def finite(x):  # JSON has no inf/nan: write them as strings, not as invalid tokens
        if isinstance(x, float) and not math.isfinite(x):
            return str(x)
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, list):
            return [finite(v) for v in x]
        return x

    # write then rename: a run killed mid-write (gpu_sweep.sh's per-step time limits) keeps its last complete file
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(finite(report), f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


# %% tables ---------------------------------------------------------------------------------------------------------
COLUMNS = ("op", "tokens", "backend", "median ms [p20, p80]", "GB/s", "% copy", "TFLOP/s", "peak extra MiB",
           "max abs err", "note")


def _fmt(x: float | str | None, spec: str) -> str:
    if x is None:
        return "-"
    return x if isinstance(x, str) else format(x, spec)  # str: inf/nan as written to JSON


def row_cells(r: dict) -> list[str]:
    """One result record as the table's cells (unavailable / error rows carry their reason in the note)."""
    if r["status"] != "ok":
        return [r["op"], str(r["tokens"]), r["backend"], "-", "-", "-", "-", "-", "-", f"{r['status']}: {r['reason']}"]
    t = r["time_ms"]
    peak = None if r["peak_extra_bytes"] is None else r["peak_extra_bytes"] / 2**20
    note = "first call {:.0f} ms (any compile)".format(r["first_call_ms"]) if r["backend"] == "torch-compile" else ""
    return [
        r["op"], str(r["tokens"]), r["backend"],
        f"{t['median']:.4g} [{t['p20']:.4g}, {t['p80']:.4g}]",
        _fmt(r["GBps"], ".1f"),
        _fmt(None if r["copy_fraction"] is None else 100 * r["copy_fraction"], ".1f"),
        _fmt(r["TFLOPs"], ".1f"),
        _fmt(peak, ".1f") if peak is not None else "n/m",
        _fmt(r["max_abs_err"], ".2e"),
        note,
    ]


def title(report: dict) -> str:
    d = report["device"]
    copy = report["copy_bandwidth"]
    copy_s = f", copy bandwidth {copy['GBps']:.1f} GB/s" if copy else ""
    label = d["name"]
    if d["type"] == "cpu":
        label += " -- CPU run: torch ops on the host, not GPU kernel speed"
    return f"pgpo-bench on {label}{copy_s}"


def table_width() -> int:
    """The terminal's width (COLUMNS, else the tty's size); 200 when output goes to no terminal (a file keeps long
    rows whole). Rich folds cells to fit."""
    return shutil.get_terminal_size(fallback=(200, 24)).columns


def print_table(report: dict, file=None) -> None:
    """The results as a rich table (plain text when rich is not installed), then the targets."""
    file = file or sys.stdout
    rows = [row_cells(r) for r in report["results"]]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title(report), file=file)
        print(" | ".join(COLUMNS), file=file)
        for cells in rows:
            print(" | ".join(cells), file=file)
    else:
        table = Table(title=title(report), show_lines=False)
        for c in COLUMNS:
            table.add_column(c, overflow="fold", justify="right" if c in ("tokens", "GB/s", "% copy") else "left")
        for cells in rows:
            table.add_row(*cells)
        Console(file=file, width=table_width()).print(table)
    print(f"peak extra memory: {report['peak_memory_method']}", file=file)
    for line in target_lines(report):
        print(line, file=file)


def target_lines(report: dict) -> list[str]:
    if not report["targets"]:
        return ["targets: not evaluated (our Triton kernels did not run in this run)"]
    return [f"target {t['target']} @ {t['tokens']} tokens: {t['value']:.4g} vs {t['threshold']:.4g} -> "
            f"{'met' if t['met'] else 'NOT met'}" for t in report["targets"]]


def markdown_table(report: dict) -> str:
    """The results as a markdown table with the device and command on top (for benchmarks/README.md)."""
    v = report["versions"]
    run = (f"`{report['command']}` ({report['created_utc']}, torch {v['torch']}, triton {v['triton']}, "
           f"liger-kernel {v['liger_kernel']})")
    lines = [f"**{title(report)}**", "", run, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in report["results"]:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row_cells(r)) + " |")
    lines += ["", *[f"- {x}" for x in target_lines(report)]]
    return "\n".join(lines)


# %% plot -----------------------------------------------------------------------------------------------------------
def plot(report: dict, path: str) -> None:
    """PNG of effective GB/s vs tokens, one panel per op, one line per backend, copy bandwidth dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in report["results"]))
    ncols = min(3, len(ops))
    nrows = -(-len(ops) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.2 * nrows), squeeze=False)
    backends = list(dict.fromkeys(r["backend"] for r in report["results"]))
    colors = {b: f"C{i}" for i, b in enumerate(backends)}  # one color per backend in every panel
    copy = report["copy_bandwidth"]
    for ax in axes.flat[len(ops):]:
        ax.axis("off")
    for ax, op in zip(axes.flat, ops):
        recs = [r for r in report["results"] if r["op"] == op and r["status"] == "ok"]
        for backend in dict.fromkeys(r["backend"] for r in recs):
            pts = sorted((r["tokens"], r["GBps"]) for r in recs if r["backend"] == backend)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend, color=colors[backend])
        if copy:
            ax.axhline(copy["GBps"], linestyle="--", color="gray", label=f"copy {copy['GBps']:.0f} GB/s")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel("effective GB/s (least bytes / median time)")
        ax.set_title(op)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title(report), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """python -m pgpo_bench.report RESULT.json [...] [--merge OUT.json] [--plot OUT.png] [--markdown OUT.md].

    Prints the markdown table of saved runs; with --merge, writes them as one report (same device only).
    """
    import argparse

    p = argparse.ArgumentParser(prog="python -m pgpo_bench.report", description=main.__doc__.split("\n")[0])
    p.add_argument("paths", nargs="+", help="pgpo-bench JSON results")
    p.add_argument("--merge", metavar="OUT.json", default=None, help="write the runs merged into one JSON")
    p.add_argument("--plot", metavar="OUT.png", default=None, help="plot of the merged runs")
    p.add_argument("--markdown", metavar="OUT.md", default=None, help="write the markdown table here too")
    p.add_argument("--largest", action="store_true",
                   help="table only: keep each op's largest token count (benchmarks/README.md's compact table)")
    args = p.parse_args(argv)
    reports = []
    for path in args.paths:
        with open(path) as f:
            reports.append(json.load(f))
    report = merge_reports(reports) if len(reports) > 1 else reports[0]
    shown = report
    if args.largest:
        top = {}
        for r in report["results"]:
            top[r["op"]] = max(top.get(r["op"], 0), r["tokens"])
        shown = {**report, "results": [r for r in report["results"] if r["tokens"] == top[r["op"]]]}
        shown["targets"] = evaluate_targets(shown["results"])
    text = markdown_table(shown)
    print(text)
    if args.merge:
        write_json(report, args.merge)
    if args.plot:
        plot(report, args.plot)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
