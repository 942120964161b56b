#!/usr/bin/env python3
"""Convergence of 3DGR-CT: iterations and seconds to PSNR 35 dB / SSIM 0.90 per initialisation and optimiser.

Every (case, optimiser, initialisation) run reconstructs the same simulated scan of each case with
the library's settings of that optimiser (``ReconstructConfig.from_dict({"method": ...})``) up to the
same iteration cap, evaluated every ``--eval-every`` iterations; the runs share the machine in
``--jobs`` worker processes of one thread each (start them together, so their seconds compare).
``--variant NAME=JSON`` adds arms of other settings (over their method's defaults), so a change is
measured against the defaults in one run. Reported per run: iterations and optimisation seconds to each
threshold, the quality at the cap, the peak PSNR and the largest fall between evaluations after
iteration 100, seconds per iteration, the Gaussian count, peak RSS of its process, and where the
residual rule of ``iterations="auto"`` would have stopped (the quality there, from the nearest
evaluation not after it); per initialisation the ratio of the 3dgr optimiser's iterations and seconds
to the preconditioned one's.

    python scripts/bench_convergence.py --out out/conv                        # held-out abdomen, 120 views
    python scripts/bench_convergence.py --case lung1=../shared/data/ct/chest_pyradiomics_lung1.nii.gz \\
        --spacing 3 --dose 1e5 --out out/conv_dev_noisy
    python scripts/bench_convergence.py --case lung1=../shared/data/ct/chest_pyradiomics_lung1.nii.gz \\
        --spacing 3 --inits fbp --iters 600 --variant 'notv={"lambda_tv": 0}' --out out/dev_tv

Cases: NAME=PATH of a CT volume in HU, resampled to ``--spacing`` mm when given, then centre-cropped
to ``--crop``. The default case is the held-out abdomen (``abdomen_ts_example``, 3 mm): report on it,
never tune on it. Writes OUT/results.json and OUT/table.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_CT = REPO.parent / "shared" / "data" / "ct"
DEFAULT_CASE = f"abdomen={SHARED_CT / 'abdomen_ts_example.nii.gz'}"
OPTIMIZERS = ("preconditioned", "3dgr")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", default=None, metavar="NAME=PATH",
                        help=f"a case (repeatable) [default: {DEFAULT_CASE}]")
    parser.add_argument("--spacing", type=float, default=None, help="resample each case to this voxel size (mm) first")
    parser.add_argument("--crop", default="48,96,96", help="centre crop Z,Y,X (voxels)")
    parser.add_argument("--views", type=int, default=120)
    parser.add_argument("--dose", type=float, default=None, help="incident photons per pixel (Poisson noise)")
    parser.add_argument("--inits", default="fbp,medgmae,medgmae-star")
    parser.add_argument("--prior", action="append", default=[], metavar="INIT=PATH",
                        help="the prior file of a prior initialiser (repeatable) [default: the shipped one]")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="an extra arm (repeatable): settings over the library's defaults of their method "
                             "(\"method\" in JSON, default preconditioned), e.g. "
                             "'val8={\"validation_views\": 8}'")
    parser.add_argument("--iters", type=int, default=None,
                        help="iterations of every run [default: each optimiser's own: 'auto' (the residual rule, "
                             "at most 3000) for preconditioned, --iters-3dgr for 3dgr]")
    parser.add_argument("--iters-3dgr", type=int, default=2500, help="iteration cap of the 3dgr runs")
    parser.add_argument("--views-per-iter-3dgr", type=int, default=10,
                        help="views per iteration of the 3dgr optimiser (its library default is all views; 10 "
                             "keeps CPU runs affordable and matches the earlier evidence)")
    parser.add_argument("--n-gaussians", type=int, default=50_000)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--stop-at-thresholds", action="store_true", help="end each run once both thresholds are met")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    args.case = args.case or [DEFAULT_CASE]
    args.crop = tuple(int(v) for v in args.crop.split(","))
    args.inits = [v.strip() for v in args.inits.split(",") if v.strip()]
    args.optimizers = [v.strip() for v in args.optimizers.split(",") if v.strip()]
    unknown = set(args.optimizers) - set(OPTIMIZERS)
    if unknown:
        parser.error(f"unknown optimizer(s) {', '.join(sorted(unknown))}; choose from {', '.join(OPTIMIZERS)}")
    args.arms = {name: {"method": name} for name in args.optimizers}
    for item in args.variant:
        name, sep, text = item.partition("=")
        try:
            settings = json.loads(text)
        except json.JSONDecodeError as err:
            parser.error(f"--variant {name}: not JSON ({err})")
        if not sep or not name or name in args.arms or not isinstance(settings, dict):
            parser.error(f"--variant must be a new NAME=JSON object, got {item!r}")
        args.arms[name] = {"method": "preconditioned", **settings}
    return args


def make_scan(path: str, spacing, crop, views: int, dose, seed: int):
    """The scan of one case: resample (optional) → centre crop → simulate (deterministic for a seed)."""
    from ctrecon.core.io import VolumeData, read_volume
    from ctrecon.pipeline.simulate import resample_volume, simulate_scan

    volume = read_volume(path)
    if spacing is not None:
        array, resampled = resample_volume(volume.array, volume.spacing, spacing_out=spacing)
        volume = VolumeData(array, resampled, volume.origin, volume.description)
    volume = volume.centre_crop(crop)
    return simulate_scan(volume.array, volume.spacing, views, dose_i0=dose, seed=seed, source=str(path))


def auto_stop(losses: list, config) -> int | None:
    """The first iteration at which ``iterations="auto"`` would have stopped (None: not within the run)."""
    from ctrecon.pipeline.reconstruct import residual_converged

    window, tolerance = config.stopping.residual_window, config.stopping.residual_tolerance
    for end in range(2 * window, len(losses) + 1, window):
        if residual_converged(losses[:end], window, tolerance):
            return end
    return None


def run_one(job: dict) -> dict:
    """One reconstruction (in a worker process, one thread)."""
    import torch

    torch.set_num_threads(1)
    from ctrecon.operators.fdk import fdk
    from ctrecon.pipeline.metrics import psnr
    from ctrecon.pipeline.reconstruct import ReconstructConfig, reconstruct

    scan = make_scan(job["path"], job["spacing"], job["crop"], job["views"], job["dose"], job["seed"])
    settings = {"n_gaussians": job["n_gaussians"], "eval_every": job["eval_every"],
                "stop_at_thresholds": job["stop_at_thresholds"]}
    if job["settings"]["method"] == "3dgr":
        settings.update(views_per_iter=job["views_per_iter_3dgr"], strategy=None, iterations=job["iters_3dgr"])
    if job["iters"] is not None:
        settings["iterations"] = job["iters"]
    settings.update(job["settings"])
    config = ReconstructConfig.from_dict(settings)
    losses = []
    started = time.perf_counter()
    init = job["init"]
    if job["prior"] is not None:
        from priors.zero_shot import PriorInit

        init = PriorInit(job["prior"], name=init)
    result = reconstruct(scan, init=init, config=config, device="cpu", seed=job["seed"],
                         callback=lambda p: losses.append(p.loss) if p.loss is not None else None)
    history = result.history
    psnrs = [(h["iteration"], h["psnr"]) for h in history]
    peak = max(psnrs, key=lambda item: item[1])
    stop = (result.iterations if result.stop_reason == "data residual converged"
            else auto_stop(losses, ReconstructConfig.from_dict({"method": "preconditioned"})))
    at_stop = max((h for h in history if stop is not None and h["iteration"] <= stop), key=lambda h: h["iteration"],
                  default=None)
    return {**{k: job[k] for k in ("case", "optimizer", "init")},
            "fdk_psnr": psnr(fdk(scan.projections, scan.geometry), torch.as_tensor(scan.ground_truth)),
            "start_psnr": history[0]["psnr"], "iterations": result.iterations, "final": result.final,
            "thresholds": result.thresholds, "seconds_per_iteration": result.to_metrics()["seconds_per_iteration"],
            "iterations_run": result.to_metrics()["iterations_run"],
            "init_seconds": result.init_seconds, "n_gaussians": [history[0]["n_gaussians"], result.n_gaussians],
            "stop_reason": result.stop_reason, "auto_stop": stop, "peak": peak, "max_dip_after_100": max_dip(psnrs, 100),
            "validation": result.validation, "auto_stop_psnr": at_stop["psnr"] if at_stop else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "wall_seconds": time.perf_counter() - started, "config": config.to_dict(),
            "history": [[h["iteration"], round(h["seconds"], 2), round(h["psnr"], 3), round(h["ssim_slice"], 4)]
                        for h in history]}


def max_dip(psnrs: list, after: int) -> float:
    """The largest fall of PSNR (dB) between consecutive evaluations after iteration ``after`` (0: none)."""
    later = [value for iteration, value in psnrs if iteration >= after]
    return max([0.0] + [a - b for a, b in zip(later, later[1:])])


def threshold_cell(run: dict, key: str) -> str:
    reached = run["thresholds"].get(key)
    return f"{reached['iteration']} / {reached['seconds']:.0f} s" if reached else f"≥ {run['iterations']} (not reached)"


def table(runs: list) -> str:
    lines = ["| case | optimizer | init | start → final PSNR | final slice SSIM | it / s to 35 dB | "
             "it / s to SSIM 0.90 | s/it | Gaussians | auto stop (PSNR there) | peak PSNR (it) | max dip after 100 "
             "| peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        stop = f"{r['auto_stop']} ({r['auto_stop_psnr']:.2f})" if r["auto_stop"] else "–"
        lines.append(f"| {r['case']} | {r['optimizer']} | {r['init']} | {r['start_psnr']:.2f} → {r['final']['psnr']:.2f} "
                     f"| {r['final']['ssim_slice']:.3f} | {threshold_cell(r, 'psnr35')} | {threshold_cell(r, 'ssim90')} "
                     f"| {r['seconds_per_iteration']:.3f} | {r['n_gaussians'][0]} → {r['n_gaussians'][1]} | {stop} "
                     f"| {r['peak'][1]:.2f} ({r['peak'][0]}) | {r['max_dip_after_100']:.2f} | {r['peak_rss_mb']:.0f} |")
    ratios = []
    for r in runs:
        if r["optimizer"] != "preconditioned":
            continue
        other = next((o for o in runs if o["optimizer"] == "3dgr" and o["case"] == r["case"] and o["init"] == r["init"]),
                     None)
        mine, theirs = r["thresholds"].get("psnr35"), other and other["thresholds"].get("psnr35")
        if other is None:
            continue
        if mine and theirs:
            ratios.append(f"- {r['case']} {r['init']}: 3dgr / preconditioned = {theirs['iteration'] / mine['iteration']:.1f}× "
                          f"iterations, {theirs['seconds'] / mine['seconds']:.1f}× seconds to 35 dB")
        elif mine:
            ratios.append(f"- {r['case']} {r['init']}: 3dgr did not reach 35 dB in {other['iterations']} iterations; "
                          f"preconditioned at {mine['iteration']} (≥ {other['iterations'] / mine['iteration']:.1f}×)")
    return "\n".join(lines + ([""] + ratios if ratios else []))


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = [item.split("=", 1) for item in args.case]
    priors = dict(item.split("=", 1) for item in args.prior)
    jobs = [{"case": name, "path": path, "spacing": args.spacing, "crop": args.crop, "views": args.views,
             "dose": args.dose, "seed": args.seed, "optimizer": arm, "settings": settings, "init": init,
             "prior": priors.get(init), "iters": args.iters,
             "n_gaussians": args.n_gaussians, "eval_every": args.eval_every,
             "stop_at_thresholds": args.stop_at_thresholds, "views_per_iter_3dgr": args.views_per_iter_3dgr,
             "iters_3dgr": args.iters_3dgr}
            for name, path in cases for init in args.inits for arm, settings in args.arms.items()]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        runs = []
        for run in pool.map(run_one, jobs):
            runs.append(run)
            print(f"[{time.strftime('%H:%M:%S')}] {run['case']} {run['optimizer']} {run['init']}: {run['iterations']} "
                  f"iterations ({run['stop_reason']}), final PSNR {run['final']['psnr']:.2f}", flush=True)
    (out / "results.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "runs": runs},
                                                 indent=1, default=str))
    text = table(runs)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
