"""Differentiable cone-beam projector ``A`` (Joseph's method) and its exact adjoint ``A.T``.

    A = Projector(geometry)        # a ScanGeometry (circular ConeBeamGeometry or per-view ConeVecGeometry)
    y = A(x)                       # [*, Z, Y, X] -> [*, A, V, U] line integrals (unit attenuation × mm)
    x = A.T(y)                     # [*, A, V, U] -> [*, Z, Y, X], the transpose of the same matrix
    A.subset(view_indices)         # the rows of A for some views, e.g. K random views per iteration

Both directions are ``torch.autograd.Function``\\ s whose backward is the other direction, so
gradients (and gradients of gradients) are exact.

Discretisation (the contract that every backend implements: the torch reference here, the
compiled CPU kernel and the CUDA kernels):

1. Coordinates are continuous voxel indices (i, j, k) = (x, y, z): voxel ``[k, j, i]`` is centred on
   the integer point (i, j, k) (``VolumeGeometry.world_to_index``). Per view, computed in float64:
   the source S, the centre D0 of pixel (0, 0), and the steps Du, Dv to the next pixel column / row;
   the ray to pixel (r, c) has direction ``d = D0 + c·Du + r·Dv - S`` (float64, in this order).
2. Dominant axis ``m`` = the axis with the largest ``|d_m|`` (ties: x before y before z); p, q are
   the two others, (y, z) for m = x, (x, z) for m = y, (x, y) for m = z. The ray is sampled where it
   crosses each plane of voxel centres ``m = s``, s = 0 … N_m-1, at the in-plane point
   ``P_s = S_p - S_m·d_p/d_m + s·d_p/d_m`` (same for q).
3. Each sample is the bilinear interpolation of slice s at (P_s, Q_s), with voxels outside the
   volume read as 0 (so a sample more than one voxel outside the grid contributes nothing and a ray
   that misses the volume gives exactly 0).
4. Samples are weighted by the ray length between consecutive planes,
   ``L = ‖d ⊙ (dx, dy, dz)‖ / |d_m|`` mm, so ``(A x)(ray) = L Σ_s bilinear(x[slice s], P_s, Q_s)``.
   The whole line is integrated (the source lies outside the volume; the detector is assumed to).
5. ``A.T`` scatters ``y(ray)·L·w`` onto the same four voxels with the same bilinear weights w: the
   exact transpose, so ⟨A x, y⟩ = ⟨x, Aᵀ y⟩ up to floating-point rounding.

Backends (``backend=``, resolved by :func:`ctrecon.operators._backend.select`): ``"auto"`` runs the CUDA
kernels (``cuda/projector.cu``) for CUDA float32 tensors and the compiled CPU kernel (``csrc/projector.cpp``,
OpenMP, AVX2 where present) for CPU float32/float64 tensors, both built on first use, and the torch
reference below for anything else, where a build fails or with ``CTRECON_FORCE_REFERENCE=1``;
``"reference"``, ``"cpu"`` and ``"cuda"`` ask for one of them. Both compiled paths set up each ray with the
same code (``trace_ray`` in ``cuda/projector.cuh``). The reference works on chunks of detector rows whose
temporaries fit ``memory_budget`` bytes, so memory stays bounded for any number of views; the compiled CPU
path needs one zero-padded copy of the volume.
"""
from __future__ import annotations

import itertools
import math
from typing import Iterator

import numpy as np
import torch

from ctrecon.core.errors import InputError
from ctrecon.core.geometry import ScanGeometry
from ctrecon.operators import _backend

__all__ = ["Projector", "view_table", "cpu_projector"]

#: The compiled CPU kernel (csrc/projector.cpp, which includes the ray set-up of cuda/projector.cuh).
cpu_projector = _backend.cpu_extension("cpu_projector", "projector.cpp", ["common.cuh", "projector.cuh"])

# Bytes of torch temporaries per (ray, slice) sample in the reference, plus per batch item.
_BYTES_PER_SAMPLE = 128
_BYTES_PER_SAMPLE_PER_ITEM = 64

# In-plane axes (p, q) of each dominant axis m (0 = x, 1 = y, 2 = z).
_PLANE_AXES = ((1, 2), (0, 2), (0, 1))


def view_table(geometry: ScanGeometry) -> np.ndarray:
    """Per-view ray geometry ``[A, 12]`` float64 in voxel-index coordinates (x, y, z).

    Columns: source S (3), centre D0 of pixel (0, 0) (3), step Du per detector column (3), step Dv
    per detector row (3); pixel (r, c) sits at ``D0 + c·Du + r·Dv``.
    """
    volume = geometry.volume
    spacing = np.array(volume.dVoxel[::-1])
    source, first_pixel, column_step, row_step = geometry.pixel_grid()
    return np.ascontiguousarray(np.concatenate(
        [volume.world_to_index(source), volume.world_to_index(first_pixel), column_step / spacing,
         row_step / spacing], axis=1), dtype=np.float64)


class _Forward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projector, volume):
        ctx.projector = projector
        return projector._project(volume)

    @staticmethod
    def backward(ctx, grad):
        return None, _Adjoint.apply(ctx.projector, grad)


class _Adjoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projector, projections):
        ctx.projector = projector
        return projector._backproject(projections)

    @staticmethod
    def backward(ctx, grad):
        return None, _Forward.apply(ctx.projector, grad)


class _CudaKernels:
    """The CUDA kernels (cuda/projector.cu) behind the interface of the CPU extension: one batch item per call,
    float32 tensors and views ``[A, 12]`` float64 on one CUDA device."""

    def __init__(self, launcher):
        self._launcher = launcher

    def forward(self, volume, views, spacing, out):
        """volume ``[Z, Y, X]`` → out ``[A, V, U]``."""
        self._launcher.project_forward(volume, views, list(spacing), out)

    def adjoint(self, projections, views, spacing, slab_rows, out):
        """projections ``[A, V, U]`` → out ``[Z, Y, X]`` (overwritten); ``slab_rows`` only matters on the CPU."""
        self._launcher.project_adjoint(projections, views, list(spacing), out)


class Projector:
    """Cone-beam projector of ``geometry`` (see the module docstring for the discretisation).

    backend: ``"auto"``, ``"reference"``, ``"cpu"`` or ``"cuda"`` (see the module docstring; "cpu" and "cuda"
    raise an InputError for tensors on the other device). memory_budget: bytes of temporaries per chunk of
    rays in the reference (default: 4 MiB on CPU, where small cache-sized chunks are fastest, 1 GiB on GPUs).
    """

    def __init__(self, geometry: ScanGeometry, *, backend: str = "auto", memory_budget: int | None = None,
                 _views: np.ndarray | None = None):
        if not isinstance(geometry, ScanGeometry):
            raise InputError(f"Projector needs a ScanGeometry, got {type(geometry).__name__}")
        _backend.check_backend(backend, "projector")
        if memory_budget is not None and int(memory_budget) <= 0:
            raise InputError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
        self.geometry = geometry
        self.backend = backend
        self.memory_budget = None if memory_budget is None else int(memory_budget)
        self._views = view_table(geometry) if _views is None else _views
        self._spacing_xyz = tuple(geometry.dVoxel[::-1])
        self._device_views: dict = {}

    # ------------------------------------------------------------------ shapes
    @property
    def volume_shape(self) -> tuple:
        """``(Z, Y, X)``."""
        return self.geometry.nVoxel

    @property
    def projection_shape(self) -> tuple:
        """``(A, V, U)``."""
        return self.geometry.projection_shape

    @property
    def n_views(self) -> int:
        return self.geometry.n_angles

    def __repr__(self) -> str:
        return f"Projector({self.volume_shape} -> {self.projection_shape}, backend={self.backend!r})"

    # ------------------------------------------------------------------ operators
    def __call__(self, volume: torch.Tensor) -> torch.Tensor:
        """Line integrals ``[*, A, V, U]`` of ``volume`` ``[*, Z, Y, X]`` (differentiable)."""
        return _Forward.apply(self, self._checked(volume, self.volume_shape, "volume", "[*, Z, Y, X]"))

    forward = __call__

    def T(self, projections: torch.Tensor) -> torch.Tensor:
        """Exact adjoint: ``[*, A, V, U]`` -> ``[*, Z, Y, X]`` (differentiable)."""
        return _Adjoint.apply(self, self._checked(projections, self.projection_shape, "projections",
                                                  "[*, A, V, U]"))

    adjoint = T

    def subset(self, view_indices) -> "Projector":
        """The projector of the views ``view_indices`` (int sequence, array, tensor or slice); cheap."""
        if isinstance(view_indices, torch.Tensor):
            view_indices = view_indices.detach().cpu().numpy()
        if not isinstance(view_indices, slice):
            view_indices = np.asarray(view_indices)
            if view_indices.size == 0:
                raise InputError("subset needs at least one view")
            if view_indices.dtype.kind not in "iub" or view_indices.ndim > 1:
                raise InputError("view_indices must be a slice or a 1-D sequence of integers (or booleans)")
            if view_indices.dtype.kind != "b" and (
                    view_indices.max() >= self.n_views or view_indices.min() < -self.n_views):
                raise InputError(f"view index out of range for {self.n_views} views")
        views = self._views[view_indices]
        if views.shape[0] == 0:
            raise InputError("subset needs at least one view")
        return Projector(self.geometry[view_indices], backend=self.backend, memory_budget=self.memory_budget,
                         _views=np.ascontiguousarray(views))

    def uses_compiled(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> bool:
        """Whether tensors of ``device`` and ``dtype`` go through compiled kernels (builds them on first call)."""
        return self._kernels(torch.device(device), dtype) is not None

    # ------------------------------------------------------------------ internals
    def _checked(self, tensor, shape: tuple, name: str, layout: str) -> torch.Tensor:
        if not isinstance(tensor, torch.Tensor):
            tensor = torch.as_tensor(tensor)
        if tensor.dtype not in (torch.float32, torch.float64):
            raise InputError(f"{name} must be float32 or float64, got {tensor.dtype}")
        if tuple(tensor.shape[-3:]) != tuple(shape):
            raise InputError(f"{name} must have shape {layout} = (..., {', '.join(map(str, shape))}), "
                             f"got {tuple(tensor.shape)}")
        return tensor

    def _kernels(self, device: torch.device, dtype: torch.dtype):
        """The compiled kernels for these tensors (``forward``/``adjoint`` of one batch item), or None."""
        kernels = _backend.select(self.backend, device, dtype, operator="projector", cpu=cpu_projector)
        return _CudaKernels(kernels.module) if kernels.backend == "cuda" else kernels.module

    def _views_on(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._device_views:
            self._device_views[key] = torch.from_numpy(self._views).to(device)
        return self._device_views[key]

    def _project(self, volume: torch.Tensor) -> torch.Tensor:
        batch = volume.shape[:-3]
        flat = volume.reshape(-1, *self.volume_shape).contiguous()
        out = flat.new_empty((flat.shape[0], *self.projection_shape))
        kernels = self._kernels(flat.device, flat.dtype)
        if kernels is not None:
            views = self._views_on(flat.device)
            for item in range(flat.shape[0]):
                kernels.forward(flat[item], views, self._spacing_xyz, out[item])
        else:
            self._reference_project(flat, out)
        return out.reshape(*batch, *self.projection_shape)

    def _backproject(self, projections: torch.Tensor) -> torch.Tensor:
        batch = projections.shape[:-3]
        flat = projections.reshape(-1, *self.projection_shape).contiguous()
        out = flat.new_empty((flat.shape[0], *self.volume_shape))
        kernels = self._kernels(flat.device, flat.dtype)
        if kernels is not None:
            views = self._views_on(flat.device)
            for item in range(flat.shape[0]):
                kernels.adjoint(flat[item], views, self._spacing_xyz, _slab_rows(self.volume_shape[0]), out[item])
        else:
            self._reference_backproject(flat, out)
        return out.reshape(*batch, *self.volume_shape)

    # ------------------------------------------------------------------ torch reference
    def _reference_project(self, volume: torch.Tensor, out: torch.Tensor) -> None:
        """volume ``[B, Z, Y, X]`` -> out ``[B, A, V, U]``."""
        batch = volume.shape[0]
        padded = torch.nn.functional.pad(volume, (1, 1, 1, 1, 1, 1)).reshape(batch, -1)
        target = out.view(batch, -1)
        target.zero_()
        for rays, offset, corner, frac_p, frac_q, length in self._footprints(batch, volume.dtype, volume.device):
            v00, v10, v01, v11 = (torch.gather(padded, 1, _flat_index(offset + step, batch)).view(batch, *offset.shape)
                                  for step in corner)
            lower = torch.lerp(v00, v10, frac_p)
            upper = torch.lerp(v01, v11, frac_p)
            target[:, rays] = torch.lerp(lower, upper, frac_q).sum(-1) * length

    def _reference_backproject(self, projections: torch.Tensor, out: torch.Tensor) -> None:
        """projections ``[B, A, V, U]`` -> out ``[B, Z, Y, X]``: the same footprints, scattered."""
        nz, ny, nx = self.volume_shape
        batch = projections.shape[0]
        source = projections.reshape(batch, -1)
        padded = projections.new_zeros((batch, (nz + 2) * (ny + 2) * (nx + 2)))
        for rays, offset, corner, frac_p, frac_q, length in self._footprints(batch, projections.dtype,
                                                                             projections.device):
            weighted = (source[:, rays] * length)[:, :, None]
            upper = weighted * frac_q
            lower = weighted - upper
            for step, values in zip(corner, (lower - lower * frac_p, lower * frac_p,
                                             upper - upper * frac_p, upper * frac_p)):
                padded.scatter_add_(1, _flat_index(offset + step, batch), values.reshape(batch, -1))
        out.copy_(padded.view(batch, nz + 2, ny + 2, nx + 2)[:, 1:-1, 1:-1, 1:-1])

    def _footprints(self, batch: int, dtype: torch.dtype, device: torch.device) -> Iterator[tuple]:
        """The operator's samples, chunk by chunk, on the zero-padded ``[Z+2, Y+2, X+2]`` volume.

        Yields ``(rays [R], offset [R, S], corner (4 offsets), frac_p [R, S], frac_q [R, S], length [1, R])``:
        ``rays`` index the flattened projections; sample (ray, s) interpolates the padded voxels at
        ``offset + corner[k]`` (lower corner, +p, +q, +p+q) with fractions frac_p, frac_q, and the ray's
        sum is multiplied by ``length``. Slices where a chunk's samples are all zero are left out.
        A chunk is a block of detector rows of one view, or of columns of one row on wide detectors,
        sized so that its temporaries fit the memory budget.
        """
        n_views, n_rows, n_cols = self.projection_shape
        nz, ny, nx = self.volume_shape
        counts = torch.tensor((nx, ny, nz), device=device)
        strides = torch.tensor((1, nx + 2, (nx + 2) * (ny + 2)), device=device)
        plane_axes = torch.tensor(_PLANE_AXES, device=device)
        spacing = torch.tensor(self._spacing_xyz, dtype=torch.float64, device=device)
        views = self._views_on(device)
        budget = self.memory_budget or _default_budget(device)
        bytes_per_ray = max(nx, ny, nz) * (_BYTES_PER_SAMPLE + _BYTES_PER_SAMPLE_PER_ITEM * batch)
        rays_per_chunk = max(1, budget // bytes_per_ray)
        cols_per_chunk = min(n_cols, rays_per_chunk)
        rows_per_chunk = max(1, rays_per_chunk // n_cols) if cols_per_chunk == n_cols else 1
        blocks = [(row0, min(row0 + rows_per_chunk, n_rows), col0, min(col0 + cols_per_chunk, n_cols))
                  for row0 in range(0, n_rows, rows_per_chunk) for col0 in range(0, n_cols, cols_per_chunk)]
        columns = torch.arange(n_cols, dtype=torch.float64, device=device)[None, :, None]
        for view, (row0, row1, col0, col1) in itertools.product(range(n_views), blocks):
            source, first_pixel, step_u, step_v = views[view].view(4, 3)
            rows = torch.arange(row0, row1, dtype=torch.float64, device=device)[:, None, None]
            direction = (first_pixel + columns[:, col0:col1] * step_u + rows * step_v - source).reshape(-1, 3)
            size = direction.abs()
            m = torch.where((size[:, 0] >= size[:, 1]) & (size[:, 0] >= size[:, 2]), 0,
                            torch.where(size[:, 1] >= size[:, 2], 1, 2))
            axes = torch.cat([m[:, None], plane_axes[m]], dim=1)  # [R, 3]: m, p, q per ray
            d = direction.gather(1, axes)
            s0 = source.expand(axes.shape[0], 3).gather(1, axes)
            slopes = d[:, 1:] / d[:, :1]                       # [R, 2]: dp/dm, dq/dm
            starts = s0[:, 1:] - s0[:, :1] * slopes            # coordinate at slice 0
            n = counts[axes]                                   # [R, 3] voxel counts along m, p, q
            first, last = _slice_range(starts, slopes, n)
            if first >= last:
                continue
            s = torch.arange(first, last, device=device)
            low_p, frac_p = _floor_in_grid(starts[:, 0:1] + s * slopes[:, 0:1], n[:, 1:2])
            low_q, frac_q = _floor_in_grid(starts[:, 1:2] + s * slopes[:, 1:2], n[:, 2:3])
            stride = strides[axes]                             # [R, 3] padded strides of m, p, q
            # Slices past a ray's own count (non-cubic grids) land on the zero padding plane.
            slice_index = torch.minimum(s, n[:, 0:1]) + 1
            offset = slice_index * stride[:, 0:1] + (low_p + 1) * stride[:, 1:2] + (low_q + 1) * stride[:, 2:3]
            corner = (0, stride[:, 1:2], stride[:, 2:3], stride[:, 1:2] + stride[:, 2:3])
            length = (direction * spacing).norm(dim=1) / d[:, 0].abs()
            first_ray = (view * n_rows + row0) * n_cols + col0
            rays = torch.arange(first_ray, first_ray + (row1 - row0 - 1) * n_cols + col1 - col0, device=device)
            yield rays, offset, corner, frac_p.to(dtype), frac_q.to(dtype), length.to(dtype)[None]


def _flat_index(index: torch.Tensor, batch: int) -> torch.Tensor:
    """``[R, S]`` indices as the ``[batch, R·S]`` index of a gather / scatter along dim 1."""
    return index.reshape(1, -1).expand(batch, -1)


def _floor_in_grid(coord: torch.Tensor, count: torch.Tensor) -> tuple:
    """Lower neighbour (in [-1, count-1]) and fraction of coordinates clamped to [-1, count].

    Beyond the grid a coordinate is clamped onto the zero padding, which leaves its interpolated value
    (zero) unchanged, so the padded footprint never leaves the padded volume. (Truncation of
    ``coord + 1 >= 0`` is the floor; ``torch.floor`` is avoided because it goes multi-threaded on
    small tensors, which is slow on busy machines.)
    """
    coord = torch.minimum(coord.clamp(min=-1.0), count.to(coord.dtype))
    low = torch.minimum((coord + 1.0).long() - 1, count - 1)
    return low, coord - low


def _slice_range(starts: torch.Tensor, slopes: torch.Tensor, counts: torch.Tensor) -> tuple:
    """Slices ``[first, last)`` outside of which every sample of every ray is zero.

    starts, slopes ``[R, 2]``: in-plane coordinates ``start + s·slope`` of p and q, which must lie in
    (-1, n) for a nonzero sample; counts ``[R, 3]`` voxel counts along m, p, q. One slice of margin
    either side absorbs rounding.
    """
    bound = counts[:, 1:].to(starts.dtype)
    flat = slopes == 0
    inside = (starts > -1) & (starts < bound)
    safe = torch.where(flat, torch.ones_like(slopes), slopes)
    a, b = (-1.0 - starts) / safe, (bound - starts) / safe
    lo = torch.where(flat, torch.where(inside, -torch.inf, torch.inf), torch.minimum(a, b)).amax(dim=1).clamp(min=0)
    hi = torch.where(flat, torch.where(inside, torch.inf, -torch.inf), torch.maximum(a, b)).amin(dim=1)
    hi = torch.minimum(hi, counts[:, 0].to(hi.dtype) - 1)
    hit = lo <= hi
    if not bool(hit.any()):
        return 0, 0
    first = int(lo[hit].min()) - 1
    last = int(torch.ceil(hi[hit].max())) + 2
    return max(first, 0), min(last, int(counts[:, 0].max()))


def _default_budget(device: torch.device) -> int:
    """Bytes of temporaries per reference chunk: 1 GiB on GPUs. On CPU under 32k samples, torch's grain
    for multi-threading elementwise ops: the reference's many small ops run fastest single-threaded, in
    cache (multi-threaded, each op pays a thread hand-off, which stalls badly on a busy machine)."""
    return 2 ** 30 if device.type == "cuda" else 32768 * _BYTES_PER_SAMPLE


def _slab_rows(n_z: int) -> int:
    """z rows per slab of the compiled adjoint (fixed per volume, so results do not depend on threads)."""
    return max(8, math.ceil(n_z / 16))
