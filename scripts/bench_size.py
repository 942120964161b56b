#!/usr/bin/env python3
"""Time and peak memory of every stage at clinical sizes, and how they scale with voxels and Gaussians.

For each ``--shapes`` entry (Z,Y,X voxels, or ``native`` for the volume's own grid) the case is resampled
to that shape and scanned with ``--views`` views, then, stage by stage, each with its own wall time and
peak resident memory (the kernel's high-water mark is reset before each stage where Linux allows it):
``simulate`` (read, resample, project), ``fdk``, ``init`` (``--init``, its Gaussians capped at
``--n-gaussians``) and ``iterations`` (``--iters`` iterations of the preconditioned default; seconds per
iteration exclude evaluation). The scaling table fits ``seconds per iteration ∝ voxels^a`` and
``∝ Gaussians^b`` over the shapes (least squares in log-log).

    python scripts/bench_size.py --shapes 64,64,64 128,128,128 128,256,256 --json out/size.json
    python scripts/bench_size.py --case ../shared/data/ct/chest_lungdx_dicom --shapes native --stages simulate,fdk

The default case is the development chest CT lung1 (512×512×48 at 0.57×0.57×5 mm). Sets OMP_WAIT_POLICY=PASSIVE
(unless set) before torch is imported, as scripts/bench_reconstruct.py does.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

# bench_reconstruct (this folder) sets OMP_WAIT_POLICY before torch is imported and puts the checkout on sys.path.
import bench_reconstruct  # noqa: F401
from bench_convergence import SHARED_CT
from bench_iteration import peak_rss_mib, reset_peak_rss

import torch  # after bench_reconstruct: OMP_WAIT_POLICY is set

STAGES = ("simulate", "fdk", "init", "iterations")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default=str(SHARED_CT / "chest_pyradiomics_lung1.nii.gz"),
                        help="a CT volume (NIfTI, DICOM folder) [default: the development lung1 CT]")
    parser.add_argument("--shapes", nargs="+", default=["64,64,64", "128,128,128", "128,256,256"],
                        help="grids Z,Y,X to resample to, or 'native'")
    parser.add_argument("--views", type=int, default=120)
    parser.add_argument("--init", default="medgmae-star")
    parser.add_argument("--n-gaussians", type=int, default=50_000, help="the initial field's cap")
    parser.add_argument("--voxels-per-gaussian", type=float, default=None,
                        help="instead of --n-gaussians: a cap of voxels / this, so the budget grows with the grid")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the results here")
    return parser.parse_args(argv)


def staged(name: str, results: dict, work):
    """Run ``work()`` as stage ``name``: its wall seconds and peak RSS (MiB) go into ``results``."""
    exact = reset_peak_rss()
    started = time.perf_counter()
    value = work()
    results[name] = {"seconds": time.perf_counter() - started, "peak_rss_mib": peak_rss_mib(),
                     "peak_is_stage_only": exact}
    return value


def bench_shape(args, shape_text: str, stages: set) -> dict:
    from ctrecon.core.io import read_volume
    from ctrecon.methods.gaussians import get_initializer
    from ctrecon.operators.fdk import fdk
    from ctrecon.pipeline.metrics import psnr
    from ctrecon.pipeline.reconstruct import ReconstructConfig, reconstruct
    from ctrecon.pipeline.simulate import simulate_scan

    shape = None if shape_text == "native" else tuple(int(v) for v in shape_text.split(","))
    row = {"shape": shape_text}

    def simulate():
        volume = read_volume(args.case)
        return simulate_scan(volume.array, volume.spacing, args.views, shape=shape, source=args.case)

    scan = staged("simulate", row, simulate)
    grid = scan.geometry
    row.update(nVoxel=list(grid.nVoxel), dVoxel=list(grid.dVoxel), voxels=math.prod(grid.nVoxel),
               detector=list(grid.nDetector))
    if "fdk" not in stages:
        return row
    volume = staged("fdk", row, lambda: fdk(scan.projections, grid))
    row["fdk_psnr"] = psnr(volume, torch.as_tensor(scan.ground_truth))
    if "init" not in stages:
        return row
    initializer = get_initializer(args.init)
    budget = args.n_gaussians if args.voxels_per_gaussian is None else max(1, round(row["voxels"] / args.voxels_per_gaussian))
    field = staged("init", row, lambda: initializer(volume, grid.volume, budget, torch.Generator().manual_seed(0)))
    row["gaussians"] = len(field)
    if "iterations" not in stages:
        return row
    config = ReconstructConfig.from_dict({"method": "preconditioned", "iterations": args.iters,
                                          "eval_every": args.iters, "n_gaussians": len(field),
                                          "max_gaussians": max(len(field), 200_000)})
    result = staged("iterations", row, lambda: reconstruct(scan, init=args.init, init_field=field, config=config))
    metrics = result.to_metrics()
    row.update(seconds_per_iteration=metrics["seconds_per_iteration"], phases=metrics["timing"],
               psnr_after=result.final["psnr"])
    return row


def exponent(xs, ys) -> float | None:
    """Least-squares slope of log(ys) against log(xs); None for fewer than two distinct xs."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y]
    if len({x for x, _ in points}) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    return sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    stages = set(args.stages.split(","))
    unknown = stages - set(STAGES)
    if unknown:
        raise SystemExit(f"unknown stage(s) {', '.join(sorted(unknown))}; choose from {', '.join(STAGES)}")
    rows = []
    for shape in args.shapes:
        row = bench_shape(args, shape, stages)
        rows.append(row)
        cells = [f"{stage} {row[stage]['seconds']:.1f} s / {row[stage]['peak_rss_mib']:.0f} MiB"
                 for stage in STAGES if stage in row]
        extra = (f", {row['gaussians']} Gaussians" if "gaussians" in row else "") + (
            f", {row['seconds_per_iteration']:.2f} s/it" if "seconds_per_iteration" in row else "")
        print(f"{'x'.join(map(str, row['nVoxel']))} ({row['voxels'] / 1e6:.2f} M voxels){extra}: " + "; ".join(cells),
              flush=True)
    timed = [row for row in rows if "seconds_per_iteration" in row]
    fit = {"voxels": exponent([r["voxels"] for r in timed], [r["seconds_per_iteration"] for r in timed]),
           "gaussians": exponent([r["gaussians"] for r in timed], [r["seconds_per_iteration"] for r in timed])}
    if timed:
        print("seconds per iteration ∝ voxels^" + (f"{fit['voxels']:.2f}" if fit["voxels"] is not None else "?")
              + ", ∝ Gaussians^" + (f"{fit['gaussians']:.2f}" if fit["gaussians"] is not None else "?"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "torch_threads": torch.get_num_threads(),
                                               "rows": rows, "exponents": fit}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
