"""Benchmark the Gaussian voxelizer: median forward and forward+backward times.

Cases: 10k and 50k Gaussians into 96×128×128 and 128³ (the 3DGR-CT loop), and a batch of 8 × 512
Gaussians into 96³ (the prior's training loss). Gaussians are spread uniformly over the volume with
σ uniform in [--sigma-min, --sigma-max] voxels (the FBP initialisation gives about 0.5–2 voxels) and
random rotations; the prior's case uses σ in [2, 6] voxels (512 Gaussians must cover a 96³ crop).

    python scripts/bench_render.py                        # compiled CPU kernel and reference
    python scripts/bench_render.py --backends cpu --repeats 10 --json bench.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from ctrecon.operators.voxelize import cpu_voxelizer, voxelize
from ctrecon.core.geometry import VolumeGeometry

# (name, batch, Gaussians per item, grid, σ range in voxels or None for the command-line range)
CASES = [
    ("10k -> 96x128x128", 1, 10_000, (96, 128, 128), None),
    ("50k -> 96x128x128", 1, 50_000, (96, 128, 128), None),
    ("10k -> 128^3", 1, 10_000, (128, 128, 128), None),
    ("50k -> 128^3", 1, 50_000, (128, 128, 128), None),
    ("8 x 512 -> 96^3", 8, 512, (96, 96, 96), (2.0, 6.0)),
]


def make_gaussians(batch, n, volume, sigma_range, seed=0):
    g = torch.Generator().manual_seed(seed)
    span = torch.tensor(volume.sVoxel[::-1])
    means = (torch.rand(batch, n, 3, generator=g) - 0.5) * span
    voxel = min(volume.dVoxel)
    scales = (sigma_range[0] + (sigma_range[1] - sigma_range[0]) * torch.rand(batch, n, 3, generator=g)) * voxel
    quats = torch.randn(batch, n, 4, generator=g)
    intensities = torch.rand(batch, n, generator=g) * 0.1
    return [t.requires_grad_(True) for t in (means, scales, quats, intensities)]


def timed(fn, repeats):
    """Median wall-clock seconds and median process CPU seconds (all threads) of ``fn``.

    On a shared machine the CPU time is the steadier figure: wall time includes waiting for cores.
    """
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def run_case(backend, batch, n, shape, sigma_range, repeats):
    volume = VolumeGeometry(shape, (1.0, 1.0, 1.0))
    params = make_gaussians(batch, n, volume, sigma_range)
    args = params if batch > 1 else [t[0].detach().requires_grad_(True) for t in params]
    weights = torch.rand(((batch,) if batch > 1 else ()) + tuple(shape))

    def forward():
        with torch.no_grad():
            voxelize(*args, volume, backend=backend)

    def forward_backward():
        out = voxelize(*args, volume, backend=backend)
        (out * weights).sum().backward()
        for t in args:
            t.grad = None

    forward()  # warm-up (and the one-off build of the compiled kernel)
    return timed(forward, repeats), timed(forward_backward, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="cpu,reference", help="comma list of: cpu, reference")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-repeats", type=int, default=2, help="repeats for the (slow) reference")
    parser.add_argument("--sigma-min", type=float, default=0.5, help="smallest σ in voxels")
    parser.add_argument("--sigma-max", type=float, default=2.0, help="largest σ in voxels")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--cases", default=None, help="comma list of case indices (0-based) to run")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if "cpu" in backends and cpu_voxelizer.get() is None:
        print(f"compiled kernel unavailable ({cpu_voxelizer.unavailable()}); skipping it", file=sys.stderr)
        backends.remove("cpu")
    cases = CASES if args.cases is None else [CASES[int(i)] for i in args.cases.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, σ ∈ [{args.sigma_min}, "
          f"{args.sigma_max}] voxels unless noted, k_sigma 3, float32, medians; load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'case':<22}{'backend':<11}{'forward s':>11}{'fwd+bwd s':>11}{'fwd cpu-s':>11}{'f+b cpu-s':>11}")
    results = []
    for backend in backends:
        repeats = args.repeats if backend == "cpu" else args.reference_repeats
        for name, batch, n, shape, sigma_range in cases:
            sigma_range = sigma_range or (args.sigma_min, args.sigma_max)
            (fwd, fwd_cpu), (both, both_cpu) = run_case(backend, batch, n, shape, sigma_range, repeats)
            print(f"{name:<22}{backend:<11}{fwd:>11.3f}{both:>11.3f}{fwd_cpu:>11.3f}{both_cpu:>11.3f}", flush=True)
            results.append({"case": name, "backend": backend, "batch": batch, "n_gaussians": n,
                            "shape": list(shape), "sigma_voxels": list(sigma_range), "forward_s": fwd,
                            "forward_backward_s": both, "forward_cpu_s": fwd_cpu,
                            "forward_backward_cpu_s": both_cpu,
                            "repeats": repeats, "threads": torch.get_num_threads()})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
