#!/usr/bin/env python3
"""A small parity case of every CUDA kernel, sized for ``compute-sanitizer`` (memcheck, racecheck).

Each kernel runs once through the public API (projector forward and adjoint, FDK backprojection,
dense voxelizer and point renderer forward and backward) on a few thousand voxels, and is compared
with the PyTorch reference; the script exits 1 on a mismatch or when a kernel did not reach the GPU,
so under the sanitizer a clean run means "no reported error and the right numbers".

    compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/gpu_sanitize_case.py
    python3 scripts/gpu_sanitize_case.py --only projector,voxelize
    python3 scripts/gpu_sanitize_case.py --rehearse       # on a CPU machine: the same checks, CPU kernels
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KERNELS = ("projector", "fdk", "voxelize", "render_points")
TOLERANCE = 1e-4  # relative L2, float32 kernels against the float32 reference


def relative_error(value, expected) -> float:
    return float((value - expected).norm() / expected.norm().clamp_min(1e-30))


def small_gaussians(torch, n: int, volume, batch: int, device: str, seed: int = 0):
    """Gaussians inside ``volume``: means [B, N, 3] mm, σ [B, N, 3] mm (0.5–2 voxels), quaternions, intensities."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor(volume.sVoxel[::-1], dtype=torch.float32)  # (x, y, z) extent, mm
    centre = torch.tensor(volume.offOrigin[::-1], dtype=torch.float32)
    means = (torch.rand(batch, n, 3, generator=g) - 0.5) * size * 0.9 + centre
    scales = (torch.rand(batch, n, 3, generator=g) * 1.5 + 0.5) * min(volume.dVoxel)
    quats = torch.nn.functional.normalize(torch.randn(batch, n, 4, generator=g), dim=-1)
    intensities = torch.rand(batch, n, generator=g)
    return [t.to(device).requires_grad_() for t in (means, scales, quats, intensities)]


def check_gaussian_kernel(torch, render, params, backend: str) -> list:
    """Relative errors of the render with ``backend`` and its gradients against the reference."""
    errors = []
    weights = None
    outputs = {}
    for name in (backend, "reference"):
        value = render(*params, backend=name)
        if weights is None:
            weights = torch.rand_like(value)
        grads = torch.autograd.grad((value * weights).sum(), params)
        outputs[name] = (value.detach(), [grad.detach() for grad in grads])
    (value, grads), (expected, expected_grads) = outputs[backend], outputs["reference"]
    errors.append(relative_error(value, expected))
    errors.extend(relative_error(a, b) for a, b in zip(grads, expected_grads))
    return errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(KERNELS), help=f"comma-separated subset of {KERNELS}")
    parser.add_argument("--rehearse", action="store_true",
                        help="run the same checks on the CPU (backend 'auto': the compiled CPU kernels where an "
                             "operator has one) to rehearse this script on a machine without a GPU")
    args = parser.parse_args(argv)
    import torch

    device, backend = ("cpu", "auto") if args.rehearse else ("cuda", "cuda")
    if not args.rehearse and not torch.cuda.is_available():
        print("gpu_sanitize_case: no CUDA device visible to torch", file=sys.stderr)
        return 2
    from ctrecon.core.geometry import ConeBeamGeometry, VolumeGeometry
    from ctrecon.operators.fdk import fdk
    from ctrecon.operators.projector import Projector
    from ctrecon.operators.voxelize import render_points, voxelize

    failures = []
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    volume = VolumeGeometry((12, 16, 20), (2.0, 1.5, 1.2), (0.5, -1.0, 0.3))
    geometry = ConeBeamGeometry.covering(volume, n_views=8)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(volume.nVoxel, generator=g).to(device)
    y = torch.rand(geometry.projection_shape, generator=g).to(device)
    if "projector" in only:
        A, reference = Projector(geometry, backend=backend), Projector(geometry, backend="reference")
        errors = [relative_error(A(x), reference(x)), relative_error(A.T(y), reference.T(y))]
        print(f"projector forward / adjoint: relative error {errors[0]:.2e} / {errors[1]:.2e}")
        failures += ["projector"] if max(errors) > TOLERANCE else []
    if "fdk" in only:
        error = relative_error(fdk(y, geometry, backend=backend), fdk(y, geometry, backend="reference"))
        print(f"fdk backprojection: relative error {error:.2e}")
        failures += ["fdk"] if error > TOLERANCE else []
    if "voxelize" in only:
        params = small_gaussians(torch, 60, volume, 2, device)
        errors = check_gaussian_kernel(torch, lambda *p, backend: voxelize(*p, volume, backend=backend), params,
                                       backend)
        print("voxelize forward, d/dmeans, d/dscales, d/dquats, d/dintensities: "
              + ", ".join(f"{e:.2e}" for e in errors))
        failures += ["voxelize"] if max(errors) > TOLERANCE else []
    if "render_points" in only:
        params = small_gaussians(torch, 60, volume, 2, device, seed=2)
        points = torch.from_numpy(volume.voxel_centres().reshape(-1, 3)).float()[None].repeat(2, 1, 1).to(device)
        errors = check_gaussian_kernel(torch, lambda *p, backend: render_points(*p, points, backend=backend), params,
                                       backend)
        print("render_points forward and gradients: " + ", ".join(f"{e:.2e}" for e in errors))
        failures += ["render_points"] if max(errors) > TOLERANCE else []
    if failures:
        print(f"gpu_sanitize_case: mismatch against the reference in {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
