#!/usr/bin/env python3
"""Classical baselines on one simulated scan: quality against iterations and seconds for SART, OS-SART, CGLS
and FISTA-TV (a sweep of TV weights), to choose their default iteration counts and TV weight.

Each (method, setting) run reconstructs the same scan up to ``--iters`` iterations, evaluated after every
iteration, in ``--jobs`` worker processes of one thread each. Reported per run: iterations and optimisation
seconds to PSNR 35 dB and SSIM 0.90, the best PSNR and its iteration, the quality at the end, seconds per
iteration, peak RSS of its process.

    python scripts/bench_classical.py --case lung1=../shared/data/ct/chest_pyradiomics_lung1.nii.gz \\
        --spacing 3 --views 120 --tv-weights 1e-4,3e-4,1e-3,3e-3 --out out/classical_dev

Tune on development volumes only (the default case is the development lung1 CT); the held-out abdomen is
for reporting with the defaults fixed. Writes OUT/results.json and OUT/table.md.
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
sys.path.insert(0, str(REPO / "scripts"))
SHARED_CT = REPO.parent / "shared" / "data" / "ct"
DEFAULT_CASE = f"lung1={SHARED_CT / 'chest_pyradiomics_lung1.nii.gz'}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default=DEFAULT_CASE, metavar="NAME=PATH")
    parser.add_argument("--spacing", type=float, default=3.0, help="resample to this voxel size (mm) first")
    parser.add_argument("--crop", default="48,96,96", help="centre crop Z,Y,X (voxels)")
    parser.add_argument("--views", type=int, default=120)
    parser.add_argument("--dose", type=float, default=None, help="incident photons per pixel (Poisson noise)")
    parser.add_argument("--methods", default="sart,os-sart,cgls,fista-tv")
    parser.add_argument("--tv-weights", default="1e-3", help="fista-tv weights to sweep, comma-separated")
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    args.crop = tuple(int(v) for v in args.crop.split(","))
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.tv_weights = [float(w) for w in args.tv_weights.split(",")]
    return args


def run_one(job: dict) -> dict:
    """One classical reconstruction (in a worker process, one thread)."""
    import torch

    torch.set_num_threads(1)
    from bench_convergence import make_scan
    from ctrecon.pipeline.classical import ClassicalConfig, reconstruct_classical

    name, path = job["case"].split("=", 1)
    scan = make_scan(path, job["spacing"], job["crop"], job["views"], job["dose"], job["seed"])
    solver = {"name": job["method"], "iterations": job["iters"], **job["settings"]}
    config = ClassicalConfig.from_dict({"solver": solver})
    started = time.perf_counter()
    result = reconstruct_classical(scan, config=config, seed=job["seed"])
    best = max(result.history, key=lambda h: h["psnr"])
    return {"case": name, "method": job["method"], "settings": job["settings"], "iterations": result.iterations,
            "thresholds": result.thresholds, "final": result.final, "best_psnr": best["psnr"],
            "best_iteration": best["iteration"], "seconds_per_iteration": result.wall_seconds / result.iterations,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "wall_seconds": time.perf_counter() - started,
            "history": [[h["iteration"], round(h["seconds"], 2), round(h["psnr"], 3), round(h["ssim_slice"], 4)]
                        for h in result.history]}


def threshold_cell(run: dict, key: str) -> str:
    hit = run["thresholds"].get(key)
    return f"{hit['iteration']} / {hit['seconds']:.1f} s" if hit else f"≥ {run['iterations']} (not reached)"


def main(argv=None):
    args = parse_args(argv)
    jobs = []
    for method in args.methods:
        variants = [{"tv_weight": w} for w in args.tv_weights] if method == "fista-tv" else [{}]
        jobs += [{"case": args.case, "spacing": args.spacing, "crop": args.crop, "views": args.views,
                  "dose": args.dose, "seed": args.seed, "iters": args.iters, "method": method, "settings": v}
                 for v in variants]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_one, jobs))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": results}, indent=1, default=str))
    lines = [f"{args.case}, {args.views} views, dose {args.dose}, crop {args.crop}, spacing {args.spacing} mm", "",
             "| method | settings | to 35 dB (it / s) | to SSIM 0.90 | best PSNR (at it) | final PSNR | final SSIM | "
             "s/it | peak RSS MB |", "|" + "---|" * 9]
    for r in results:
        lines.append(f"| {r['method']} | {r['settings'] or ''} | {threshold_cell(r, 'psnr35')} | "
                     f"{threshold_cell(r, 'ssim90')} | {r['best_psnr']:.2f} ({r['best_iteration']}) | "
                     f"{r['final']['psnr']:.2f} | {r['final']['ssim_slice']:.4f} | {r['seconds_per_iteration']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
