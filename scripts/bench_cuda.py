#!/usr/bin/env python3
"""Benchmark the CUDA kernels (cuda/, glue in ctrecon/operators/) on one GPU against the project's targets.

    projector    Joseph forward and exact adjoint, 256³ volume -> 120 views × 512² detector
    voxelizer    100k Gaussians -> 256³ grid, forward + backward          (target ≤ 10 ms on one H100)
    pretrain     pre-training renderer: batch of 8 crops × 512 Gaussians × 96³, forward + backward
    reconstruct  256×256×128 real CT (Z=128), 120 views, ctrecon.pipeline.reconstruct until PSNR ≥ 35 dB
                 (target ≤ 30 s end to end: simulation excluded, FDK + initialisation + optimisation included)

    python scripts/bench_cuda.py                              # all four, prints a table
    python scripts/bench_cuda.py --only voxelizer,pretrain --out bench_cuda.json

Timings are medians over --repeats runs after warm-up (the first call builds the extension, cached
afterwards), measured with CUDA events around the public API calls (Projector, voxelize) so they
include the Python glue, the tile binning and the autograd wrapper. On a machine without a CUDA device
the script says so and exits with status 0.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_VOLUME = REPO.parent / "shared" / "data" / "ct" / "chest_pyradiomics_lung1.nii.gz"
BENCHMARKS = ("projector", "voxelizer", "pretrain", "reconstruct")
TARGETS = {"voxelizer": ("forward_backward_ms", 10.0), "reconstruct": ("seconds_to_35db", 30.0)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {BENCHMARKS}")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--volume", default=str(DEFAULT_VOLUME), help="real CT (HU) for the reconstruct benchmark")
    parser.add_argument("--max-iters", type=int, default=3000, help="iteration cap of the reconstruct benchmark")
    parser.add_argument("--views-per-iter", type=int, default=10, help="views per iteration of the reconstruct benchmark")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(args.only) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {', '.join(BENCHMARKS)}")
    return args


def timed_ms(torch, function, repeats: int) -> float:
    """Median milliseconds of ``function()`` on the current stream, after two warm-up calls."""
    for _ in range(2):
        function()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        stop.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(stop))
    return statistics.median(samples)


def random_field(torch, n, volume, sigma_voxels, batch=None, seed=0):
    """n Gaussians uniform in ``volume`` with σ uniform in ``sigma_voxels`` (voxels), random rotations."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    lead = (n,) if batch is None else (batch, n)
    span = torch.tensor(volume.sVoxel[::-1], device="cuda")
    centre = torch.tensor(volume.offOrigin[::-1], device="cuda")
    low, high = sigma_voxels
    means = centre + (torch.rand(*lead, 3, generator=g, device="cuda") - 0.5) * span
    scales = (low + (high - low) * torch.rand(*lead, 3, generator=g, device="cuda")) * min(volume.dVoxel)
    quats = torch.randn(*lead, 4, generator=g, device="cuda")
    intensities = 0.05 * torch.rand(*lead, generator=g, device="cuda")
    return [t.float().requires_grad_() for t in (means, scales, quats, intensities)]


def forward_backward(torch, voxelize, params, volume):
    grad = torch.randn((params[0].shape[0], *volume.nVoxel) if params[0].dim() == 3 else volume.nVoxel,
                       device="cuda")

    def step():
        out = voxelize(*params, volume)
        torch.autograd.backward(out, grad)

    def forward_only():
        with torch.no_grad():
            voxelize(*params, volume)

    return step, forward_only


def bench_projector(torch, args):
    from ctrecon.core.geometry import ConeBeamGeometry, VolumeGeometry
    from ctrecon.operators.projector import Projector

    geometry = ConeBeamGeometry.covering(VolumeGeometry((256, 256, 256), (1.0, 1.0, 1.0)), n_views=120,
                                         nDetector=(512, 512))
    A = Projector(geometry)
    volume = torch.rand(geometry.nVoxel, device="cuda")
    projections = torch.rand(geometry.projection_shape, device="cuda")
    return {"volume": list(geometry.nVoxel), "projections": list(geometry.projection_shape),
            "compiled": A.uses_compiled("cuda"),
            "forward_ms": timed_ms(torch, lambda: A(volume), args.repeats),
            "adjoint_ms": timed_ms(torch, lambda: A.T(projections), args.repeats)}


def bench_voxelizer(torch, args):
    from ctrecon.operators.voxelize import voxelize
    from ctrecon.core.geometry import VolumeGeometry

    volume = VolumeGeometry((256, 256, 256), (1.0, 1.0, 1.0))
    sigma = (1.0, 3.0)  # voxels; ~ the spacing of 100k Gaussians in 256³ (5.5 voxels) × 3DGR-CT's factor
    params = random_field(torch, 100_000, volume, sigma)
    step, forward_only = forward_backward(torch, voxelize, params, volume)
    return {"gaussians": 100_000, "grid": list(volume.nVoxel), "sigma_voxels": list(sigma),
            "forward_ms": timed_ms(torch, forward_only, args.repeats),
            "forward_backward_ms": timed_ms(torch, step, args.repeats)}


def bench_pretrain(torch, args):
    from ctrecon.operators.voxelize import voxelize
    from ctrecon.core.geometry import VolumeGeometry

    crop = VolumeGeometry((96, 96, 96), (1.0 / 96,) * 3, (0.5, 0.5, 0.5))  # priors.model.crop_geometry(96)
    sigma = (2.0, 8.0)  # voxels; 512 Gaussians per 96³ crop are ~12 voxels apart
    params = random_field(torch, 512, crop, sigma, batch=8)
    step, forward_only = forward_backward(torch, voxelize, params, crop)
    return {"batch": 8, "gaussians_per_crop": 512, "crop": list(crop.nVoxel), "sigma_voxels": list(sigma),
            "forward_ms": timed_ms(torch, forward_only, args.repeats),
            "forward_backward_ms": timed_ms(torch, step, args.repeats)}


def bench_reconstruct(torch, args):
    from ctrecon.core.io import load_volume
    from ctrecon.pipeline.reconstruct import ReconstructConfig, reconstruct
    from ctrecon.pipeline.simulate import simulate_scan

    if not Path(args.volume).exists():
        return {"skipped": f"real CT not found: {args.volume}"}
    hu, spacing = load_volume(args.volume)
    scan = simulate_scan(hu, spacing, 120, shape=(128, 256, 256), source=Path(args.volume).name, device="cuda")
    config = ReconstructConfig.from_dict({"iterations": args.max_iters, "views_per_iter": args.views_per_iter,
                                          "eval_every": 50, "stop_at_psnr": 35.0})
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = reconstruct(scan, init="fbp", config=config, device="cuda", seed=0)
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    reached = result.thresholds.get("psnr35")  # {"iteration", "seconds" of optimisation} or None
    return {"volume": Path(args.volume).name, "grid": list(scan.geometry.nVoxel), "views": 120,
            "views_per_iter": args.views_per_iter, "iterations": result.iterations, "stop_reason": result.stop_reason,
            "final": result.final, "init_seconds": result.init_seconds, "optimisation_seconds": result.wall_seconds,
            "eval_seconds": result.eval_seconds, "wall_seconds_with_eval": total,
            "iterations_to_35db": reached["iteration"] if reached else None,
            # FDK + initialiser + optimisation up to the first evaluation at ≥ 35 dB (evaluation excluded)
            "seconds_to_35db": result.init_seconds + reached["seconds"] if reached else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device on this machine; nothing to benchmark (the kernels run only on a GPU).")
        return 0
    from ctrecon.operators import _backend

    if _backend.kernels_for("cuda") is None:
        print("bench_cuda: the CUDA extension is unavailable (see the warning above, or CTRECON_FORCE_REFERENCE); "
              "timings would be of the torch reference.", file=sys.stderr)
        return 1
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    runners = {"projector": bench_projector, "voxelizer": bench_voxelizer, "pretrain": bench_pretrain,
               "reconstruct": bench_reconstruct}
    for name in args.only:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        results[name] = runners[name](torch, args)
        line = {k: v for k, v in results[name].items() if not isinstance(v, (dict, list))}
        print(f"    {json.dumps(line)}", flush=True)
        if name in TARGETS:
            key, target = TARGETS[name]
            value = results[name].get(key)
            verdict = "n/a" if value is None else ("met" if value <= target else "MISSED")
            print(f"    target {key} ≤ {target}: {verdict}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
