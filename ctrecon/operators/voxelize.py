"""Gaussian field → voxel values: dense grids (:func:`voxelize`) and sparse points (:func:`render_points`).

    grid = voxelize(means, scales, quats, intensities, volume)           # [(B,) N, …] → [(B,) Z, Y, X]
    values = render_points(means, scales, quats, intensities, points)    # points [(B,) M, 3] → [(B,) M]

means and scales in the length unit of ``volume`` / ``points`` (world mm, or the prior's [0,1]³ blocks),
quats (w, x, y, z), intensities and outputs in the field's unit (unit attenuation). This module holds the
operator's autograd functions, its dispatch and its pure-PyTorch reference; the compiled kernels are in
``csrc/voxelize_cpu.cpp`` and ``cuda/voxelize.cu``.

Semantics (shared by every backend; a CUDA kernel must reproduce them to 1e-4):

* Gaussian g has centre μ (x, y, z), scales s (σ along its body axes, > 0), rotation quaternion
  q = (w, x, y, z) (normalised here, so raw quaternions are fine) and intensity I (already activated).
  Σ = R diag(s²) Rᵀ; the precision P = Σ⁻¹ = R diag(s⁻²) Rᵀ is formed in the working dtype from the
  normalised quaternion and stored as (Pxx, Pxy, Pxz, Pyy, Pyz, Pzz).
* At a point p (a voxel centre or a query point), with d = p − μ:
  ``q_g(p) = dx·(Pxx·dx + 2·(Pxy·dy + Pxz·dz)) + (dy·(Pyy·dy + 2·Pyz·dz) + (Pzz·dz)·dz)`` (this order),
  and the value is ``Σ_g I_g·exp(−½ q_g(p))`` over the Gaussians with ``q_g(p) ≤ k_sigma²`` (inclusive
  ≤: a point exactly at Mahalanobis distance k_sigma counts). A sum, no alpha compositing.
* Voxel (k, j, i) centres are ``(i−(X−1)/2)·dx + ox`` etc. (core/geometry.py), computed in float64 and
  rounded once to the working dtype. Everything else runs in the dtype of the inputs (float32 or
  float64); sums accumulate in that dtype.
* The per-Gaussian axis-aligned box ``μ ± k_sigma·sqrt(diag Σ)`` is exactly the bounding box of the
  ellipsoid ``q ≤ k_sigma²`` (rotation-aware, nothing is clipped); it only limits the work, widened by
  1e-3 voxel against rounding, and the ``q ≤ k_sigma²`` test decides. The box is not differentiated
  (the truncation surface carries no gradient, as in every splatting renderer).

Batches: parameters ``[B, N, ...]`` render into ``[B, Z, Y, X]`` (Gaussians of item b only touch item
b); :func:`voxelize_batch` is the same call spelled out for readers of the prior's code.

Backends (``backend=``, resolved by :func:`ctrecon.operators._backend.select`):

* ``"reference"``: the pure-PyTorch reference below, the oracle of the tests. Memory is bounded by
  processing (Gaussian, voxel) pairs in chunks of ``chunk_size`` elements; no N_gaussians × N_voxels
  tensor is ever formed. The backward pass recomputes each chunk instead of storing intermediates.
* ``"cpu"``: the compiled C++/OpenMP kernel of :func:`voxelize` (``csrc/voxelize_cpu.cpp``, float32 and
  float64, vectorised), one call per render from means, scales, quats and intensities: it forms the
  precision entries (bit-identical to :func:`precision_entries`) and the boxes, sorts the Gaussians by box
  start and renders; its backward returns moments like the CUDA kernels' and carries the gradient of the
  precision entries to scales and quaternions itself (:class:`_CpuVoxelize`). :func:`render_points` has none.
* ``"cuda"``: the tile-based CUDA kernels (``cuda/voxelize.cu``, float32) of both functions, gsplat-style:
  sites (voxels, or the reference's point cells ``_PointPairs``) lie on an integer lattice cut into
  tiles (:data:`DENSE_TILE` voxels, :data:`POINT_TILE` cells) and each Gaussian has the reference's
  integer box on it; ``tile_counts`` (a thread per Gaussian) → cumulative sum → ``tile_pairs`` (a thread
  per (Gaussian, tile) pair) → stable ``torch.sort`` by tile key gives each tile's Gaussian list
  (:class:`_TileLists`); one block per tile renders its sites from the list. The backward returns
  per-Gaussian moments Σ w·(1, d, d dᵀ), turned here into gradients for μ, the precision entries and I
  (:func:`gradients_from_moments`); autograd finishes the chain through covariance and quaternion.
* ``"auto"``: CUDA for CUDA float32 tensors, the CPU kernel for CPU tensors of :func:`voxelize`, the
  reference for the rest, where a build fails and with ``CTRECON_FORCE_REFERENCE=1``.

The compiled kernels evaluate q with the same code (``cuda/voxelize.cuh``) and are built on first use.
"""
from __future__ import annotations

import math

import torch

from ctrecon.core.errors import InputError
from ctrecon.core.geometry import VolumeGeometry
from ctrecon.operators import _backend

__all__ = ["voxelize", "voxelize_batch", "render_points", "quaternion_to_rotation", "covariance_matrices",
           "precision_entries", "bounding_half_widths", "gradients_from_moments", "cpu_voxelizer",
           "DEFAULT_K_SIGMA"]

DEFAULT_K_SIGMA = 3.0
#: (Gaussian, point) pairs evaluated per chunk by the reference; bounds its memory (~100 bytes each).
CHUNK_SIZE = 1 << 20
#: Widening of the integer voxel box (in voxels) against rounding; the q ≤ k² test decides.
BOX_SLACK = 1e-3
#: Voxels per dense tile of the CUDA kernels (x, y, z): one per thread of a 256-thread block
#: (cuda/voxelize.cuh kVoxelizeBlock).
DENSE_TILE = (8, 8, 4)
#: Reference cells per point tile of the CUDA kernels (x, y, z): about 8 points per cell, so about 256 per tile.
POINT_TILE = (4, 4, 2)
_MAX_KEYS = 2 ** 31 - 1  # tile keys are int32

#: The compiled CPU kernel of :func:`voxelize` (csrc/voxelize_cpu.cpp, which includes cuda/voxelize.cuh).
cpu_voxelizer = _backend.cpu_extension("cpu_voxelizer", "voxelize_cpu.cpp", ["common.cuh", "voxelize.cuh"])


# --------------------------------------------------------------------------- covariance algebra
def quaternion_to_rotation(quats: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[..., 3, 3]`` of quaternions ``[..., 4]`` (w, x, y, z), normalised.

    Formed without a square root, R = I + (2/|q|²)·(…), by elementwise operations in a fixed order, which the
    CPU kernel repeats operation by operation (csrc/voxelize_cpu.cpp ``rotation_of``).
    """
    w, x, y, z = quats.unbind(-1)
    s = 2 / (((w * w + x * x) + y * y) + z * z)
    rows = (
        1 - s * (y * y + z * z), s * (x * y - w * z), s * (x * z + w * y),
        s * (x * y + w * z), 1 - s * (x * x + z * z), s * (y * z - w * x),
        s * (x * z - w * y), s * (y * z + w * x), 1 - s * (x * x + y * y),
    )
    return torch.stack(rows, dim=-1).reshape(*quats.shape[:-1], 3, 3)


def covariance_matrices(scales: torch.Tensor, quats: torch.Tensor) -> torch.Tensor:
    """Σ = R diag(s²) Rᵀ, ``[..., 3, 3]`` (mm²) from scales ``[..., 3]`` and quaternions ``[..., 4]``."""
    rot = quaternion_to_rotation(quats)
    return (rot * (scales * scales).unsqueeze(-2)) @ rot.transpose(-1, -2)


#: Rows and columns of the precision entries (Pxx, Pxy, Pxz, Pyy, Pyz, Pzz).
_ENTRY_ROWS, _ENTRY_COLUMNS = [0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2]


def precision_entries(scales: torch.Tensor, quats: torch.Tensor) -> torch.Tensor:
    """Upper triangle of Σ⁻¹ = R diag(s⁻²) Rᵀ as ``[..., 6]`` = (Pxx, Pxy, Pxz, Pyy, Pyz, Pzz).

    P_ab = (t_a0·R_b0 + t_a1·R_b1) + t_a2·R_b2 with t_ac = R_ac·(1/s_c²): elementwise operations in this order,
    which the CPU kernel repeats (csrc/voxelize_cpu.cpp ``precision_of``), so its P is bit-identical.
    """
    rot = quaternion_to_rotation(quats)
    weighted = rot * torch.reciprocal(scales * scales).unsqueeze(-2)
    terms = weighted[..., _ENTRY_ROWS, :] * rot[..., _ENTRY_COLUMNS, :]
    return (terms[..., 0] + terms[..., 1]) + terms[..., 2]


def bounding_half_widths(scales: torch.Tensor, quats: torch.Tensor, k_sigma: float) -> torch.Tensor:
    """Half-widths ``[..., 3]`` (x, y, z) of the axis-aligned box of the ellipsoid q ≤ k²: k·sqrt(diag Σ)."""
    rot = quaternion_to_rotation(quats)
    diag = ((rot * rot) * (scales * scales).unsqueeze(-2)).sum(-1)
    return k_sigma * diag.sqrt()


# --------------------------------------------------------------------------- input handling
def _check_k_sigma(k_sigma) -> float:
    k = float(k_sigma)
    if not math.isfinite(k) or k <= 0:
        raise InputError(f"k_sigma must be a positive number, got {k_sigma!r}")
    return k


def _batched_parameters(means, scales, quats, intensities):
    """Validate shapes; returns the four tensors with a batch dim and whether one was given."""
    if means.dim() not in (2, 3) or means.shape[-1] != 3:
        raise InputError(f"means must be [N, 3] or [B, N, 3], got {tuple(means.shape)}")
    batched = means.dim() == 3
    lead = tuple(means.shape[:-1])
    for name, tensor, tail in (("scales", scales, (3,)), ("quats", quats, (4,)), ("intensities", intensities, ())):
        if tuple(tensor.shape) != lead + tail:
            raise InputError(f"{name} must have shape {list(lead + tail)}, got {list(tensor.shape)}")
    if not all(t.is_floating_point() for t in (means, scales, quats, intensities)):
        raise InputError("Gaussian parameters must be floating-point tensors")
    dtype = torch.promote_types(torch.promote_types(means.dtype, scales.dtype),
                                torch.promote_types(quats.dtype, intensities.dtype))
    out = [t.to(dtype) for t in (means, scales, quats, intensities)]
    if not batched:
        out = [t.unsqueeze(0) for t in out]
    return out, batched


def _axis_tables(volume: VolumeGeometry, dtype, device):
    """Voxel-centre coordinates per world axis (x, y, z): float64 then rounded to ``dtype``."""
    return [torch.as_tensor(volume.axis_centres(axis), device=device).to(dtype) for axis in (2, 1, 0)]


def _voxel_boxes(means, half_widths, volume: VolumeGeometry):
    """Inclusive integer voxel ranges ``lo, hi`` ``[G, 3]`` (i, j, k) of each Gaussian's box, clamped to the grid.

    Empty boxes have some ``hi < lo``.
    """
    n = torch.tensor(volume.nVoxel[::-1], dtype=torch.float64, device=means.device)
    d = torch.tensor(volume.dVoxel[::-1], dtype=torch.float64, device=means.device)
    o = torch.tensor(volume.offOrigin[::-1], dtype=torch.float64, device=means.device)
    centre = (means.detach().double() - o) / d + (n - 1) / 2.0
    reach = half_widths.detach().double() / d
    lo = torch.ceil(centre - reach - BOX_SLACK).clamp(min=0)
    hi = torch.floor(centre + reach + BOX_SLACK)
    hi = torch.minimum(hi, n - 1)
    bad = ~torch.isfinite(centre).all(-1) | ~torch.isfinite(reach).all(-1)
    lo = torch.where(bad.unsqueeze(-1), torch.ones_like(lo), lo)
    hi = torch.where(bad.unsqueeze(-1), torch.zeros_like(hi), hi)
    return lo.long(), torch.maximum(hi, lo - 1).long()


def _expand(counts: torch.Tensor, ends: torch.Tensor, start: int, stop: int):
    """Owners and local offsets of elements ``start..stop-1`` of the concatenation of ``counts`` ranges."""
    element = torch.arange(start, stop, device=counts.device)
    owner = torch.searchsorted(ends, element, right=True)
    local = element - (ends[owner] - counts[owner])
    return owner, local


def _box_cell(lo, dims, g, local):
    """Cell (x, y, z) number ``local`` (x fastest) of box ``g``, boxes given by their first cell ``lo`` and
    sizes ``dims`` ``[G, 3]``."""
    nx, ny = dims[g, 0], dims[g, 1]
    x = lo[g, 0] + local % nx
    rest = local // nx
    return x, lo[g, 1] + rest % ny, lo[g, 2] + rest // ny


def _chunks(total: int, chunk_size: int):
    for start in range(0, total, chunk_size):
        yield start, min(total, start + chunk_size)


# --------------------------------------------------------------------------- pair enumeration
class _GridPairs:
    """(Gaussian, voxel) pairs of a dense grid, enumerated box by box in chunks.

    Yields ``(gaussian [P], output flat index [P], d [P, 3])`` with d = voxel centre − μ.
    """

    def __init__(self, means, lo, hi, volume: VolumeGeometry, n_per_item: int, chunk_size: int):
        self.lo, self.means, self.chunk_size = lo, means, chunk_size
        self.dims = (hi - lo + 1).clamp(min=0)
        counts = self.dims.prod(-1)
        self.counts, self.ends = counts, torch.cumsum(counts, 0)
        self.total = int(self.ends[-1]) if counts.numel() else 0
        self.tables = _axis_tables(volume, means.dtype, means.device)
        Z, Y, X = volume.nVoxel
        self.shape = (Z, Y, X)
        self.item_offset = (torch.arange(means.shape[0], device=means.device) // n_per_item) * (Z * Y * X)

    def __iter__(self):
        Z, Y, X = self.shape
        xs, ys, zs = self.tables
        for start, stop in _chunks(self.total, self.chunk_size):
            g, local = _expand(self.counts, self.ends, start, stop)
            i, j, k = _box_cell(self.lo, self.dims, g, local)
            flat = self.item_offset[g] + (k * Y + j) * X + i
            d = torch.stack([xs[i], ys[j], zs[k]], dim=-1) - self.means[g]
            yield g, flat, d


class _PointPairs:
    """(Gaussian, point) pairs for arbitrary query points, found through a uniform grid of cells.

    Points are binned into cells (about eight per cell); each Gaussian visits the cells that its box
    overlaps and, within them, every point. Yields like :class:`_GridPairs` (index = point row).
    """

    POINTS_PER_CELL = 8

    def __init__(self, means, half_widths, points, n_per_item: int, chunk_size: int):
        self.means, self.points, self.chunk_size = means, points, chunk_size
        B, M = points.shape[:2]
        device = points.device
        flat_points = points.detach().reshape(-1, 3).double()
        finite = torch.isfinite(flat_points).all(-1)
        if not bool(finite.all()):
            raise InputError("render_points: points must be finite")
        low = flat_points.min(0).values
        high = flat_points.max(0).values
        extent = (high - low).clamp(min=1e-9)
        cell = float((extent.prod() * self.POINTS_PER_CELL / max(M, 1)) ** (1.0 / 3.0))
        cell = max(cell, float(extent.max()) / 1024.0)
        ncell = torch.clamp(torch.ceil(extent / cell), min=1).long()
        self.low, self.cell, self.ncell = low, cell, ncell
        per_item = int(ncell.prod())
        cell_of = self._cell_index(flat_points).clamp(min=0)
        cell_of = torch.minimum(cell_of, ncell - 1)
        self.cell_of = cell_of  # [B·M, 3]: each point's cell (x, y, z), also the CUDA path's lattice
        key = (torch.arange(B, device=device).repeat_interleave(M) * per_item
               + (cell_of[:, 2] * ncell[1] + cell_of[:, 1]) * ncell[0] + cell_of[:, 0])
        self.order = torch.argsort(key)
        cell_counts = torch.bincount(key, minlength=B * per_item)
        self.cell_ends = torch.cumsum(cell_counts, 0)
        self.cell_counts = cell_counts
        # Cell boxes of the Gaussians.
        mu = means.detach().double()
        hw = half_widths.detach().double()
        lo_f = torch.floor((mu - hw - low) / cell)
        hi_f = torch.floor((mu + hw - low) / cell)
        top = (ncell - 1).double()
        empty = (~torch.isfinite(lo_f).all(-1) | ~torch.isfinite(hi_f).all(-1)
                 | (hi_f < 0).any(-1) | (lo_f > top).any(-1))
        lo = torch.minimum(lo_f.clamp(min=0), top).nan_to_num(0).long()
        hi = torch.minimum(hi_f.clamp(min=0), top).nan_to_num(0).long()
        self.box_lo = lo
        self.box_dims = torch.where(empty.unsqueeze(-1), torch.zeros_like(lo), hi - lo + 1)
        counts = self.box_dims.prod(-1)
        self.box_counts, self.box_ends = counts, torch.cumsum(counts, 0)
        self.total = int(self.box_ends[-1]) if counts.numel() else 0
        self.item_key = (torch.arange(means.shape[0], device=device) // n_per_item) * per_item

    def _cell_index(self, xyz):
        return torch.floor((xyz - self.low) / self.cell).long()

    def __iter__(self):
        ncell = self.ncell
        flat_points = self.points.reshape(-1, 3)
        for start, stop in _chunks(self.total, self.chunk_size):
            g, local = _expand(self.box_counts, self.box_ends, start, stop)
            cx, cy, cz = _box_cell(self.box_lo, self.box_dims, g, local)
            key = self.item_key[g] + (cz * ncell[1] + cy) * ncell[0] + cx
            n_in_cell = self.cell_counts[key]
            keep = n_in_cell > 0
            g, key, n_in_cell = g[keep], key[keep], n_in_cell[keep]
            pair_ends = torch.cumsum(n_in_cell, 0)
            total = int(pair_ends[-1]) if pair_ends.numel() else 0
            for sub_start, sub_stop in _chunks(total, self.chunk_size):
                pair, offset = _expand(n_in_cell, pair_ends, sub_start, sub_stop)
                row = self.order[self.cell_ends[key[pair]] - self.cell_counts[key[pair]] + offset]
                gg = g[pair]
                d = flat_points[row] - self.means[gg]
                yield gg, row, d


# --------------------------------------------------------------------------- reference kernel
def _mahalanobis(prec, d):
    """q = dᵀ P d in the documented evaluation order; prec ``[P, 6]``, d ``[P, 3]``."""
    dx, dy, dz = d.unbind(-1)
    pxx, pxy, pxz, pyy, pyz, pzz = prec.unbind(-1)
    return dx * (pxx * dx + 2 * (pxy * dy + pxz * dz)) + (dy * (pyy * dy + 2 * pyz * dz) + pzz * dz * dz)


class _ReferenceSum(torch.autograd.Function):
    """out[index] = Σ I·exp(−½q)·[q ≤ k²] over pairs; gradients to means, precision entries, intensities."""

    @staticmethod
    def forward(ctx, means, prec, intensities, pairs, out_size, k2):
        ctx.pairs, ctx.k2 = pairs, k2
        ctx.save_for_backward(means, prec, intensities)
        out = torch.zeros(out_size, dtype=means.dtype, device=means.device)
        for g, index, d in pairs:
            p = prec[g]
            q = _mahalanobis(p, d)
            value = (intensities[g] * torch.exp(-0.5 * q)).masked_fill(q > k2, 0.0)
            out.index_add_(0, index, value)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        means, prec, intensities = ctx.saved_tensors
        need_mu, need_prec, need_i = ctx.needs_input_grad[:3]
        grad_mu = torch.zeros_like(means) if need_mu else None
        grad_prec = torch.zeros_like(prec) if need_prec else None
        grad_i = torch.zeros_like(intensities) if need_i else None
        grad_out = grad_out.contiguous()
        for g, index, d in ctx.pairs:
            with torch.no_grad():
                p = prec[g]
                q = _mahalanobis(p, d)
                weight = (grad_out[index] * torch.exp(-0.5 * q)).masked_fill(q > ctx.k2, 0.0)
                if need_i:
                    grad_i.index_add_(0, g, weight)
                if need_mu or need_prec:
                    scaled = weight * intensities[g]
                    dx, dy, dz = d.unbind(-1)
                if need_mu:
                    pxx, pxy, pxz, pyy, pyz, pzz = p.unbind(-1)
                    pd = torch.stack([pxx * dx + pxy * dy + pxz * dz, pxy * dx + pyy * dy + pyz * dz,
                                      pxz * dx + pyz * dy + pzz * dz], dim=-1)
                    grad_mu.index_add_(0, g, scaled.unsqueeze(-1) * pd)
                if need_prec:
                    outer = torch.stack([dx * dx, 2 * dx * dy, 2 * dx * dz, dy * dy, 2 * dy * dz, dz * dz], dim=-1)
                    grad_prec.index_add_(0, g, (-0.5 * scaled).unsqueeze(-1) * outer)
        return grad_mu, grad_prec, grad_i, None, None, None


# --------------------------------------------------------------------------- compiled CPU kernel
def _cpu_grid(volume: VolumeGeometry, dtype):
    """Arguments of the CPU kernel for ``volume``: the axis tables x, y, z, the first voxel centre and the spacing
    (x, y, z)."""
    tables = [t.contiguous() for t in _axis_tables(volume, dtype, torch.device("cpu"))]
    first = [float(volume.axis_centres(axis)[0]) for axis in (2, 1, 0)]
    return (*tables, first, [float(d) for d in volume.dVoxel[::-1]])


class _CpuVoxelize(torch.autograd.Function):
    """Flat ``[B·Z·Y·X]`` render with the CPU extension ``module``, from means, scales, quats and intensities
    ``[B·N, …]``: the extension forms the precision entries (those of :func:`precision_entries`, bit for bit) and
    the boxes, sorts the Gaussians and renders; the backward returns its moments in the caller's order, turned into
    gradients by :func:`gradients_from_moments` and carried from the precision entries to the scales and
    quaternions by the extension (the chain of :func:`precision_entries`)."""

    @staticmethod
    def forward(ctx, module, means, scales, quats, intensities, volume, batch, k):
        grid = _cpu_grid(volume, means.dtype)
        scales, quats, intensities = (t.contiguous() for t in (scales, quats, intensities))
        out, prec, *prepared = module.forward(means.contiguous(), scales, quats, intensities, *grid, batch, k,
                                              BOX_SLACK)
        ctx.save_for_backward(scales, quats, intensities, prec, *prepared, *grid[:3])
        ctx.module, ctx.args = module, (*grid[3:], batch, k)
        return out.reshape(-1)

    @staticmethod
    def backward(ctx, grad_out):
        scales, quats, intensities, prec, *prepared = ctx.saved_tensors
        moments = ctx.module.moments(grad_out.contiguous(), *prepared, *ctx.args)
        grad_means, grad_prec, grad_i = gradients_from_moments(moments, prec, intensities)
        needs = ctx.needs_input_grad
        grad_scales = grad_quats = None
        if needs[2] or needs[3]:
            grad_scales, grad_quats = ctx.module.precision_backward(scales, quats, grad_prec.contiguous())
        return (None, grad_means if needs[1] else None, grad_scales if needs[2] else None,
                grad_quats if needs[3] else None, grad_i if needs[4] else None, None, None, None)


# --------------------------------------------------------------------------- CUDA kernels
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
    ``ends`` (int64 [keys], inclusive prefix sums), from the Gaussians' boxes ``lo``, ``hi`` (int32 [G, 3])
    on ``lattice`` = (cells x, y, z, tile x, y, z, Gaussians per item)."""

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


class _TilePlan:
    """One CUDA render: Gaussians ``[B·N]`` with their boxes ``lo``, ``hi`` on ``lattice``, their tile lists,
    and the sites (arguments ``sites`` of the kernels ``_forward`` / ``_backward``) into an output of ``shape``;
    the subclasses set them."""

    def _arguments(self, means, prec, intensities):
        return (means, prec, intensities, self.lo, self.hi, self.lists.ids, self.lists.ends, self.lattice,
                *self.sites)

    def render(self, means, prec, intensities, k2):
        out = means.new_empty(self.shape)
        self._forward(*self._arguments(means, prec, intensities), k2, out)
        return out

    def moments(self, grad, means, prec, intensities, k2):
        moments = means.new_empty((means.shape[0], 10))
        self._backward(*self._arguments(means, prec, intensities), k2, grad, moments)
        return moments


class _DensePlan(_TilePlan):
    """A dense render: Gaussians ``[B·N]`` into ``[B, Z, Y, X]``; the lattice is the voxel grid."""

    def __init__(self, kernels, lo, hi, volume, batch: int, n_per_item: int, device):
        Z, Y, X = volume.nVoxel
        self._forward, self._backward = kernels.dense_forward, kernels.dense_backward
        self.shape = (batch, Z, Y, X)
        self.lattice = [X, Y, Z, *DENSE_TILE, max(n_per_item, 1)]
        # Boxes beyond the grid are empty (hi <= n - 1 < lo); clamping keeps them within int32.
        self.lo = torch.minimum(lo, torch.tensor([X, Y, Z], device=lo.device)).to(torch.int32).contiguous()
        self.hi = hi.to(torch.int32).contiguous()
        self.sites = tuple(t.contiguous() for t in _axis_tables(volume, torch.float32, device))
        self.lists = _TileLists(kernels, self.lo, self.hi, self.lattice, batch * _tiles_per_item(self.lattice))


class _PointPlan(_TilePlan):
    """A point render: Gaussians ``[B·N]`` at points ``[B, M, 3]`` → ``[B, M]``.

    The lattice is the reference's grid of point cells (:class:`_PointPairs`: each point's cell, each
    Gaussian's cell box), so the evaluated (Gaussian, point) pairs are exactly the reference's.
    """

    def __init__(self, kernels, means, half_widths, points, n_per_item: int):
        cells = _PointPairs(means, half_widths, points, max(n_per_item, 1), CHUNK_SIZE)
        batch, n_points = points.shape[:2]
        self._forward, self._backward = kernels.points_forward, kernels.points_backward
        self.shape = (batch, n_points)
        self.lattice = [*(int(n) for n in cells.ncell), *POINT_TILE, max(n_per_item, 1)]
        self.lo = cells.box_lo.to(torch.int32).contiguous()
        self.hi = (cells.box_lo + cells.box_dims - 1).to(torch.int32).contiguous()
        n_keys = batch * _tiles_per_item(self.lattice)
        self.lists = _TileLists(kernels, self.lo, self.hi, self.lattice, n_keys)
        flat_points = points.reshape(-1, 3).contiguous()
        point_cells = cells.cell_of.to(torch.int32).contiguous()
        keys = torch.empty(flat_points.shape[0], dtype=torch.int32, device=points.device)
        kernels.point_tile_keys(point_cells, n_points, self.lattice, keys)
        order = torch.sort(keys, stable=True).indices.contiguous()
        self.sites = (flat_points, point_cells, order, torch.cumsum(torch.bincount(keys, minlength=n_keys), 0))


class _CudaRender(torch.autograd.Function):
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


# --------------------------------------------------------------------------- public API
def voxelize(means: torch.Tensor, scales: torch.Tensor, quats: torch.Tensor, intensities: torch.Tensor,
             volume: VolumeGeometry, k_sigma: float = DEFAULT_K_SIGMA, *, chunk_size: int = CHUNK_SIZE,
             backend: str = "auto") -> torch.Tensor:
    """Render Gaussians into a voxel grid.

    means ``[N, 3]`` or ``[B, N, 3]`` (x, y, z, same length unit as ``volume``), scales (σ) alike,
    quats ``[(B,) N, 4]`` (w, x, y, z; normalised here), intensities ``[(B,) N]`` (activated).
    Returns ``[Z, Y, X]`` or ``[B, Z, Y, X]`` in the inputs' dtype, differentiable with respect to all
    four. ``backend``: "auto", "reference", "cpu" or "cuda" (see the module docstring).
    """
    (means, scales, quats, intensities), batched = _batched_parameters(means, scales, quats, intensities)
    if not isinstance(volume, VolumeGeometry):
        raise InputError(f"volume must be a VolumeGeometry, got {type(volume).__name__}")
    k = _check_k_sigma(k_sigma)
    kernels = _backend.select(backend, means.device, means.dtype, operator="voxelizer", cpu=cpu_voxelizer)
    B, N = means.shape[:2]
    Z, Y, X = volume.nVoxel
    flat_means, flat_scales, flat_quats = means.reshape(B * N, 3), scales.reshape(B * N, 3), quats.reshape(B * N, 4)
    flat_i = intensities.reshape(B * N)
    if kernels.backend == "cpu":
        out = _CpuVoxelize.apply(kernels.module, flat_means, flat_scales, flat_quats, flat_i, volume, B, k)
    else:
        prec = precision_entries(flat_scales, flat_quats)
        lo, hi = _voxel_boxes(flat_means, bounding_half_widths(flat_scales.detach(), flat_quats.detach(), k), volume)
        if kernels.backend == "cuda":
            plan = _DensePlan(kernels.module, lo, hi, volume, B, N, means.device)
            out = _CudaRender.apply(flat_means, prec, flat_i, plan, k * k)
        else:
            pairs = _GridPairs(flat_means, lo, hi, volume, max(N, 1), int(chunk_size))
            out = _ReferenceSum.apply(flat_means, prec, flat_i, pairs, B * Z * Y * X, k * k)
    out = out.reshape(B, Z, Y, X)
    return out if batched else out[0]


def voxelize_batch(means: torch.Tensor, scales: torch.Tensor, quats: torch.Tensor, intensities: torch.Tensor,
                   volume: VolumeGeometry, k_sigma: float = DEFAULT_K_SIGMA, **kwargs) -> torch.Tensor:
    """:func:`voxelize` of a batch: ``[B, N, …]`` parameters → ``[B, Z, Y, X]``."""
    if means.dim() != 3:
        raise InputError(f"voxelize_batch needs means [B, N, 3], got {tuple(means.shape)}")
    return voxelize(means, scales, quats, intensities, volume, k_sigma, **kwargs)


def render_points(means: torch.Tensor, scales: torch.Tensor, quats: torch.Tensor, intensities: torch.Tensor,
                  points: torch.Tensor, k_sigma: float = DEFAULT_K_SIGMA, *,
                  chunk_size: int = CHUNK_SIZE, backend: str = "auto") -> torch.Tensor:
    """Field values at arbitrary points: ``[M, 3]`` → ``[M]`` or, batched, ``[B, M, 3]`` → ``[B, M]``.

    Parameters as in :func:`voxelize`; same semantics (e.g. the masked voxel centres of a crop). The
    points are data: no gradient flows to them. ``backend``: "auto" (the CUDA kernels for CUDA float32
    tensors, else the reference), "reference" or "cuda"; there is no compiled CPU kernel ("cpu" is an error).
    """
    (means, scales, quats, intensities), batched = _batched_parameters(means, scales, quats, intensities)
    k = _check_k_sigma(k_sigma)
    kernels = _backend.select(backend, means.device, means.dtype, operator="point renderer")
    want = 3 if batched else 2
    if points.dim() != want or points.shape[-1] != 3 or (batched and points.shape[0] != means.shape[0]):
        lead = f"[{means.shape[0]}, M, 3]" if batched else "[M, 3]"
        raise InputError(f"points must be {lead} to match the Gaussians, got {tuple(points.shape)}")
    points = (points if batched else points.unsqueeze(0)).detach().to(means.dtype)
    B, N = means.shape[:2]
    M = points.shape[1]
    if M == 0 or N == 0:
        out = torch.zeros(B, M, dtype=means.dtype, device=means.device) + 0 * intensities.sum()
        return out if batched else out[0]
    prec = precision_entries(scales, quats).reshape(B * N, 6)
    half = bounding_half_widths(scales.detach(), quats.detach(), k).reshape(B * N, 3)
    flat_means = means.reshape(B * N, 3)
    if kernels.backend == "cuda":
        plan = _PointPlan(kernels.module, flat_means, half, points, N)
        out = _CudaRender.apply(flat_means, prec, intensities.reshape(B * N), plan, k * k)
    else:
        pairs = _PointPairs(flat_means, half, points, N, int(chunk_size))
        out = _ReferenceSum.apply(flat_means, prec, intensities.reshape(B * N), pairs, B * M, k * k)
    out = out.reshape(B, M)
    return out if batched else out[0]
