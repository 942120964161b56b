"""Glue for the CUDA kernels of ``cuda/``: lazy build, dispatch, tile binning and autograd wrappers.

The kernels (``cuda/*.cu``, torch-free) and their torch binding (``cuda/ext.cpp``) are compiled together
by ``torch.utils.cpp_extension`` the first time a CUDA float32 tensor reaches the projector, the FDK
backprojection or the Gaussian renderer (:class:`ctrecon._backend.LazyExtension`: cached per source hash
in ``~/.cache/ctrecon/extensions``; a failed build warns once, with the compiler's reason, and the torch
reference is used). Importing ctrecon never compiles. ``CTRECON_FORCE_REFERENCE=1`` forces the torch
reference everywhere. Installed packages carry the sources as ``ctrecon/_cuda_src`` (see setup.py).

Dispatch: :func:`kernels_for` is the one question the callers ask ("do tensors of this device and dtype
go to the CUDA kernels?"); it answers with a launcher for CUDA float32 tensors when the extension is
available, and None otherwise. Tests substitute an emulated launcher (tests/test_cuda.py) to run this glue
on the CPU.

Voxelizer pipeline (gsplat-style), shared by dense grids and query points:

1. Sites live on an integer lattice (voxels, or the reference's point cells, ``render._PointPairs``), cut
   into tiles (:data:`DENSE_TILE` voxels, :data:`POINT_TILE` cells); each Gaussian has the reference's
   integer box on that lattice.
2. ``tile_counts`` (a thread per Gaussian) → cumulative sum → ``tile_pairs`` (a thread per
   (Gaussian, tile) pair) → stable ``torch.sort`` by tile key → each tile's Gaussian list in Gaussian order.
3. One block per tile renders its sites from the list, staging Gaussians in shared memory; the backward
   returns per-Gaussian moments Σ w·(1, d, d dᵀ), turned here into gradients for μ, the precision entries
   and I (:func:`gradients_from_moments`); autograd finishes the chain through covariance and quaternion.
"""
from __future__ import annotations

import os

import torch

from ctrecon.operators import _backend

__all__ = ["kernels_for", "projector_kernels", "fdk_backproject", "voxelize", "render_points",
           "gradients_from_moments", "source_dir", "SOURCES", "HEADERS", "DENSE_TILE", "POINT_TILE"]

#: Compiled sources (in the source directory) and the headers they include.
SOURCES = ("ext.cpp", "projector.cu", "fdk.cu", "voxelize.cu")
HEADERS = ("kernels.h", "common.cuh", "projector.cuh", "fdk.cuh", "voxelize.cuh")
#: Voxels per dense tile (x, y, z): one per thread of a 256-thread block (cuda/voxelize.cuh kVoxelizeBlock).
DENSE_TILE = (8, 8, 4)
#: Reference cells per point tile (x, y, z): about 8 points per cell, so about 256 points per tile.
POINT_TILE = (4, 4, 2)
_MAX_KEYS = 2 ** 31 - 1  # tile keys are int32


def source_dir() -> str:
    """The kernel sources: ``ctrecon/_cuda_src`` in an installed package, the top-level ``cuda/`` in a checkout."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # ctrecon/
    installed = os.path.join(package, "_cuda_src")
    checkout = os.path.join(os.path.dirname(package), "cuda")
    return installed if os.path.isfile(os.path.join(installed, SOURCES[0])) else checkout


_extension = _backend.LazyExtension("cuda_kernels", [os.path.join(source_dir(), name) for name in SOURCES])


class _Launcher:
    """Calls a function of the extension on the device of its first tensor argument, on that device's current
    stream (appended as the last argument, an integer)."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        function = getattr(self._module, name)

        def launch(*args):
            device = next(arg.device for arg in args if isinstance(arg, torch.Tensor))
            with torch.cuda.device(device):
                return function(*args, torch.cuda.current_stream(device).cuda_stream)

        return launch


def kernels_for(device, dtype=torch.float32):
    """Launcher of the CUDA kernels for tensors of ``device`` and ``dtype``, or None (then the torch reference
    or the CPU path runs): only CUDA float32 tensors qualify; builds the extension on the first call."""
    if torch.device(device).type != "cuda" or dtype != torch.float32 or not torch.cuda.is_available():
        return None
    module = _extension.get()
    return None if module is None else _Launcher(module)


# --------------------------------------------------------------------------- projector
class ProjectorKernels:
    """The compiled-backend interface of :class:`ctrecon.projector.Projector` (one batch item per call)."""

    def __init__(self, kernels):
        self._kernels = kernels

    def forward(self, volume, views, spacing, out):
        """volume ``[Z, Y, X]`` → out ``[A, V, U]`` (float32, views ``[A, 12]`` float64, same device)."""
        self._kernels.project_forward(volume, views, list(spacing), out)

    def adjoint(self, projections, views, spacing, slab_rows, out):
        """projections ``[A, V, U]`` → out ``[Z, Y, X]`` (overwritten); ``slab_rows`` only matters on the CPU."""
        self._kernels.project_adjoint(projections, views, list(spacing), out)


def projector_kernels(device, dtype):
    """:class:`ProjectorKernels` for tensors of ``device``/``dtype``, or None."""
    kernels = kernels_for(device, dtype)
    return None if kernels is None else ProjectorKernels(kernels)


# --------------------------------------------------------------------------- FDK
def fdk_backproject(kernels, filtered, xs, ys, zs, cos, sin, weights, scan) -> torch.Tensor:
    """Voxel-driven FDK backprojection ``[A, V, U]`` → ``[Z, Y, X]``, the discretisation of
    :func:`ctrecon.fdk.backproject` (which prepares the float32 tables xs, ys, zs, cos θ, sin θ, weights);
    scan = (DSO, DSD, du, dv, ou, ov)."""
    tables = [t.contiguous() for t in (filtered, xs, ys, zs, cos, sin, weights)]
    out = filtered.new_empty((zs.numel(), ys.numel(), xs.numel()))
    kernels.fdk_backproject(*tables, [float(v) for v in scan], out)
    return out


# --------------------------------------------------------------------------- voxelizer
def gradients_from_moments(moments, prec, intensities):
    """Gradients for means ``[G, 3]``, precision entries ``[G, 6]`` and intensities ``[G]`` from the moments
    ``[G, 10]`` = Σ w·(1, dx, dy, dz, dx², dxdy, dxdz, dy², dydz, dz²), w = upstream gradient · exp(-q/2):

        ∂/∂I = Σ w,   ∂/∂μ = I·P·Σ w d,   ∂/∂(Pxx, Pxy, Pxz, Pyy, Pyz, Pzz) = -I/2·Σ w (dx², 2dxdy, 2dxdz, dy², 2dydz, dz²).
    """
    m = moments.unbind(-1)
    pxx, pxy, pxz, pyy, pyz, pzz = prec.unbind(-1)
    intensity = intensities.unsqueeze(-1)
    grad_means = intensity * torch.stack([pxx * m[1] + pxy * m[2] + pxz * m[3],
                                          pxy * m[1] + pyy * m[2] + pyz * m[3],
                                          pxz * m[1] + pyz * m[2] + pzz * m[3]], dim=-1)
    grad_prec = (-0.5 * intensity) * torch.stack([m[4], 2 * m[5], 2 * m[6], m[7], 2 * m[8], m[9]], dim=-1)
    return grad_means, grad_prec, m[0]


def _tiles_per_item(lattice) -> int:
    count = 1
    for cells, tile in zip(lattice[:3], lattice[3:6]):
        count *= -(-cells // tile)
    return count


class _TileLists:
    """Every tile's Gaussians: ``ids`` (int32, grouped by tile key, increasing within a tile) and
    ``ends`` (int64 [keys], inclusive prefix sums), from the Gaussians' boxes ``lo``, ``hi`` (int32 [G, 3])."""

    def __init__(self, kernels, lo, hi, lattice, n_keys: int):
        if n_keys > _MAX_KEYS:
            raise RuntimeError(f"too many tiles for the CUDA voxelizer ({n_keys} ≥ 2^31)")
        counts = torch.empty(lo.shape[0], dtype=torch.int64, device=lo.device)
        kernels.tile_counts(lo, hi, lattice, counts)
        ends = torch.cumsum(counts, 0)
        n_pairs = int(ends[-1]) if ends.numel() else 0
        keys = torch.empty(n_pairs, dtype=torch.int32, device=lo.device)
        ids = torch.empty(n_pairs, dtype=torch.int32, device=lo.device)
        kernels.tile_pairs(lo, hi, ends, lattice, keys, ids)
        order = torch.sort(keys, stable=True).indices
        self.ids = ids[order].contiguous()
        self.ends = torch.cumsum(torch.bincount(keys, minlength=n_keys), 0)


class _DensePlan:
    """Tile lists and voxel tables of one dense render: Gaussians ``[B·N]`` into ``[B, Z, Y, X]``."""

    def __init__(self, kernels, lo, hi, volume, batch: int, n_per_item: int, device):
        from ctrecon.operators.voxelize import _axis_tables

        Z, Y, X = volume.nVoxel
        self.kernels = kernels
        self.shape = (batch, Z, Y, X)
        self.lattice = [X, Y, Z, *DENSE_TILE, max(n_per_item, 1)]
        # Boxes beyond the grid are empty (hi <= n - 1 < lo); clamping keeps them within int32.
        self.lo = torch.minimum(lo, torch.tensor([X, Y, Z], device=lo.device)).to(torch.int32).contiguous()
        self.hi = hi.to(torch.int32).contiguous()
        self.tables = [t.contiguous() for t in _axis_tables(volume, torch.float32, device)]
        self.lists = _TileLists(kernels, self.lo, self.hi, self.lattice, batch * _tiles_per_item(self.lattice))

    def _arguments(self, means, prec, intensities):
        return (means, prec, intensities, self.lo, self.hi, self.lists.ids, self.lists.ends, self.lattice,
                *self.tables)

    def render(self, means, prec, intensities, k2):
        out = means.new_empty(self.shape)
        self.kernels.dense_forward(*self._arguments(means, prec, intensities), k2, out)
        return out

    def moments(self, grad, means, prec, intensities, k2):
        moments = means.new_empty((means.shape[0], 10))
        self.kernels.dense_backward(*self._arguments(means, prec, intensities), k2, grad, moments)
        return moments


class _PointPlan:
    """Tile lists of one point render: Gaussians ``[B·N]`` at points ``[B, M, 3]`` → ``[B, M]``.

    The lattice is the reference's grid of point cells (``render._PointPairs``: each point's cell, each
    Gaussian's cell box), so the evaluated (Gaussian, point) pairs are exactly the reference's.
    """

    def __init__(self, kernels, means, half_widths, points, n_per_item: int):
        from ctrecon.operators.voxelize import CHUNK_SIZE, _PointPairs

        cells = _PointPairs(means, half_widths, points, max(n_per_item, 1), CHUNK_SIZE)
        batch, n_points = points.shape[:2]
        self.kernels = kernels
        self.shape = (batch, n_points)
        self.lattice = [*(int(n) for n in cells.ncell), *POINT_TILE, max(n_per_item, 1)]
        self.lo = cells.box_lo.to(torch.int32).contiguous()
        self.hi = (cells.box_lo + cells.box_dims - 1).to(torch.int32).contiguous()
        n_keys = batch * _tiles_per_item(self.lattice)
        self.lists = _TileLists(kernels, self.lo, self.hi, self.lattice, n_keys)
        self.points = points.reshape(-1, 3).contiguous()
        self.cells = cells.cell_of.to(torch.int32).contiguous()
        keys = torch.empty(self.points.shape[0], dtype=torch.int32, device=points.device)
        kernels.point_tile_keys(self.cells, n_points, self.lattice, keys)
        self.order = torch.sort(keys, stable=True).indices.contiguous()
        self.point_ends = torch.cumsum(torch.bincount(keys, minlength=n_keys), 0)

    def _arguments(self, means, prec, intensities):
        return (means, prec, intensities, self.lo, self.hi, self.lists.ids, self.lists.ends, self.lattice,
                self.points, self.cells, self.order, self.point_ends)

    def render(self, means, prec, intensities, k2):
        out = means.new_empty(self.shape)
        self.kernels.points_forward(*self._arguments(means, prec, intensities), k2, out)
        return out

    def moments(self, grad, means, prec, intensities, k2):
        moments = means.new_empty((means.shape[0], 10))
        self.kernels.points_backward(*self._arguments(means, prec, intensities), k2, grad, moments)
        return moments


class _Render(torch.autograd.Function):
    """plan.render(means, prec, intensities); the backward goes through the plan's moments."""

    @staticmethod
    def forward(ctx, means, prec, intensities, plan, k2):
        means, prec, intensities = (t.contiguous() for t in (means, prec, intensities))
        ctx.plan, ctx.k2 = plan, k2
        ctx.save_for_backward(means, prec, intensities)
        return plan.render(means, prec, intensities, k2)

    @staticmethod
    def backward(ctx, grad):
        means, prec, intensities = ctx.saved_tensors
        moments = ctx.plan.moments(grad.contiguous(), means, prec, intensities, ctx.k2)
        grad_means, grad_prec, grad_intensities = gradients_from_moments(moments, prec, intensities)
        needs = ctx.needs_input_grad
        return (grad_means if needs[0] else None, grad_prec if needs[1] else None,
                grad_intensities if needs[2] else None, None, None)


def voxelize(kernels, means, prec, intensities, lo, hi, volume, batch: int, k2: float) -> torch.Tensor:
    """``[B, Z, Y, X]`` render (inputs as prepared by :func:`ctrecon.gaussians.render.voxelize`: means
    ``[B·N, 3]``, precision entries ``[B·N, 6]``, intensities ``[B·N]``, inclusive voxel boxes lo/hi
    ``[B·N, 3]`` (i, j, k) int64), differentiable in means, prec and intensities."""
    plan = _DensePlan(kernels, lo, hi, volume, batch, means.shape[0] // max(batch, 1), means.device)
    return _Render.apply(means, prec, intensities, plan, float(k2))


def render_points(kernels, means, prec, intensities, half_widths, points, n_per_item: int, k2: float) -> torch.Tensor:
    """``[B, M]`` values at points ``[B, M, 3]`` (float32; inputs as in :func:`voxelize`, with the
    boxes' half-widths ``[B·N, 3]`` instead of voxel boxes), differentiable in means, prec and intensities."""
    plan = _PointPlan(kernels, means, half_widths, points, n_per_item)
    return _Render.apply(means, prec, intensities, plan, float(k2))
