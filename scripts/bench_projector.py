#!/usr/bin/env python
"""Benchmark the cone-beam projector (forward A, adjoint Aᵀ) and FDK, optionally against itk-rtk.

For each size n: an n³ grid of 1 mm voxels holding the 3-D Shepp–Logan phantom, a covering circular
scan of --views views on an n×n detector (ConeBeamGeometry.covering). Backends:

  cpu-reference   the torch reference on the CPU
  cpu-compiled    the compiled CPU path (C++, built on first use; the build is not timed)
  cuda            Projector's dispatch for CUDA float32 tensors (CUDA kernels, else the reference)
  cuda-reference  the torch reference on the GPU                      (both CUDA rows only with a GPU)

Every time is the median of --repeats runs after one untimed warm-up (the CPU reference, which is
slow, runs --reference-repeats times without warm-up). Wall seconds and process CPU seconds are both
reported: on a machine shared with other jobs CPU seconds are the steadier figure. "speed-up" is the
CPU reference's wall time divided by the row's, measured in the same process. "error" is the forward
projection's relative L2 distance to the phantom's analytic line integrals.

FDK (ctrecon.operators.fdk.fdk, ram-lak) is timed on the CPU (and the GPU) when the module imports. itk-rtk
(`pip install itk-rtk`; never a dependency of ctrecon) is timed when it imports: RTK's
JosephForwardProjectionImageFilter and JosephBackProjectionImageFilter on the same volume and scan,
mapped to RTK's frame (rotation axis y; our (x, y, z) is RTK's (z, x, y); SID = DSO, SDD = DSD, gantry
angle = our angle), with the relative difference of its results to ours as a sanity check: forward
projections of the phantom, and back projections (of the analytic projections) on the phantom's support.
RTK clips rays at the grid's faces differently, so back projections differ near the faces, where the
phantom is zero.

Examples:
    python scripts/bench_projector.py                                  # 64, 128, 256; 120 views
    python scripts/bench_projector.py --sizes 128 --threads 2 --repeats 7 --out bench_projector.json
    python scripts/bench_projector.py --sizes 64,128 --reference-sizes 64 --no-itk
"""
from __future__ import annotations

import argparse
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ctrecon.core import phantoms  # noqa: E402
from ctrecon.core.geometry import ConeBeamGeometry, VolumeGeometry  # noqa: E402
from ctrecon.operators.projector import Projector, cpu_projector  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--sizes", default="64,128,256", help="volume sizes n (n³ voxels), comma-separated")
    parser.add_argument("--views", type=int, default=120, help="number of views")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--reference-repeats", type=int, default=1, help="timed runs of the CPU reference")
    parser.add_argument("--reference-sizes", default=None,
                        help="sizes at which to run the CPU reference (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch and RTK; default: torch's)")
    parser.add_argument("--no-fdk", action="store_true", help="skip FDK")
    parser.add_argument("--no-itk", action="store_true", help="skip itk-rtk even when installed")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def sizes_of(text):
    return [int(s) for s in text.split(",") if s.strip()]


def median_time(run, repeats, warmup=True, synchronize=None):
    """Median wall and process-CPU seconds of ``run()`` over ``repeats`` runs; returns (wall, cpu, last result)."""
    if warmup:
        run()
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        if synchronize:
            synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        result = run()
        if synchronize:
            synchronize()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kB on Linux


def relative_difference(value, reference):
    value = np.asarray(value, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


def case(n, views):
    volume = VolumeGeometry((n, n, n), (256.0 / n,) * 3)
    geometry = ConeBeamGeometry.covering(volume, n_views=views, nDetector=(n, n))
    ellipsoids = phantoms.shepp_logan_3d(volume)
    voxels = torch.from_numpy(phantoms.ellipsoid_volume(ellipsoids, volume, supersample=1))
    return geometry, voxels, phantoms.ellipsoid_projections(ellipsoids, geometry)


def backends():
    """(name, device, Projector backend) of every projector configuration to time here."""
    rows = [("cpu-reference", "cpu", "reference"), ("cpu-compiled", "cpu", "cpu")]
    if torch.cuda.is_available():
        rows += [("cuda", "cuda", "auto"), ("cuda-reference", "cuda", "reference")]
    return rows


def bench_projector(geometry, voxels, exact, name, device, backend, repeats):
    A = Projector(geometry, backend=backend)
    x = voxels.to(device)
    y = torch.from_numpy(exact.astype(np.float32)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else None
    if backend == "cpu" and cpu_projector.get() is None:
        return None
    warm = name != "cpu-reference"
    forward_wall, forward_cpu, projections = median_time(lambda: A(x), repeats, warm, sync)
    adjoint_wall, adjoint_cpu, backprojection = median_time(lambda: A.T(y), repeats, warm, sync)
    return {"backend": name, "forward_s": forward_wall, "forward_cpu_s": forward_cpu, "adjoint_s": adjoint_wall,
            "adjoint_cpu_s": adjoint_cpu, "error_vs_analytic": relative_difference(projections.cpu(), exact),
            "projections": projections.cpu().numpy(), "backprojection": backprojection.cpu().numpy()}


def bench_fdk(geometry, projections, device, repeats):
    try:
        from ctrecon.operators.fdk import fdk
    except ImportError as err:
        return {"skipped": f"ctrecon.operators.fdk not importable ({err})"}
    data = torch.from_numpy(projections).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else None
    wall, cpu, _ = median_time(lambda: fdk(data, geometry, device=device), repeats, True, sync)
    return {"device": device, "fdk_s": wall, "fdk_cpu_s": cpu}


def rtk_images(geometry, voxels):
    """The volume as an itk image, sources of an empty projection stack and an empty volume, and the RTK
    geometry of our scan. (RTK's projectors run in place: they consume the buffer of their first input,
    so repeated updates need that input's source alive.)"""
    import itk
    from itk import RTK as rtk

    from ctrecon.core.geometry_files import rtk_volume_image

    image_type = itk.Image[itk.F, 3]
    volume = rtk_volume_image(voxels.numpy(), geometry.volume)  # ctrecon (x, y, z) is RTK's (Z, X, Y)
    rtk_geometry = rtk.ThreeDCircularProjectionGeometry.New()
    for angle in geometry.angles:
        rtk_geometry.AddProjection(geometry.DSO, geometry.DSD, math.degrees(angle), 0.0, 0.0)
    v_offsets, u_offsets = geometry.pixel_offsets()
    (n_rows, n_cols), (dv, du) = geometry.nDetector, geometry.dDetector
    stack = rtk.ConstantImageSource[image_type].New()
    stack.SetOrigin([u_offsets[0], v_offsets[0], 0.0])
    stack.SetSpacing([du, dv, 1.0])
    stack.SetSize([n_cols, n_rows, geometry.n_angles])
    stack.SetConstant(0.0)
    empty_volume = rtk.ConstantImageSource[image_type].New()
    empty_volume.SetOrigin(volume.GetOrigin())
    empty_volume.SetSpacing(volume.GetSpacing())
    empty_volume.SetSize(volume.GetLargestPossibleRegion().GetSize())
    empty_volume.SetConstant(0.0)
    return image_type, volume, stack, empty_volume, rtk_geometry


def bench_rtk(geometry, voxels, exact, ours, repeats, threads):
    """RTK Joseph forward/back projection times, and the differences of its results to ``ours`` (a row of
    :func:`bench_projector`: our projection of ``voxels`` and our adjoint applied to ``exact``)."""
    import itk
    from itk import RTK as rtk

    from ctrecon.core.geometry_files import volume_from_rtk

    if threads:
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    image_type, volume, stack, empty_volume, rtk_geometry = rtk_images(geometry, voxels)

    def time_joseph(kind, output_like, data, layout=lambda array: array):
        """Median (wall s, CPU s, ``layout`` of the output array) of RTK's Joseph filter ``kind``, which
        adds its projection of ``data`` to the image ``output_like``."""
        joseph = kind[image_type, image_type].New()
        joseph.SetInput(0, output_like)
        joseph.SetInput(1, data)
        joseph.SetGeometry(rtk_geometry)

        def run():
            joseph.Modified()
            joseph.Update()
            return layout(itk.GetArrayFromImage(joseph.GetOutput()))

        return median_time(run, repeats)

    forward_wall, forward_cpu, projections = time_joseph(rtk.JosephForwardProjectionImageFilter, stack.GetOutput(),
                                                         volume)
    measured = itk.GetImageFromArray(np.ascontiguousarray(exact, dtype=np.float32))
    stack.UpdateOutputInformation()
    measured.CopyInformation(stack.GetOutput())
    adjoint_wall, adjoint_cpu, backprojection = time_joseph(
        rtk.JosephBackProjectionImageFilter, empty_volume.GetOutput(), measured,
        layout=volume_from_rtk)
    support = voxels.numpy() != 0
    return {"backend": "itk-rtk", "forward_s": forward_wall, "forward_cpu_s": forward_cpu, "adjoint_s": adjoint_wall,
            "adjoint_cpu_s": adjoint_cpu,
            "forward_difference_to_ours": relative_difference(projections, ours["projections"]),
            "adjoint_difference_to_ours_on_phantom": relative_difference(backprojection[support],
                                                                         ours["backprojection"][support])}


def rtk_available():
    try:
        import itk
        from itk import RTK  # noqa: F401
    except ImportError:
        return False
    return hasattr(itk, "MultiThreaderBase")


def format_seconds(wall, cpu):
    return f"{wall:8.3f} ({cpu:7.2f})"


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = sizes_of(args.sizes)
    reference_sizes = sizes if args.reference_sizes is None else sizes_of(args.reference_sizes)
    use_rtk = not args.no_itk and rtk_available()
    report = {"views": args.views, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "torch": torch.__version__, "itk_rtk": use_rtk, "sizes": {}}
    print(f"threads {torch.get_num_threads()}, {args.views} views, times: median wall s (process CPU s)"
          + ("" if use_rtk else "; itk-rtk not installed or --no-itk"))
    print(f"{'n':>4} {'backend':<15} {'forward s (cpu)':>20} {'adjoint s (cpu)':>20} {'speed-up f/a':>14} "
          f"{'error':>8}")
    for n in sizes:
        geometry, voxels, exact = case(n, args.views)
        rows = []
        for name, device, backend in backends():
            if name == "cpu-reference" and n not in reference_sizes:
                continue
            repeats = args.reference_repeats if name == "cpu-reference" else args.repeats
            row = bench_projector(geometry, voxels, exact, name, device, backend, repeats)
            if row is not None:
                rows.append(row)
        reference = next((r for r in rows if r["backend"] == "cpu-reference"), None)
        if use_rtk:
            ours = next((r for r in rows if r["backend"] == "cpu-compiled"), rows[0])
            rows.append(bench_rtk(geometry, voxels, exact, ours, args.repeats, args.threads))
        for row in rows:
            if reference is not None:
                row["forward_speedup"] = reference["forward_s"] / row["forward_s"]
                row["adjoint_speedup"] = reference["adjoint_s"] / row["adjoint_s"]
            speedup = (f"{row['forward_speedup']:6.1f}/{row['adjoint_speedup']:<6.1f}" if reference is not None
                       else f"{'-':>14}")
            error = row.get("error_vs_analytic", row.get("forward_difference_to_ours"))
            print(f"{n:>4} {row['backend']:<15} {format_seconds(row['forward_s'], row['forward_cpu_s']):>20} "
                  f"{format_seconds(row['adjoint_s'], row['adjoint_cpu_s']):>20} {speedup:>14} {error:8.4f}")
        fdk_rows = []
        if not args.no_fdk:
            for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
                fdk_row = bench_fdk(geometry, exact.astype(np.float32), device, args.repeats)
                fdk_rows.append(fdk_row)
                if "skipped" in fdk_row:
                    print(f"{n:>4} fdk: {fdk_row['skipped']}")
                    break
                print(f"{n:>4} {'fdk-' + device:<15} {format_seconds(fdk_row['fdk_s'], fdk_row['fdk_cpu_s']):>20}")
        for row in rows:
            row.pop("projections", None)
            row.pop("backprojection", None)
        report["sizes"][str(n)] = {"geometry": geometry.to_dict(include_angles=False), "projector": rows,
                                   "fdk": fdk_rows, "peak_rss_gb_so_far": peak_rss_gb()}
        print(f"{n:>4} peak RSS of the process so far: {peak_rss_gb():.2f} GB")
    if use_rtk:
        print("itk-rtk rows: 'error' is the relative difference of RTK's forward projection to ours")
    if args.out is not None:
        from ctrecon.core.io import write_json

        write_json(args.out, report)
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
