"""Convergence reports over reconstruction runs: a Table-4-style comparison, curves and paired tests.

A *run* is a folder written by ``ctrecon reconstruct`` (read with :func:`ctrecon.pipeline.runs.load_run`).
:func:`build_report` groups runs by (initialisation, view count) and writes

- ``table.csv`` / ``report.md``: per group, mean ± sample standard deviation (ddof=1) of the
  optimisation wall time, iterations and seconds to PSNR 35 dB and to SSIM 0.90, final PSNR and
  SSIM. Runs that never reach a threshold are not dropped: the cell says ``not reached (k/N)``.
- ``curves.png``: PSNR and SSIM against iteration, one line per initialisation (mean over runs,
  band ± one standard error), one row per view count (:func:`ctrecon.pipeline.plots.plot_group_curves`).
- ``stats.json``: the numbers above plus paired t-tests (``scipy.stats.ttest_rel``) between
  initialisations on iterations to 35 dB and on final PSNR, pairing runs by (case, views).
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
from typing import Iterable, Sequence

import numpy as np

from ctrecon.core.errors import InputError
from ctrecon.pipeline.plots import plot_group_curves
from ctrecon.pipeline.runs import RunRecord, load_run

__all__ = ["build_report", "paired_tests", "group_rows"]

THRESHOLDS = {"psnr35": "PSNR 35 dB", "ssim90": "SSIM 0.90"}
FINAL_METRICS = ("psnr", "ssim_slice", "ssim3d")
TESTED_QUANTITIES = (("psnr35_iteration", "iterations to PSNR 35 dB"), ("final_psnr", "final PSNR (dB)"))


# ----------------------------------------------------------------------------- statistics
def _mean_std(values: Sequence[float]) -> tuple:
    """Mean and sample standard deviation (ddof=1; NaN for fewer than two values); NaNs for none."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan


def _groups(runs: Sequence[RunRecord]) -> dict:
    """Runs keyed by (init, views): views ascending, inits in order of first appearance."""
    init_order = list(dict.fromkeys(r.init for r in runs))
    keys = sorted({(r.init, r.views) for r in runs},
                  key=lambda k: (-1 if k[1] is None else k[1], init_order.index(k[0])))
    return {key: [r for r in runs if (r.init, r.views) == key] for key in keys}


def group_rows(runs: Sequence[RunRecord]) -> list:
    """One summary dict per (init, views) group; NaN where a statistic is undefined."""
    rows = []
    for (init, views), members in _groups(runs).items():
        row = {"init": init, "views": views, "n_runs": len(members)}
        row["wall_seconds_mean"], row["wall_seconds_std"] = _mean_std([r.metrics.get("wall_seconds") for r in members])
        for key in THRESHOLDS:
            iterations = [r.threshold(key, "iteration") for r in members]
            reached = [i for i in iterations if i is not None]
            row[f"{key}_reached"] = len(reached)
            row[f"{key}_iteration_mean"], row[f"{key}_iteration_std"] = _mean_std(reached)
            row[f"{key}_seconds_mean"], row[f"{key}_seconds_std"] = _mean_std(
                [r.threshold(key, "seconds") for r in members if r.threshold(key, "iteration") is not None])
        for name in FINAL_METRICS:
            row[f"final_{name}_mean"], row[f"final_{name}_std"] = _mean_std([r.final(name) for r in members])
        rows.append(row)
    return rows


def _paired_values(runs: Sequence[RunRecord], quantity: str) -> dict:
    """{(case, views): {init: value}}, averaging repeated runs (seeds) of the same case, views and init."""
    collected: dict = {}
    for run in runs:
        value = run.threshold("psnr35", "iteration") if quantity == "psnr35_iteration" else run.final("psnr")
        collected.setdefault((run.case, run.views), {}).setdefault(run.init, []).append(value)
    out = {}
    for unit, per_init in collected.items():
        out[unit] = {init: (None if any(v is None for v in values) else float(np.mean(values)))
                     for init, values in per_init.items()}
    return out


def paired_tests(runs: Sequence[RunRecord]) -> list:
    """Paired t-tests between every two initialisations, pairing runs by (case, views).

    Each test is run over all view counts together and, when there are several view counts, per
    view count. A pair where either run never reached 35 dB is left out of the iterations test and
    counted in the note. Fewer than two pairs: the test is skipped with a note (t and p None).
    """
    from scipy import stats

    inits = list(dict.fromkeys(r.init for r in runs))
    view_counts = sorted({r.views for r in runs if r.views is not None})
    scopes = [None] + (view_counts if len(view_counts) > 1 else [])
    tests = []
    for quantity, label in TESTED_QUANTITIES:
        values = _paired_values(runs, quantity)
        for init_a, init_b in itertools.combinations(inits, 2):
            for scope in scopes:
                units = [u for u in sorted(values, key=lambda u: (u[0], -1 if u[1] is None else u[1]))
                         if (scope is None or u[1] == scope) and init_a in values[u] and init_b in values[u]]
                complete = [u for u in units if values[u][init_a] is not None and values[u][init_b] is not None]
                a = np.array([values[u][init_a] for u in complete])
                b = np.array([values[u][init_b] for u in complete])
                test = {"quantity": quantity, "label": label, "init_a": init_a, "init_b": init_b,
                        "views": "all" if scope is None else scope, "n": len(complete),
                        "pairs": [{"case": u[0], "views": u[1]} for u in complete],
                        "mean_a": float(a.mean()) if a.size else None,
                        "mean_b": float(b.mean()) if b.size else None,
                        "mean_difference": float((a - b).mean()) if a.size else None,
                        "t": None, "p": None, "note": ""}
                notes = []
                if len(units) > len(complete):
                    notes.append(f"{len(units) - len(complete)} pair(s) left out: 35 dB not reached by both")
                if len(complete) < 2:
                    notes.append("skipped: fewer than 2 paired cases")
                elif np.ptp(a - b) == 0:
                    notes.append("undefined: every paired difference is the same")
                else:
                    result = stats.ttest_rel(a, b)
                    test["t"], test["p"] = float(result.statistic), float(result.pvalue)
                test["note"] = "; ".join(notes)
                tests.append(test)
    return tests


# ----------------------------------------------------------------------------- formatting
def _fmt(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _threshold_cell(row: dict, key: str, field: str, digits: int) -> str:
    reached, total = row[f"{key}_reached"], row["n_runs"]
    if reached == 0:
        return f"not reached ({total}/{total})"
    cell = _fmt(row[f"{key}_{field}_mean"], row[f"{key}_{field}_std"], digits)
    return cell if reached == total else f"{cell}; not reached ({total - reached}/{total})"


TABLE_COLUMNS = ("init", "views", "runs", "wall time (s)", "iters to 35 dB", "s to 35 dB", "iters to SSIM 0.90",
                 "s to SSIM 0.90", "final PSNR (dB)", "final SSIM (slices)", "final SSIM (3-D)")


def markdown_table(rows: Sequence[dict]) -> str:
    """The comparison table in Markdown (mean ± sample std over runs)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for row in rows:
        cells = [row["init"], "?" if row["views"] is None else str(row["views"]), str(row["n_runs"]),
                 _fmt(row["wall_seconds_mean"], row["wall_seconds_std"], 1),
                 _threshold_cell(row, "psnr35", "iteration", 0), _threshold_cell(row, "psnr35", "seconds", 1),
                 _threshold_cell(row, "ssim90", "iteration", 0), _threshold_cell(row, "ssim90", "seconds", 1),
                 _fmt(row["final_psnr_mean"], row["final_psnr_std"], 2),
                 _fmt(row["final_ssim_slice_mean"], row["final_ssim_slice_std"], 4),
                 _fmt(row["final_ssim3d_mean"], row["final_ssim3d_std"], 4)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _csv_text(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return buffer.getvalue()


def _tests_markdown(tests: Sequence[dict]) -> str:
    if not tests:
        return "Only one initialisation: no paired tests."
    lines = ["| quantity | A | B | views | n | mean A | mean B | t | p | note |", "|" + "---|" * 10]
    num = lambda v, d: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    for t in tests:
        lines.append(f"| {t['label']} | {t['init_a']} | {t['init_b']} | {t['views']} | {t['n']} | "
                     f"{num(t['mean_a'], 2)} | {num(t['mean_b'], 2)} | {num(t['t'], 3)} | {num(t['p'], 4)} | "
                     f"{t['note']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the report
def _stops_markdown(runs: Sequence[RunRecord]) -> str:
    """Where each run stopped and why (e.g. the residual rule of ``iterations="auto"``), with its quality then."""
    lines = ["| case | views | init | iterations | stop reason | PSNR there (dB) |", "|" + "---|" * 6]
    for run in runs:
        psnr = run.final("psnr")
        lines.append(f"| {run.case} | {run.views} | {run.init} | {run.metrics['iterations']} | "
                     f"{run.metrics.get('stop_reason', 'completed')} | {'–' if psnr is None else f'{psnr:.2f}'} |")
    return "\n".join(lines)


def build_report(run_dirs: Iterable[str], out_dir: str) -> dict:
    """Compare runs; writes ``report.md``, ``table.csv``, ``curves.png``, ``stats.json`` into ``out_dir``.

    Returns the content of ``stats.json`` (undefined statistics as None) plus ``markdown_table``.
    """
    from ctrecon.core.io import atomic_output, write_json

    run_dirs = list(run_dirs)
    if not run_dirs:
        raise InputError("no run folders given")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"--out {out_dir} exists and is not a folder")
    runs = [load_run(d) for d in run_dirs]
    rows = group_rows(runs)
    tests = paired_tests(runs)
    table = markdown_table(rows)
    metrics_used = sorted({r.metrics.get("ssim_threshold_metric", "ssim_slice") for r in runs})
    notes = [
        "Mean ± sample standard deviation (ddof=1) over runs; a single run shows its value only.",
        "Times are optimisation wall-clock seconds with evaluation excluded (reported separately per run).",
        "'not reached (k/N)': k of the N runs never reached the threshold; the mean covers the others.",
        f"The SSIM 0.90 threshold uses {', '.join(metrics_used)} (ssim_slice: mean of axial-slice SSIM, "
        "7×7 window, the 3DGR-CT convention; ssim3d: 3-D SSIM, Gaussian window σ=1.5); data_range 1.",
        "Paired t-tests pair runs by (case, views); repeated runs of a pair are averaged first.",
    ]
    os.makedirs(out_dir, exist_ok=True)
    stats_out = {"runs": [{"path": r.path, "init": r.init, "views": r.views, "case": r.case} for r in runs],
                 "groups": rows, "tests": tests, "notes": notes}
    markdown = "\n\n".join(["# Convergence report", table, "## Where each run stopped", _stops_markdown(runs),
                            "## Paired t-tests", _tests_markdown(tests),
                            "## Notes", "\n".join(f"- {n}" for n in notes)]) + "\n"
    with atomic_output(os.path.join(out_dir, "report.md")) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(markdown)
    with atomic_output(os.path.join(out_dir, "table.csv")) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(_csv_text(rows))
    plot_group_curves({key: [r.metrics["history"] for r in members] for key, members in _groups(runs).items()},
                      os.path.join(out_dir, "curves.png"))
    stats_path = os.path.join(out_dir, "stats.json")
    write_json(stats_path, stats_out)  # NaN (undefined statistics) becomes null
    with open(stats_path, encoding="utf-8") as handle:
        return {**json.load(handle), "markdown_table": table}
