"""Lazily built C++/OpenMP voxelizer (``ctrecon/csrc/voxelize_cpu.cpp``) and its autograd wrapper.

Nothing is compiled at import: the first CPU :func:`render.voxelize` call builds the extension
(``_backend.cpu_voxelizer``, a :class:`~ctrecon._backend.LazyExtension`). If the build fails, a
warning is issued once, :func:`use_compiled` answers False and the PyTorch reference is used;
``build_error()`` says why. ``CTRECON_FORCE_REFERENCE`` set (to anything but 0) forces the reference.
"""
from __future__ import annotations

import torch

from ctrecon.operators import _backend
from ctrecon.core.errors import InputError
from ctrecon.core.geometry import VolumeGeometry


def _load():
    return _backend.cpu_voxelizer.get()


def build_error() -> str | None:
    """Why the compiled kernel is unavailable (None if it loaded or was never tried)."""
    return _backend.cpu_voxelizer.error


def available() -> bool:
    """Build (once) and report whether the compiled CPU kernel can be used."""
    return _load() is not None


def use_compiled(backend: str, like: torch.Tensor) -> bool:
    """Whether :func:`render.voxelize` should run the compiled kernel for tensors like ``like``."""
    if backend not in ("auto", "reference", "cpu"):
        raise InputError(f"unknown voxelize backend {backend!r} (use auto, reference or cpu)")
    if backend == "reference":
        return False
    suitable = like.device.type == "cpu" and like.dtype in (torch.float32, torch.float64)
    if backend == "cpu":
        if not suitable:
            raise InputError("the compiled CPU voxelizer needs float32/float64 CPU tensors")
        if not available():
            raise RuntimeError(f"the compiled CPU voxelizer could not be built: {build_error()}")
        return True
    return suitable and available()


def _grid_args(volume: VolumeGeometry, dtype):
    from ctrecon.operators.voxelize import _axis_tables

    xs, ys, zs = (t.contiguous() for t in _axis_tables(volume, dtype, torch.device("cpu")))
    return xs, ys, zs, float(volume.axis_centres(2)[0]), float(volume.dVoxel[2])


class _CompiledVoxelize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, prec, intensities, lo, hi, volume, batch, k2):
        module = _load()
        xs, ys, zs, x0, dx = _grid_args(volume, means.dtype)
        tensors = [t.contiguous() for t in (means, prec, intensities)]
        lo, hi = lo.contiguous(), hi.contiguous()
        ctx.save_for_backward(*tensors, lo, hi, xs, ys, zs)
        ctx.args = (batch, x0, dx, k2)
        return module.forward(*tensors, lo, hi, xs, ys, zs, batch, x0, dx, k2).reshape(-1)

    @staticmethod
    def backward(ctx, grad_out):
        means, prec, intensities, lo, hi, xs, ys, zs = ctx.saved_tensors
        grad_means, grad_prec, grad_i = _load().backward(grad_out.contiguous(), means, prec, intensities, lo, hi,
                                                         xs, ys, zs, *ctx.args)
        needs = ctx.needs_input_grad
        return (grad_means if needs[0] else None, grad_prec if needs[1] else None,
                grad_i if needs[2] else None, None, None, None, None, None)


def voxelize(means, prec, intensities, lo, hi, volume: VolumeGeometry, batch: int, k2: float) -> torch.Tensor:
    """Flat ``[B·Z·Y·X]`` render with the compiled kernel (inputs as prepared by ``render.voxelize``).

    The kernel needs the Gaussians of each item sorted by box start (z, y, x); the permutation is
    applied here with differentiable indexing, so gradients come back in the caller's order.
    """
    Z, Y, X = volume.nVoxel
    n_per_item = max(means.shape[0] // max(batch, 1), 1)
    item = torch.arange(means.shape[0]) // n_per_item
    start = torch.minimum(lo, torch.tensor([X, Y, Z]))  # empty boxes may start beyond the grid
    key = ((item * (Z + 1) + start[:, 2]) * (Y + 1) + start[:, 1]) * (X + 1) + start[:, 0]
    order = torch.argsort(key, stable=True)
    return _CompiledVoxelize.apply(means[order], prec[order], intensities[order], lo[order], hi[order], volume,
                                   int(batch), float(k2))
