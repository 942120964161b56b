"""Convergence reports over reconstruction runs: the paper's Table 4, curves and paired tests.

A *run* is a folder written by ``ctrecon reconstruct`` (read with :func:`ctrecon.pipeline.runs.load_run`):
3DGR-CT from an initialisation, or a classical method (sart, os-sart, cgls, fista-tv, fdk). Runs are
grouped by *arm* (the initialisation of a 3DGR-CT run, the method of a classical one) and view count.
:func:`build_report` writes

- ``table.csv`` / ``report.md``: per group, the optimisation wall time (mean ± sample std, ddof=1),
  iterations and seconds to the PSNR and SSIM thresholds, and final PSNR and the three SSIMs (mean ±
  std). Times to a threshold are *censored* where a run stopped before reaching it (it needed more
  than it was given): their median ranks such runs last, and a median that falls on one is shown as
  ``≥ B`` (B: the iterations or seconds that run did), with ``k/N not reached`` beside it.
- ``curves.png`` / ``curves_seconds.png``: PSNR and SSIM against iteration and against seconds, one line
  per arm (mean over runs, band ± one standard error), one row per view count.
- ``stats.json``: the numbers above plus paired tests between arms. Pairs are runs of the two arms on
  the same case at the same view count (repeated seeds reduced to their median first); each view count
  is tested on its own, so n is the number of cases (view counts of one case are not independent).
  Time to the PSNR threshold: exact two-sided sign test (binomial), a run that never reached it slower
  than one that did, two runs that both missed it tied; ties are left out and counted. Final PSNR:
  Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, exact for small n; zero differences dropped).
  Fewer than two cases: no test, with a note.

The thresholds' names and labels come from the values the runs used (``psnr35`` / "PSNR 35 dB" for 35 dB,
``psnr30`` / "PSNR 30 dB" for 30); runs evaluated at different thresholds are not compared.
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
from ctrecon.pipeline.metrics import threshold_key, threshold_label
from ctrecon.pipeline.plots import plot_group_curves
from ctrecon.pipeline.runs import RunRecord, load_run

__all__ = ["build_report", "paired_tests", "group_rows", "run_thresholds"]

#: Final-quality columns: metrics.json key and its column title.
FINAL_METRICS = (("psnr", "final PSNR (dB)"), ("ssim3d", "SSIM 3-D"), ("ssim_slice", "SSIM axial (range 1)"),
                 ("ssim_slice_3dgr_code", "SSIM axial as 3DGR-CT's code (range 2)"))
_DEFAULT_THRESHOLDS = {"psnr_threshold": 35.0, "ssim_threshold": 0.90, "ssim_threshold_metric": "ssim_slice"}


# ----------------------------------------------------------------------------- thresholds
def run_thresholds(runs: Sequence[RunRecord]) -> list:
    """``[(key, label, metric_kind), ...]`` for the PSNR and the SSIM threshold the runs share (InputError when
    they differ; runs written before the values were recorded used 35 dB / 0.90 on ssim_slice)."""
    settings = {}
    for run in runs:
        used = tuple(run.metrics.get(name, default) for name, default in _DEFAULT_THRESHOLDS.items())
        settings.setdefault(used, run.path)
    if len(settings) > 1:
        described = "; ".join(f"{path}: PSNR {p:g} dB, SSIM {s:g} ({m})" for (p, s, m), path in settings.items())
        raise InputError(f"the runs were evaluated at different thresholds ({described}); report them separately")
    (psnr_value, ssim_value, ssim_metric), = settings
    return [(threshold_key("psnr", psnr_value), threshold_label("psnr", psnr_value), "psnr"),
            (threshold_key("ssim", ssim_value), f"{threshold_label('ssim', ssim_value)} ({ssim_metric})", "ssim")]


# ----------------------------------------------------------------------------- statistics
def _mean_std(values: Sequence[float]) -> tuple:
    """Mean and sample standard deviation (ddof=1; NaN for fewer than two values); NaNs for none."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan


def _time_to(run: RunRecord, key: str, field: str) -> tuple:
    """(value, censored) of ``field`` ("iteration" or "seconds") to threshold ``key``; a run that never reached
    it gives its own budget (iterations done, or wall seconds) and censored=True."""
    value = run.threshold(key, field)
    if value is not None:
        return float(value), False
    budget = run.metrics.get("iterations") if field == "iteration" else run.metrics.get("wall_seconds")
    return (math.nan if budget is None else float(budget)), True


def _censored_median(observations: Sequence[tuple]) -> tuple:
    """Median of (value, censored) pairs with every censored one ranked after every observed one (and among
    themselves by budget); (median, censored): a censored median is a lower bound."""
    ranked = sorted(observations, key=lambda o: (o[1], o[0]))
    n = len(ranked)
    middle = ranked[(n - 1) // 2: n // 2 + 1]
    if any(c for _, c in middle):
        return min(v for v, c in middle if c), True
    return float(np.mean([v for v, _ in middle])), False


def _groups(runs: Sequence[RunRecord]) -> dict:
    """Runs keyed by (arm, views): views ascending, arms in order of first appearance."""
    arm_order = list(dict.fromkeys(r.arm for r in runs))
    keys = sorted({(r.arm, r.views) for r in runs},
                  key=lambda k: (-1 if k[1] is None else k[1], arm_order.index(k[0])))
    return {key: [r for r in runs if (r.arm, r.views) == key] for key in keys}


def group_rows(runs: Sequence[RunRecord]) -> list:
    """One summary dict per (arm, views) group; NaN where a statistic is undefined."""
    thresholds = run_thresholds(runs)
    rows = []
    for (arm, views), members in _groups(runs).items():
        row = {"arm": arm, "method": members[0].method, "init": members[0].init, "views": views,
               "n_runs": len(members)}
        row["wall_seconds_mean"], row["wall_seconds_std"] = _mean_std([r.metrics.get("wall_seconds") for r in members])
        for key, _, _ in thresholds:
            row[f"{key}_reached"] = sum(r.threshold(key, "iteration") is not None for r in members)
            for field in ("iteration", "seconds"):
                median, censored = _censored_median([_time_to(r, key, field) for r in members])
                row[f"{key}_{field}_median"], row[f"{key}_{field}_censored"] = median, censored
        for name, _ in FINAL_METRICS:
            row[f"final_{name}_mean"], row[f"final_{name}_std"] = _mean_std([r.final(name) for r in members])
        rows.append(row)
    return rows


def _unit_values(runs: Sequence[RunRecord], quantity: str, key: str) -> dict:
    """{(case, views): {arm: value}}; value (median, censored) of the time to threshold ``key`` over repeated
    runs for "iterations"/"seconds", or the mean final PSNR for "final_psnr" (None if a run lacks it)."""
    collected: dict = {}
    for run in runs:
        collected.setdefault((run.case, run.views), {}).setdefault(run.arm, []).append(run)
    out = {}
    for unit, per_arm in collected.items():
        out[unit] = {}
        for arm, members in per_arm.items():
            if quantity == "final_psnr":
                finals = [r.final("psnr") for r in members]
                out[unit][arm] = None if any(v is None for v in finals) else float(np.mean(finals))
            else:
                field = "iteration" if quantity == "iterations" else "seconds"
                out[unit][arm] = _censored_median([_time_to(r, key, field) for r in members])
    return out


def _sign_test(a: Sequence[tuple], b: Sequence[tuple]) -> dict:
    """Exact two-sided sign test on paired (value, censored) times: a censored time is longer than any observed
    one; two censored times, or two equal ones, are a tie (left out)."""
    from scipy import stats

    wins_a = wins_b = ties = 0
    for (va, ca), (vb, cb) in zip(a, b):
        if ca and cb or (not ca and not cb and va == vb):
            ties += 1
        elif cb or (not ca and va < vb):
            wins_a += 1
        else:
            wins_b += 1
    decided = wins_a + wins_b
    p = float(stats.binomtest(wins_a, decided, 0.5).pvalue) if decided else None
    return {"test": "sign test (exact binomial; not reaching = slower)", "wins_a": wins_a, "wins_b": wins_b,
            "ties": ties, "statistic": wins_a if decided else None, "p": p,
            "note": "" if decided else "undefined: every pair tied"}


def _wilcoxon(a: Sequence[float], b: Sequence[float]) -> dict:
    from scipy import stats

    differences = np.asarray(a) - np.asarray(b)
    out = {"test": "Wilcoxon signed-rank", "wins_a": int(np.sum(differences > 0)),
           "wins_b": int(np.sum(differences < 0)), "ties": int(np.sum(differences == 0)),
           "statistic": None, "p": None, "note": ""}
    if not np.any(differences):
        out["note"] = "undefined: every paired difference is zero"
    else:
        result = stats.wilcoxon(a, b)
        out["statistic"], out["p"] = float(result.statistic), float(result.pvalue)
    return out


def paired_tests(runs: Sequence[RunRecord]) -> list:
    """Paired tests between every two arms at every view count (see the module docstring)."""
    (psnr_key, psnr_label, _), _ = run_thresholds(runs)
    arms = list(dict.fromkeys(r.arm for r in runs))
    view_counts = list(dict.fromkeys(sorted((r.views for r in runs), key=lambda v: -1 if v is None else v)))
    quantities = (("iterations", f"iterations to {psnr_label}"), ("seconds", f"seconds to {psnr_label}"),
                  ("final_psnr", "final PSNR (dB)"))
    tests = []
    for quantity, label in quantities:
        values = _unit_values(runs, quantity, psnr_key)
        for arm_a, arm_b in itertools.combinations(arms, 2):
            for views in view_counts:
                cases = sorted(case for (case, v), per_arm in values.items() if v == views
                               and per_arm.get(arm_a) is not None and per_arm.get(arm_b) is not None)
                if not cases:  # the two arms never ran on one case at this view count
                    continue
                a = [values[(case, views)][arm_a] for case in cases]
                b = [values[(case, views)][arm_b] for case in cases]
                test = {"quantity": quantity, "label": label, "arm_a": arm_a, "arm_b": arm_b, "views": views,
                        "n_cases": len(cases), "cases": cases}
                if quantity == "final_psnr":
                    test["median_a"] = float(np.median(a)) if a else None
                    test["median_b"] = float(np.median(b)) if b else None
                    test["censored_a"] = test["censored_b"] = False
                else:
                    (test["median_a"], test["censored_a"]), (test["median_b"], test["censored_b"]) = (
                        _censored_median(side) if side else (None, False) for side in (a, b))
                if len(cases) < 2:
                    test.update(test="none", wins_a=None, wins_b=None, ties=None, statistic=None, p=None,
                                note=f"skipped: {len(cases)} case(s); tests pair cases at one view count")
                else:
                    test.update(_wilcoxon(a, b) if quantity == "final_psnr" else _sign_test(a, b))
                tests.append(test)
    return tests


# ----------------------------------------------------------------------------- formatting
def _fmt(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _time_cell(row: dict, key: str, field: str, digits: int) -> str:
    median, censored = row[f"{key}_{field}_median"], row[f"{key}_{field}_censored"]
    if math.isnan(median):
        return "n/a"
    cell = f"≥ {median:.{digits}f}" if censored else f"{median:.{digits}f}"
    missed = row["n_runs"] - row[f"{key}_reached"]
    return cell if missed == 0 else f"{cell} ({missed}/{row['n_runs']} not reached)"


def _table_columns(thresholds: Sequence[tuple]) -> list:
    columns = ["method", "init", "views", "runs", "wall time (s)"]
    for _, label, _ in thresholds:
        columns += [f"iters to {label}", f"s to {label}"]
    return columns + [title for _, title in FINAL_METRICS]


def markdown_table(rows: Sequence[dict], thresholds: Sequence[tuple]) -> str:
    """The comparison table in Markdown: medians of the times to each threshold (censored: ``≥``), means ±
    sample std of the rest."""
    columns = _table_columns(thresholds)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row["method"], row["init"], "?" if row["views"] is None else str(row["views"]), str(row["n_runs"]),
                 _fmt(row["wall_seconds_mean"], row["wall_seconds_std"], 1)]
        for key, _, _ in thresholds:
            cells += [_time_cell(row, key, "iteration", 0), _time_cell(row, key, "seconds", 1)]
        cells += [_fmt(row[f"final_{name}_mean"], row[f"final_{name}_std"], 2 if name == "psnr" else 4)
                  for name, _ in FINAL_METRICS]
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
        return "Only one arm: no paired tests."
    lines = ["| quantity | A | B | views | cases | median A | median B | A better / B better / ties | test | p | note |",
             "|" + "---|" * 11]

    def median(value, censored):
        return "n/a" if value is None else (f"≥ {value:.4g}" if censored else f"{value:.4g}")

    for t in tests:
        # wins: fewer iterations / seconds, or a higher final PSNR
        tally = "–" if t["wins_a"] is None else f"{t['wins_a']} / {t['wins_b']} / {t['ties']}"
        p = "n/a" if t["p"] is None else f"{t['p']:.4f}"
        lines.append(f"| {t['label']} | {t['arm_a']} | {t['arm_b']} | {t['views']} | {t['n_cases']} | "
                     f"{median(t['median_a'], t['censored_a'])} | {median(t['median_b'], t['censored_b'])} | {tally} | "
                     f"{t['test']} | {p} | {t['note']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the report
def _stops_markdown(runs: Sequence[RunRecord]) -> str:
    """Where each run stopped and why (e.g. the residual rule of ``iterations="auto"``), with its quality then."""
    lines = ["| case | views | method | init | iterations | stop reason | PSNR there (dB) |", "|" + "---|" * 7]
    for run in runs:
        psnr = run.final("psnr")
        lines.append(f"| {run.case} | {run.views} | {run.method} | {run.init} | {run.metrics['iterations']} | "
                     f"{run.metrics.get('stop_reason', 'completed')} | {'–' if psnr is None else f'{psnr:.2f}'} |")
    return "\n".join(lines)


def build_report(run_dirs: Iterable[str], out_dir: str) -> dict:
    """Compare runs; writes ``report.md``, ``table.csv``, ``curves.png``, ``curves_seconds.png`` and ``stats.json``
    into ``out_dir``, all or none (an earlier report there stays whole if a writer fails). Returns the content of ``stats.json`` (undefined statistics as None) plus ``markdown_table``.
    """
    from ctrecon.core.io import atomic_outputs, write_json

    run_dirs = list(run_dirs)
    if not run_dirs:
        raise InputError("no run folders given")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"--out {out_dir} exists and is not a folder")
    runs = [load_run(d) for d in run_dirs]
    thresholds = run_thresholds(runs)
    rows = group_rows(runs)
    tests = paired_tests(runs)
    table = markdown_table(rows, thresholds)
    n_cases = {views: len({r.case for r in runs if r.views == views}) for views in dict.fromkeys(r.views for r in runs)}
    notes = [
        "Times to a threshold: median over runs; a run that stopped before reaching it is censored (it needed more "
        "than it did) and ranks after every run that reached it; '≥ B': the median falls on such a run, B being "
        "what that run did; 'k/N not reached': k of the N runs never reached it.",
        "Wall time and final quality: mean ± sample standard deviation (ddof=1) over runs; one run shows its value.",
        "Times are optimisation wall-clock seconds with evaluation excluded (a classical method's set-up, e.g. "
        "SART's weights or FISTA's Lipschitz estimate, is included; the FDK of an initialisation is not).",
        "Iterations are each method's own: one Adam step of 3DGR-CT, one pass over all views of SART / OS-SART, "
        "one CG step of CGLS, one FISTA step; compare methods by seconds.",
        "SSIM columns: 3-D (Gaussian window σ 1.5), axial slices (7×7 window, data range 1: the 3DGR-CT paper's "
        "convention), and axial slices as 3DGR-CT's code computes them (data range 2: scikit-image < 0.20 on floats)."
        " Only the last is comparable with SSIM figures from 3DGR-CT's code.",
        "Paired tests pair two arms' runs on one case at one view count; cases per view count: "
        + ", ".join(f"{views} views: {n}" for views, n in n_cases.items()) + ".",
    ]
    os.makedirs(out_dir, exist_ok=True)
    stats_out = {"runs": [{"path": r.path, "method": r.method, "init": r.init, "arm": r.arm, "views": r.views,
                           "case": r.case} for r in runs],
                 "thresholds": [{"key": key, "label": label} for key, label, _ in thresholds],
                 "groups": rows, "tests": tests, "notes": notes}
    markdown = "\n\n".join(["# Convergence report", table, "## Where each run stopped", _stops_markdown(runs),
                            "## Paired tests", _tests_markdown(tests),
                            "## Notes", "\n".join(f"- {n}" for n in notes)]) + "\n"
    histories = {key: [r.metrics["history"] for r in members] for key, members in _groups(runs).items()}
    lines = {"psnr": runs[0].metrics.get("psnr_threshold", 35.0)}
    lines["ssim_slice"] = lines["ssim3d"] = runs[0].metrics.get("ssim_threshold", 0.90)
    names = ("report.md", "table.csv", "curves.png", "curves_seconds.png", "stats.json")
    with atomic_outputs(*(os.path.join(out_dir, name) for name in names)) as (md, table_csv, curves, seconds, stats):
        md.write_text(markdown, encoding="utf-8")
        with open(table_csv, "w", encoding="utf-8", newline="") as handle:
            handle.write(_csv_text(rows))
        plot_group_curves(histories, str(curves), thresholds=lines)
        plot_group_curves(histories, str(seconds), x_key="seconds", thresholds=lines)
        write_json(stats, stats_out)  # NaN (undefined statistics) becomes null
    stats_path = os.path.join(out_dir, "stats.json")
    with open(stats_path, encoding="utf-8") as handle:
        return {**json.load(handle), "markdown_table": table}
