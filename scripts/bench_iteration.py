#!/usr/bin/env python3
"""Benchmark one 3DGR-CT iteration on the CPU, phase by phase, on a realistic case.

The case: a real chest CT resampled to ``--spacing`` mm, centre-cropped to ``--crop`` voxels, scanned
with ``--views`` views (noiseless), FDK, the "fbp" initialiser with ``--n-gaussians`` Gaussians; then
iterations with ``--views-per-iter`` random views, no density control, on ``--threads`` threads.

Two measurements, alternating iteration by iteration after ``--warmup`` iterations of each:

* ``Trainer.step`` itself (ctrecon.pipeline.reconstruct), split by its own clock into render, project
  and backward (= loss + backward + Adam);
* the same iteration spelled out, to split the backward: the projector adjoint (∂loss/∂volume), the
  voxelizer backward with the chain through covariance, activation and quaternion (volume.backward),
  and the Adam step.

Reports medians over ``--repeats`` iterations and the peak resident memory of the iterations (the
high-water mark is reset after the set-up, where the kernel allows it).

    python scripts/bench_iteration.py                  # 48×96×96 at 3 mm, 50 000 Gaussians, 10 views, 2 threads
    python scripts/bench_iteration.py --repeats 40 --json out/bench_iteration.json

Sets OMP_WAIT_POLICY=PASSIVE (unless already set) before torch is imported, as scripts/bench_reconstruct.py does.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

# bench_reconstruct (this folder) sets OMP_WAIT_POLICY before torch is imported and puts the checkout on sys.path.
from bench_reconstruct import DEFAULT_VOLUME

import torch  # after bench_reconstruct: OMP_WAIT_POLICY is set
import torch.nn.functional as F


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volume", default=str(DEFAULT_VOLUME), help="CT volume (NIfTI/DICOM/npy) in HU.")
    parser.add_argument("--spacing", type=float, default=3.0, help="Resampled voxel size (mm).")
    parser.add_argument("--crop", default="48,96,96", help="Centre crop Z,Y,X after resampling.")
    parser.add_argument("--views", type=int, default=120)
    parser.add_argument("--views-per-iter", type=int, default=10)
    parser.add_argument("--n-gaussians", type=int, default=50_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="Also write the results here.")
    return parser.parse_args(argv)


def build_case(args):
    """(scan, field, config) of the benchmark case."""
    from ctrecon.core.io import VolumeData, read_volume
    from ctrecon.methods.gaussians import get_initializer
    from ctrecon.operators.fdk import fdk
    from ctrecon.pipeline.reconstruct import ReconstructConfig
    from ctrecon.pipeline.simulate import resample_volume, simulate_scan

    source = read_volume(args.volume)
    array, spacing = resample_volume(source.array, source.spacing, spacing_out=args.spacing)
    crop = tuple(int(v) for v in args.crop.split(","))
    volume = VolumeData(array, spacing, source.origin, source.description).centre_crop(crop)
    scan = simulate_scan(volume.array, volume.spacing, args.views, seed=args.seed, source=Path(args.volume).name)
    config = ReconstructConfig.from_dict({"n_gaussians": args.n_gaussians, "views_per_iter": args.views_per_iter,
                                          "strategy": None})
    generator = torch.Generator().manual_seed(args.seed)
    fdk_volume = fdk(scan.projections, scan.geometry)
    field = get_initializer("fbp")(fdk_volume, scan.geometry.volume, args.n_gaussians, generator)
    return scan, field, config


def spelled_out_step(trainer, iteration: int) -> dict:
    """Trainer.step's work without its guards, timed finer; returns seconds per phase."""
    from ctrecon.pipeline.reconstruct import learning_rates

    times, mark = {}, time.perf_counter()

    def phase(name):
        nonlocal mark
        now = time.perf_counter()
        times[name] = now - mark
        mark = now

    rates = learning_rates(iteration - 1, trainer.config, trainer.extent)
    for group in trainer.optimizer.param_groups:
        group["lr"] = rates[group["name"]]
    chosen = trainer.views.next()
    projector, wanted = trainer.full_projector.subset(chosen), trainer.target[chosen]
    phase("setup")
    volume = trainer.field.render(trainer.grid, trainer.config.gaussians.k_sigma)
    phase("render")
    predicted = projector(volume) / trainer.projection_scale
    phase("project")
    loss = F.mse_loss(predicted, wanted)
    (grad_volume,) = torch.autograd.grad(loss, volume, retain_graph=True)
    phase("adjoint")
    volume.backward(grad_volume)
    phase("voxelizer_backward")
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    phase("adam")
    times["total"] = sum(times.values())
    return times


def trainer_step(trainer, iteration: int) -> dict:
    """Trainer.step, split by its clock."""
    before = dict(trainer.clock.phases)
    start = time.perf_counter()
    trainer.step(iteration)
    times = {name: trainer.clock.phases[name] - before[name] for name in ("render", "project", "backward")}
    times["total"] = time.perf_counter() - start
    return times


def reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None):
    args = parse_args(argv)
    from ctrecon.pipeline.reconstruct import Trainer

    torch.set_num_threads(args.threads)
    scan, field, config = build_case(args)
    trainer = Trainer(scan, field, config, device=torch.device("cpu"), generator=torch.Generator().manual_seed(1),
                      regularizer=None, init="fbp", init_seconds=0.0)
    setup_peak = peak_rss_mib()
    reset = reset_peak_rss()
    runs = {"Trainer.step": (trainer_step, []), "spelled out": (spelled_out_step, [])}
    iteration = 0
    for repeat in range(args.warmup + args.repeats):
        for function, samples in runs.values():
            iteration += 1
            times = function(trainer, iteration)
            if repeat >= args.warmup:
                samples.append(times)
    print(f"case: {Path(args.volume).name} at {args.spacing} mm, crop {scan.geometry.nVoxel}, {args.views} views, "
          f"{len(field)} Gaussians, {args.views_per_iter} views/iteration; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; medians of {args.repeats} iterations (s); load average "
          f"{os.getloadavg()[0]:.1f}")
    report = {"case": {"volume": args.volume, "spacing": args.spacing, "shape": list(scan.geometry.nVoxel),
                       "views": args.views, "views_per_iter": args.views_per_iter, "n_gaussians": len(field),
                       "threads": torch.get_num_threads(), "repeats": args.repeats}}
    for name, (_, samples) in runs.items():
        medians = {phase: statistics.median(s[phase] for s in samples) for phase in samples[0]}
        print(f"{name:<14}" + "  ".join(f"{phase} {value:.4f}" for phase, value in medians.items()))
        report[name] = medians
    peak = peak_rss_mib()
    print(f"peak RSS: {peak:.0f} MiB during the iterations" if reset else f"peak RSS: {peak:.0f} MiB (whole run)",
          f"(set-up: {setup_peak:.0f} MiB)")
    report["peak_rss_mib"] = {"iterations" if reset else "whole_run": peak, "setup": setup_peak}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)


if __name__ == "__main__":
    main()
