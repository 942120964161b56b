"""The convergence-curve figures (PNG): of one run (its folder's ``curves.png``, written by
:func:`ctrecon.pipeline.runs.write_run`) and of groups of runs (a report's ``curves.png``)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["plot_run_curves", "plot_group_curves"]

CURVE_METRICS = (("psnr", "PSNR (dB)", 35.0), ("ssim_slice", "SSIM, axial slices (3DGR-CT)", 0.90),
                 ("ssim3d", "SSIM, 3-D", 0.90))


def _save_figure(fig, path: str) -> None:
    from ctrecon.core.io import atomic_output

    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def _history_series(history: Sequence[dict], x_key: str, y_key: str) -> tuple:
    points = [(h[x_key], h[y_key]) for h in history if h.get(x_key) is not None and h.get(y_key) is not None]
    return (np.array([p[0] for p in points], dtype=np.float64), np.array([p[1] for p in points], dtype=np.float64))


def plot_run_curves(metrics: dict, path: str) -> None:
    """PNG of one run: loss, PSNR and SSIM (both conventions) against iteration (top) and seconds (bottom)."""
    from matplotlib.figure import Figure

    history = metrics.get("history", [])
    fig = Figure(figsize=(13, 7), layout="constrained")
    axes = fig.subplots(2, 3)
    for row, (x_key, x_label) in enumerate((("iteration", "iteration"),
                                             ("seconds", "optimisation time (s, evaluation excluded)"))):
        ax_loss, ax_psnr, ax_ssim = axes[row]
        x, loss = _history_series(history, x_key, "loss")
        if x.size:
            ax_loss.plot(x, loss, color="black")
            if np.all(loss > 0):
                ax_loss.set_yscale("log")
        ax_loss.set_ylabel("training loss")
        x, psnr = _history_series(history, x_key, "psnr")
        ax_psnr.plot(x, psnr, marker=".", color="tab:blue")
        ax_psnr.axhline(35.0, color="grey", linestyle=":", linewidth=1)
        ax_psnr.set_ylabel("PSNR (dB)")
        for name, label, color in (("ssim_slice", "axial slices (3DGR-CT)", "tab:orange"),
                                   ("ssim3d", "3-D", "tab:green")):
            x, ssim = _history_series(history, x_key, name)
            ax_ssim.plot(x, ssim, marker=".", color=color, label=label)
        ax_ssim.axhline(0.90, color="grey", linestyle=":", linewidth=1)
        ax_ssim.set_ylabel("SSIM")
        ax_ssim.legend(loc="lower right", fontsize=8)
        for ax in axes[row]:
            ax.set_xlabel(x_label)
            ax.grid(alpha=0.3)
    fig.suptitle(f"init {metrics.get('init')}, {metrics.get('iterations')} iterations, "
                 f"{metrics.get('n_gaussians')} Gaussians")
    _save_figure(fig, path)


def _mean_curve(histories: Sequence[Sequence[dict]], metric: str, x_key: str = "iteration") -> tuple:
    """Mean and standard error across runs on the union of their evaluation points along ``x_key``.

    Each run is linearly interpolated onto the grid inside its own range only; a grid
    point averages the runs that cover it (runs that stopped early drop out, nothing is extrapolated).
    """
    series = [s for s in (_history_series(h, x_key, metric) for h in histories) if s[0].size]
    if not series:
        return np.array([]), np.array([]), np.array([])
    grid = np.unique(np.concatenate([s[0] for s in series]))
    samples = np.full((len(series), grid.size), np.nan)
    for i, (x, y) in enumerate(series):
        inside = (grid >= x.min()) & (grid <= x.max())
        samples[i, inside] = np.interp(grid[inside], x, y)
    count = np.sum(~np.isnan(samples), axis=0)
    mean = np.nanmean(samples, axis=0)
    spread = np.zeros_like(mean)
    several = count > 1
    spread[several] = np.nanstd(samples[:, several], axis=0, ddof=1) / np.sqrt(count[several])
    return grid, mean, spread


def plot_group_curves(groups: dict, path: str, *, x_key: str = "iteration", thresholds: dict | None = None) -> None:
    """PNG of groups of runs, ``{(arm, views): [history, ...]}`` in display order: PSNR and both SSIMs
    against ``x_key`` ("iteration" or "seconds"), the mean over each group's runs (band ± one standard error),
    one row per view count. thresholds: {metric: value} drawn as dotted lines (default 35 dB, 0.90)."""
    from matplotlib.figure import Figure

    lines = {metric: value for metric, _, value in CURVE_METRICS} | (thresholds or {})

    view_counts = list(dict.fromkeys(views for _, views in groups))
    inits = list(dict.fromkeys(init for init, _ in groups))
    colors = {init: f"C{i % 10}" for i, init in enumerate(inits)}
    fig = Figure(figsize=(5 * len(CURVE_METRICS), 3.6 * len(view_counts)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(view_counts), len(CURVE_METRICS), squeeze=False))
    for row, views in enumerate(view_counts):
        for col, (metric, label, _) in enumerate(CURVE_METRICS):
            ax = axes[row, col]
            for init in inits:
                histories = groups.get((init, views), [])
                grid, mean, spread = _mean_curve(histories, metric, x_key)
                if grid.size == 0:
                    continue
                ax.plot(grid, mean, color=colors[init], label=f"{init} (n={len(histories)})")
                ax.fill_between(grid, mean - spread, mean + spread, color=colors[init], alpha=0.25, linewidth=0)
            ax.axhline(lines[metric], color="grey", linestyle=":", linewidth=1)
            ax.set_xlabel("iteration" if x_key == "iteration" else "optimisation time (s, evaluation excluded)")
            ax.set_ylabel(label)
            ax.set_title(f"{'?' if views is None else views} views")
            ax.grid(alpha=0.3)
            if ax.lines[:-1]:
                ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("mean over runs (runs that stopped earlier drop out), band: ± one standard error")
    _save_figure(fig, path)
