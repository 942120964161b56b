"""The main job on the shipped case (DESIGN.md §6): real CT → 120-view cone-beam scan → FDK → three
initialisations (3DGR-CT's fbp, zero-shot MedGMAE, zero-shot MedGMAE*) → 3DGR-CT → a short report.

    summary = run_demo("ctrecon_demo/", device="cpu")   # the prior initialisers by name, shipped priors

Profiles (the case is ``data/sample_abdomen_small.nii.gz``, 122×101×30 voxels at 3 mm, CC BY 4.0):

* ``"cpu"`` (default without CUDA): the central 64×64×24 voxels, 5 000 initial Gaussians for fbp;
  with the default ``preconditioned`` optimiser its library settings (40 views per step, until the
  data residual stops improving, at most ``CPU_MAX_ITERATIONS``); with ``3dgr`` ``CPU_ITERATIONS``
  iterations of 10 random views each (R²-Gaussian's view sampling): a few minutes on two cores.
* ``"full"`` (default on CUDA): the whole case, every view in every iteration (3DGR-CT), 50 000
  initial Gaussians for fbp; ``preconditioned`` until the residual stops improving, ``3dgr``
  ``FULL_ITERATIONS`` iterations.

The demo case is held out from every tuning (data/README.md): its settings are the optimisers' own.

Output folder: ``case/`` (the volume used), ``scans/``, ``runs/``, ``report/`` (as ``ctrecon benchmark``
writes them), ``slices.png`` (axial and coronal centre slices: ground truth, FDK and every
initialisation's result), ``summary.md`` and ``summary.json``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from ctrecon.core.errors import InputError
from ctrecon.core.paths import data_file

__all__ = ["DEMO_CASE", "DEMO_INITS", "DEMO_VIEWS", "CPU_ITERATIONS", "CPU_MAX_ITERATIONS", "FULL_ITERATIONS",
           "demo_config", "run_demo"]

DEMO_CASE = data_file("sample_abdomen_small.nii.gz")
DEMO_INITS = ("fbp", "medgmae", "medgmae-star")
DEMO_VIEWS = 120
CPU_ITERATIONS = 150
CPU_MAX_ITERATIONS = 600
FULL_ITERATIONS = 3000
CPU_CROP = (24, 64, 64)  # Z, Y, X voxels around the centre of the case


def demo_config(profile: str, iterations: Optional[int] = None, optimizer: str = "preconditioned"):
    """The :class:`ctrecon.pipeline.reconstruct.ReconstructConfig` of a profile ("cpu" or "full") and an
    optimiser method ("preconditioned" or "3dgr"); ``iterations`` fixes the count."""
    from ctrecon.pipeline.reconstruct import OPTIMIZER_METHODS, ReconstructConfig

    if optimizer not in OPTIMIZER_METHODS:
        raise InputError(f"unknown optimizer {optimizer!r} (use {', '.join(OPTIMIZER_METHODS)})")
    if profile == "cpu":
        settings = {"n_gaussians": 5_000, "eval_every": 25}
        if optimizer == "3dgr":
            settings.update(views_per_iter=10, iterations=CPU_ITERATIONS)
        else:
            settings.update(max_iterations=CPU_MAX_ITERATIONS)
    elif profile == "full":
        settings = {"n_gaussians": 50_000, "eval_every": 100, "views_per_iter": 0}
        if optimizer == "3dgr":
            settings.update(iterations=FULL_ITERATIONS)
    else:
        raise InputError(f"unknown demo profile {profile!r} (use cpu or full)")
    if iterations is not None:
        settings.update(iterations=iterations, eval_every=max(1, min(settings["eval_every"], iterations // 6)))
    return ReconstructConfig.from_dict({"method": optimizer, **settings})


def _case_volume(profile: str, folder: Path, crop=CPU_CROP) -> Path:
    """Write the demo volume of ``profile`` (HU NIfTI; the "cpu" one cropped to ``crop`` (Z, Y, X) voxels
    around the centre) into ``folder``; returns its path."""
    from ctrecon.core.io import read_volume, save_volume

    if not DEMO_CASE.is_file():
        raise InputError(f"the shipped demo case {DEMO_CASE} is missing (a broken installation or checkout?)")
    source = read_volume(DEMO_CASE)
    name = "sample_abdomen_small"
    if profile == "cpu":
        source = source.centre_crop(crop)
        name = "sample_abdomen_centre"
    path = folder / f"{name}.nii.gz"
    folder.mkdir(parents=True, exist_ok=True)
    save_volume(path, source.array, source.spacing, source.origin)
    return path


def _slices_figure(path: Path, panels: list) -> None:
    """Axial (top) and coronal (bottom) centre slices of ``panels`` [(title, volume [Z, Y, X])], grey 0–0.5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctrecon.core.io import atomic_output

    fig, axes = plt.subplots(2, len(panels), figsize=(2.6 * len(panels), 5.2), squeeze=False)
    for col, (title, volume) in enumerate(panels):
        for row, image in enumerate((volume[volume.shape[0] // 2], volume[:, volume.shape[1] // 2][::-1])):
            axes[row, col].imshow(image, cmap="gray", vmin=0.0, vmax=0.5)
            axes[row, col].axis("off")
        axes[0, col].set_title(title, fontsize=8)
    fig.suptitle("centre slices, unit attenuation 0-0.5 (top: axial, bottom: coronal)", fontsize=9)
    fig.tight_layout()
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        fig.savefig(handle, format="png", dpi=90)
    plt.close(fig)


def _threshold_text(hit) -> str:
    return "not reached" if hit is None else f"it {hit['iteration']}, {hit['seconds']:.1f} s"


def run_demo(out, *, device="cpu", profile: Optional[str] = None, iterations: Optional[int] = None,
             optimizer: str = "preconditioned", crop=CPU_CROP, seed: int = 0, priors: Optional[dict] = None,
             events: Optional[Callable] = None) -> dict:
    """Run the demo into ``out``; returns the content of ``summary.json`` (plus ``markdown``).

    profile: "cpu" or "full" (default: "full" on a CUDA device, else "cpu"). iterations: override the
    profile's count. optimizer: the method (:func:`demo_config`). crop: the "cpu" profile's centre crop
    (Z, Y, X voxels). priors: init name →
    prior file, recorded in the runs. ``events`` is passed to :func:`ctrecon.pipeline.benchmark.run_benchmark`.
    """
    import torch

    from ctrecon.pipeline.benchmark import run_benchmark
    from ctrecon.operators.fdk import fdk
    from ctrecon.core.io import atomic_output, load_scan, write_json
    from ctrecon.pipeline.metrics import evaluate, quality_thresholds, threshold_label
    from ctrecon.pipeline.runs import load_run

    device = torch.device(device)
    profile = profile or ("full" if device.type == "cuda" else "cpu")
    config = demo_config(profile, iterations, optimizer)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    case = _case_volume(profile, out / "case", crop)
    result = run_benchmark([case], [DEMO_VIEWS], DEMO_INITS, config, out, device=device, seed=seed, priors=priors,
                           events=events)
    bench = result["benchmark"]
    scan = load_scan(out / "scans" / f"{bench['case_names'][0]}_v{DEMO_VIEWS}.npz")
    fdk_volume = fdk(scan.projections, scan.geometry, device=device).cpu().numpy()
    truth = scan.ground_truth
    fdk_quality = evaluate(fdk_volume, truth)

    rows, panels = [], [("ground truth", truth), (f"FDK {fdk_quality['psnr']:.1f} dB", fdk_volume)]
    for init, run_dir in zip(DEMO_INITS, bench["runs"]):
        run = load_run(run_dir)
        metrics = run.metrics
        final, start = metrics["final"], metrics["history"][0]
        rows.append({"init": init, "run": run_dir, "init_seconds": metrics["init_seconds"],
                     "initial_psnr": start["psnr"], "iterations": metrics["iterations"],
                     "stop_reason": metrics["stop_reason"],
                     "wall_seconds": metrics["wall_seconds"], "final": final,
                     "n_gaussians_initial": start["n_gaussians"], "n_gaussians_final": metrics["n_gaussians"],
                     "thresholds": metrics["thresholds"]})
        panels.append((f"{init} {final['psnr']:.1f} dB", run.volume()))
    slices = out / "slices.png"
    _slices_figure(slices, panels)

    g = scan.geometry
    settings = config.evaluation
    (psnr_key, _, _), (ssim_key, _, _) = quality_thresholds(settings.psnr_threshold, settings.ssim_threshold)
    lines = [f"# ctrecon demo ({profile} profile, {device})", "",
             f"Case: {case.name}, {'x'.join(map(str, g.nVoxel))} voxels (Z, Y, X) at "
             f"{'x'.join(f'{d:g}' for d in g.dVoxel)} mm; {g.n_angles}-view circular cone-beam scan (noiseless); "
             f"3DGR-CT ({config.optimizer.method} optimizer) "
             f"{'until the data residual stops improving, at most ' if config.schedule.iterations == 'auto' else ''}"
             f"{config.iteration_cap} iterations, "
             f"{config.views_per_step(g.n_angles) or 'all'} views per iteration.", "",
             f"FDK: PSNR {fdk_quality['psnr']:.2f} dB, SSIM {fdk_quality['ssim_slice']:.4f} (axial slices, 3DGR-CT) / "
             f"{fdk_quality['ssim3d']:.4f} (3-D).", "",
             "| init | Gaussians (start) | init s | PSNR at start | final PSNR (dB) | final SSIM slice / 3-D | "
             f"to {threshold_label('psnr', settings.psnr_threshold)} | to {threshold_label('ssim', settings.ssim_threshold)} | "
             "iterations (stop) | optimisation s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        f = row["final"]
        lines.append(f"| {row['init']} | {row['n_gaussians_initial']} | {row['init_seconds']:.1f} | "
                     f"{row['initial_psnr']:.2f} | {f['psnr']:.2f} | {f['ssim_slice']:.4f} / {f['ssim3d']:.4f} | "
                     f"{_threshold_text(row['thresholds'][psnr_key])} | {_threshold_text(row['thresholds'][ssim_key])} | "
                     f"{row['iterations']} ({row['stop_reason']}) | {row['wall_seconds']:.1f} |")
    lines += ["", "Seconds exclude evaluation; 'init s' is FDK + initialisation. SSIM 0.90 uses the axial-slice "
              "SSIM (7x7 window, data range 1).", "",
              f"- slices: {slices}", f"- convergence curves: {out / 'report' / 'curves.png'}",
              f"- full report (table, paired tests): {out / 'report' / 'report.md'}",
              f"- runs: {out / 'runs'}"]
    markdown = "\n".join(lines) + "\n"
    summary = {"profile": profile, "device": str(device), "case": str(case), "views": DEMO_VIEWS,
               "config": config.to_dict(), "fdk": fdk_quality, "inits": rows, "slices": str(slices),
               "curves": str(out / "report" / "curves.png"), "report": str(out / "report" / "report.md"),
               "summary": str(out / "summary.md"), "priors": priors or {}}
    with atomic_output(out / "summary.md") as tmp:
        tmp.write_text(markdown, encoding="utf-8")
    write_json(out / "summary.json", summary)
    return {**summary, "markdown": markdown}
