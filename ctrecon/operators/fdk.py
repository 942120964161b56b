"""Feldkamp–Davis–Kress (FDK) reconstruction for the circular cone beam of :mod:`ctrecon.core.geometry`.

Pipeline (Kak & Slaney, *Principles of Computerized Tomographic Imaging*, §3.6)::

    p[a, r, c]  --(cosine × redundancy weights)-->  ramp filter along u  -->  voxel-driven backprojection

1. Pre-weighting: every pixel is multiplied by the cosine weight ``DSD / sqrt(DSD² + u² + v²)`` (u, v the
   pixel-centre offsets on the detector, mm, offDetector included) and by a redundancy weight: ½ for
   a full 2π scan (each line is measured twice), Parker weights for a short scan (see
   :func:`parker_weights`).
2. Ramp filter along each detector row: linear convolution with the Kak & Slaney band-limited ramp
   ``h(0) = 1/(4τ²)``, ``h(nτ) = -1/(n²π²τ²)`` for odd n, 0 for even n, where τ = du·DSO/DSD is the
   pixel size scaled to the isocentre, times τ; done as a zero-padded FFT (length the next power of
   two ≥ 2U) of that spatial kernel, so the DC term and the periodic aliasing of a sampled |f| are
   avoided. Apodisation windows (ν = |f| / Nyquist ∈ [0, 1]): ram-lak 1, shepp-logan
   ``sinc(ν/2)``, cosine ``cos(πν/2)``, hann ``(1 + cos πν)/2``.
3. Voxel-driven backprojection (:func:`backproject`), with the angular weight Δθ of each view.

The result is in the projections' units per mm (unit attenuation for projections in unit × mm).

Backends of the backprojection (``backend=``, resolved by :func:`ctrecon.operators._backend.select`):
``"auto"`` runs the CUDA kernel (``cuda/fdk.cu``, per-voxel code in ``cuda/fdk.cuh``) for CUDA tensors and
the torch reference of :func:`backproject` otherwise (there is no compiled CPU kernel, so ``"cpu"`` is an
InputError); ``"reference"`` and ``"cuda"`` ask for one of them. Filtering and weighting are torch code.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from ctrecon.core.errors import InputError
from ctrecon.core.limits import check_grid_memory
from ctrecon.core.geometry import TWO_PI, ConeBeamGeometry
from ctrecon.operators import _backend

__all__ = ["FILTERS", "fdk", "check_circular", "filter_projections", "filter_response", "isocentre_column_spacing",
           "ramp_kernel", "cosine_weights", "parker_weights", "redundancy_weights", "angular_weights", "backproject"]

FILTERS = ("ram-lak", "shepp-logan", "cosine", "hann")

ProgressCallback = Callable[[int, int], None]


# --------------------------------------------------------------------------- filtering
def ramp_kernel(n: int, spacing: float) -> np.ndarray:
    """Kak & Slaney discrete ramp ``h`` (float64, length ``n``, circular order: lag 0 first, negative lags last).

    ``h(0) = 1/(4τ²)``, ``h(±kτ) = -1/(k²π²τ²)`` for odd k, 0 for even k ≠ 0; τ = ``spacing`` (mm).
    """
    lags = np.arange(n, dtype=np.float64)
    lags = np.minimum(lags, n - lags)  # circular distance to lag 0
    h = np.zeros(n, dtype=np.float64)
    h[0] = 1.0 / (4.0 * spacing ** 2)
    odd = (lags % 2) == 1
    h[odd] = -1.0 / (math.pi ** 2 * lags[odd] ** 2 * spacing ** 2)
    return h


def filter_response(n_columns: int, spacing: float, filter: str = "ram-lak") -> tuple:
    """Real frequency response ``[P//2 + 1]`` (float64, for ``rfft`` of length P) and the padded length P.

    ``P`` is the next power of two ≥ 2·``n_columns``, so that the circular convolution equals the
    linear one on the ``n_columns`` output samples. The response is ``τ·FFT(h) × window`` (see module doc).
    """
    name = _check_filter(filter)
    padded = 1 << max(1, math.ceil(math.log2(2 * n_columns)))
    response = spacing * np.fft.rfft(ramp_kernel(padded, spacing)).real
    nu = np.arange(response.shape[0], dtype=np.float64) / (padded // 2)  # |f| / Nyquist
    if name == "shepp-logan":
        response *= np.sinc(nu / 2.0)  # numpy sinc(x) = sin(πx)/(πx)
    elif name == "cosine":
        response *= np.cos(math.pi * nu / 2.0)
    elif name == "hann":
        response *= 0.5 * (1.0 + np.cos(math.pi * nu))
    return response, padded


def isocentre_column_spacing(geometry: ConeBeamGeometry) -> float:
    """The detector column pitch scaled to the isocentre, du·DSO/DSD (mm): the sampling the ramp filter uses."""
    return geometry.dDetector[1] * geometry.DSO / geometry.DSD


def filter_projections(projections: torch.Tensor, geometry: ConeBeamGeometry, filter: str = "ram-lak") -> torch.Tensor:
    """Ramp-filter ``[..., U]`` rows along u at the isocentre pixel size du·DSO/DSD (no weighting)."""
    n_columns = projections.shape[-1]
    response, padded = filter_response(n_columns, isocentre_column_spacing(geometry), filter)
    response = torch.as_tensor(response, dtype=projections.dtype, device=projections.device)
    spectrum = torch.fft.rfft(projections, n=padded, dim=-1)
    return torch.fft.irfft(spectrum * response, n=padded, dim=-1)[..., :n_columns]


def _check_filter(name: str) -> str:
    key = str(name).lower().replace("_", "-")
    aliases = {"ramlak": "ram-lak", "ramp": "ram-lak", "shepplogan": "shepp-logan", "hanning": "hann"}
    key = aliases.get(key, key)
    if key not in FILTERS:
        raise InputError(f"unknown FDK filter {name!r} (choose one of {', '.join(FILTERS)})")
    return key


# --------------------------------------------------------------------------- weights
def cosine_weights(geometry: ConeBeamGeometry) -> np.ndarray:
    """``[V, U]`` cosine weights DSD / sqrt(DSD² + u² + v²) at the pixel centres (float64)."""
    v, u = geometry.pixel_offsets()
    return geometry.DSD / np.sqrt(geometry.DSD ** 2 + u[None, :] ** 2 + v[:, None] ** 2)


def parker_weights(beta: np.ndarray, gamma: np.ndarray, arc: float) -> np.ndarray:
    """Parker (1982) short-scan weights, generalised to any arc in [π + fan, 2π].

    ``beta``: gantry angle from the scan's start (radians, in the direction of rotation); ``gamma``:
    Parker's fan angle of the ray, with the convention that the conjugate of ray (β, γ) is
    (β + π + 2γ, -γ). With Δ = (arc - π)/2 (Parker's half-fan δ when the arc is π + 2δ)::

        w = sin²(π/4 · β / (Δ - γ))              0 ≤ β ≤ 2Δ - 2γ
            1                                   2Δ - 2γ ≤ β ≤ π - 2γ
            sin²(π/4 · (π + 2Δ - β) / (Δ + γ))  π - 2γ ≤ β ≤ π + 2Δ
            0                                   elsewhere

    For an over-scan (arc > π + fan) this is the classic formula with the half-fan δ replaced by Δ
    (the "generalised Parker weights" of Silver 2000 / Wesarg et al. 2002): the transitions widen to
    the whole over-scan and the weights of every pair of redundant rays still sum to one. Broadcasts.
    """
    beta = np.asarray(beta, dtype=np.float64)
    gamma = np.asarray(gamma, dtype=np.float64)
    half = (arc - math.pi) / 2.0
    if half <= 0:
        raise InputError(f"a short scan needs an arc above 180°, got {math.degrees(arc):.1f}°")
    rising_end = 2.0 * (half - gamma)
    falling_start = math.pi - 2.0 * gamma
    with np.errstate(divide="ignore", invalid="ignore"):
        rising = np.sin(math.pi / 4.0 * beta / (half - gamma)) ** 2
        falling = np.sin(math.pi / 4.0 * (math.pi + 2.0 * half - beta) / (half + gamma)) ** 2
    weights = np.where(beta < rising_end, rising, np.where(beta <= falling_start, 1.0, falling))
    inside = (beta >= 0.0) & (beta <= arc)
    return np.where(inside, np.nan_to_num(weights), 0.0)


def _rotation_direction(geometry: ConeBeamGeometry) -> float:
    """+1 when the gantry angles increase from the first to the last view, -1 when they decrease."""
    span = geometry.angles[-1] - geometry.angles[0]
    return -1.0 if span < 0 else 1.0


def redundancy_weights(geometry: ConeBeamGeometry) -> np.ndarray:
    """``[A, U]`` data-redundancy weights: ½ for a full scan, Parker weights for a short scan.

    Short scan: β = |θ - θ₀| along the rotation (θ₀ the first angle) and, for the geometry of
    DESIGN.md §2, Parker's γ = -direction·atan(u / DSD) with u the column offset (offDetector included).
    """
    n_views, n_columns = geometry.n_angles, geometry.nDetector[1]
    if not geometry.is_short_scan():
        return np.full((n_views, n_columns), 0.5)
    minimum = math.pi + geometry.fan_angle
    if geometry.arc < minimum - 1e-6:
        raise InputError(f"the scan arc ({math.degrees(geometry.arc):.1f}°) is shorter than 180° + fan angle "
                         f"({math.degrees(minimum):.1f}°): FDK needs at least a short scan")
    if n_views < 2:
        raise InputError("a short scan needs at least two views")
    direction = _rotation_direction(geometry)
    beta = direction * (geometry.angles - geometry.angles[0])
    _, u = geometry.pixel_offsets()
    gamma = -direction * np.arctan(u / geometry.DSD)
    return parker_weights(beta[:, None], gamma[None, :], geometry.arc)


def angular_weights(geometry: ConeBeamGeometry) -> np.ndarray:
    """``[A]`` quadrature weights Δθ (radians) for the integral over the gantry angle.

    Full scan: each view gets half the angular gap to its two neighbours on the circle (angles taken
    mod 2π, so any order and non-uniform spacing work; coincident angles share their weight).
    Short scan: the trapezoid rule over β ∈ [first, last] angle (the end views get half a gap).
    """
    n_views = geometry.n_angles
    if n_views == 1:
        return np.array([TWO_PI if not geometry.is_short_scan() else geometry.arc])
    if geometry.is_short_scan():
        beta = _rotation_direction(geometry) * (geometry.angles - geometry.angles[0])
        order = np.argsort(beta, kind="stable")
        ordered = beta[order]
        gaps = np.diff(ordered)
        before = np.concatenate([[0.0], gaps])
        after = np.concatenate([gaps, [0.0]])
    else:
        wrapped = np.mod(geometry.angles, TWO_PI)
        order = np.argsort(wrapped, kind="stable")
        ordered = wrapped[order]
        gaps = np.diff(np.concatenate([ordered, [ordered[0] + TWO_PI]]))  # gap to the next view, cyclically
        after = gaps
        before = np.roll(gaps, 1)
    weights = np.empty(n_views)
    weights[order] = 0.5 * (before + after)
    return weights


# --------------------------------------------------------------------------- backprojection
def backproject(filtered: torch.Tensor, geometry: ConeBeamGeometry, view_weights: torch.Tensor | np.ndarray,
                *, max_elements: Optional[int] = None, progress: Optional[ProgressCallback] = None,
                backend: str = "auto") -> torch.Tensor:
    """Voxel-driven FDK backprojection ``[A, V, U] → [Z, Y, X]`` (float32, on ``filtered``'s device).

    Exact discretisation (a CUDA kernel must reproduce it): for voxel (k, j, i) with world centre
    (x, y, z) from DESIGN.md §2 and view a at angle θ (cos θ, sin θ rounded to float32),

        s = x·cos θ + y·sin θ          (towards the source)      t = -x·sin θ + y·cos θ   (along u)
        L = DSO - s                    m = DSD / L               (magnification)
        c = (m·t - ou)/du + (U-1)/2    r = (m·z - ov)/dv + (V-1)/2   (continuous pixel indices)
        f[k, j, i] = Σ_a  view_weights[a] · (DSO / L)² · bilinear(filtered[a], r, c)

    where ``bilinear`` takes the four pixels (⌊r⌋ or ⌊r⌋+1, ⌊c⌋ or ⌊c⌋+1) with weights
    (1 - fr or fr)·(1 - fc or fc), fr = r - ⌊r⌋, fc = c - ⌊c⌋, and a pixel outside [0, V-1]×[0, U-1]
    contributes zero (implemented by clamping r to [-1, V] and c to [-1, U] on a zero-bordered
    detector, which gives the same values). All arithmetic is float32. Memory is bounded by
    processing chunks of views (and z slabs) of at most ``max_elements`` voxel-view pairs (default
    2²¹ on CPU: few, large tensor operations with about 200 MB of temporaries; 2²⁴ on GPU);
    ``progress(done, total)`` is called after each chunk of views. ``backend`` (see the module docstring):
    the CUDA kernel of ``cuda/fdk.cu`` computes the same sums, all views in one pass (progress reported once).
    """
    device = filtered.device
    kernels = _backend.select(backend, device, torch.float32, operator="FDK backprojection")
    n_views, n_rows, n_columns = filtered.shape
    volume = geometry.volume
    n_z, n_y, n_x = volume.shape
    f32 = dict(dtype=torch.float32, device=device)
    xs = torch.as_tensor(volume.axis_centres(2), **f32)
    ys = torch.as_tensor(volume.axis_centres(1), **f32)
    zs = torch.as_tensor(volume.axis_centres(0), **f32)
    cos = torch.as_tensor(np.cos(geometry.angles), **f32)
    sin = torch.as_tensor(np.sin(geometry.angles), **f32)
    weights = torch.as_tensor(view_weights).to(**f32)
    (dv, du), (ov, ou) = geometry.dDetector, geometry.offDetector
    dso, dsd = float(geometry.DSO), float(geometry.DSD)
    if kernels.backend == "cuda":
        out = _cuda_backproject(kernels.module, filtered.to(torch.float32), xs, ys, zs, cos, sin, weights,
                                (dso, dsd, du, dv, ou, ov))
        if progress is not None:
            progress(n_views, n_views)
        return out
    # Zero border: one pixel before, two after, so that clamped indices and their +1 neighbours read zeros.
    width = n_columns + 3
    bordered = torch.nn.functional.pad(filtered.to(torch.float32), (1, 2, 1, 2)).reshape(n_views, -1)

    if max_elements is None:
        max_elements = 1 << (24 if device.type == "cuda" else 21)
    plane = n_y * n_x
    slab = max(1, min(n_z, max_elements // plane))
    chunk = max(1, min(n_views, max_elements // (slab * plane)))
    out = torch.zeros((n_z, plane), **f32)
    for start in range(0, n_views, chunk):
        views = slice(start, min(start + chunk, n_views))
        c, s = cos[views, None, None], sin[views, None, None]
        distance = dso - (xs[None, None, :] * c + ys[None, :, None] * s)               # L       [n, Y, X]
        along_u = (-xs[None, None, :] * s + ys[None, :, None] * c).reshape(-1, 1, plane)  # t  [n, 1, YX]
        magnification = (dsd / distance).reshape(-1, 1, plane)                         # m       [n, 1, YX]
        distance_weight = ((dso / distance) ** 2).reshape(-1, 1, plane) * weights[views, None, None]
        column = ((magnification * along_u - ou) / du + (n_columns - 1) / 2.0).clamp_(-1.0, float(n_columns))
        column_floor = torch.floor(column)
        column_frac = column - column_floor
        column_index = column_floor.to(torch.long) + 1                                 # bordered index
        data = bordered[views]
        for z0 in range(0, n_z, slab):
            row = ((magnification * zs[z0:z0 + slab, None] - ov) / dv + (n_rows - 1) / 2.0).clamp_(-1.0, float(n_rows))
            row_floor = torch.floor(row)                                               # [n, z, YX]
            row_frac = row - row_floor
            index = ((row_floor.to(torch.long) + 1) * width + column_index).reshape(data.shape[0], -1)
            corner = lambda offset: torch.gather(data, 1, index + offset).view(row.shape)  # noqa: E731
            top = torch.lerp(corner(0), corner(1), column_frac)
            bottom = torch.lerp(corner(width), corner(width + 1), column_frac)
            out[z0:z0 + slab] += (torch.lerp(top, bottom, row_frac) * distance_weight).sum(dim=0)
        if progress is not None:
            progress(views.stop, n_views)
    return out.reshape(n_z, n_y, n_x)


def _cuda_backproject(kernels, filtered, xs, ys, zs, cos, sin, weights, scan) -> torch.Tensor:
    """:func:`backproject` with the CUDA kernel: filtered ``[A, V, U]``, the float32 tables xs ``[X]``, ys ``[Y]``,
    zs ``[Z]`` (mm), cos θ, sin θ, weights ``[A]`` and scan = (DSO, DSD, du, dv, ou, ov) → ``[Z, Y, X]``."""
    tables = [t.contiguous() for t in (filtered, xs, ys, zs, cos, sin, weights)]
    out = filtered.new_empty((zs.numel(), ys.numel(), xs.numel()))
    kernels.fdk_backproject(*tables, [float(v) for v in scan], out)
    return out


# --------------------------------------------------------------------------- FDK
def fdk(projections, geometry: ConeBeamGeometry, filter: str = "ram-lak", *, device=None,
        max_elements: Optional[int] = None, progress: Optional[ProgressCallback] = None,
        backend: str = "auto") -> torch.Tensor:
    """FDK reconstruction ``[Z, Y, X]`` (float32) of cone-beam ``projections`` ``[A, V, U]``.

    projections: numpy array or torch tensor (line integrals, unit attenuation × mm). geometry: the
    scan's :class:`ConeBeamGeometry` (its volume is the reconstruction grid; ``arc`` < 2π selects
    Parker short-scan weighting). filter: one of :data:`FILTERS`. device: where to compute ("auto",
    "cpu", "cuda", a torch.device; default: the tensor's device, CPU for numpy). ``progress(done_views, total_views)`` reports backprojection.
    backend: of the backprojection (:func:`backproject`).

    Not handled: detectors offset so far that part of the object is seen only half the time
    (half-fan scans need extra redundancy weights); the detector should cover the object from every view.
    """
    check_circular(geometry)
    name = _check_filter(filter)
    check_grid_memory(geometry.nVoxel, 2, "FDK")
    data = _as_projection_tensor(projections, geometry, device)
    _check_detector_sees_volume(geometry)
    pre_weights = cosine_weights(geometry)[None, :, :] * redundancy_weights(geometry)[:, None, :]
    weighted = data * torch.as_tensor(pre_weights, dtype=torch.float32, device=data.device)
    filtered = filter_projections(weighted, geometry, name)
    return backproject(filtered, geometry, angular_weights(geometry), max_elements=max_elements, progress=progress,
                       backend=backend)


def check_circular(geometry) -> None:
    """InputError unless ``geometry`` is a circular :class:`ConeBeamGeometry`, the only orbit FDK's weights
    and filtering are derived for."""
    if not isinstance(geometry, ConeBeamGeometry):
        raise InputError(f"FDK needs a circular scan, and this scan's geometry is {type(geometry).__name__} "
                         "(per-view source and detector positions): reconstruct it with an iterative method "
                         "(reconstruct --method sart|os-sart|cgls|fista-tv)")


def _as_projection_tensor(projections, geometry: ConeBeamGeometry, device) -> torch.Tensor:
    if torch.is_tensor(projections):
        data = projections.detach()
    else:
        try:
            data = torch.as_tensor(np.asarray(projections, dtype=np.float32))
        except (TypeError, ValueError):
            raise InputError("projections must be a numeric array [A, V, U]") from None
    target = _backend.resolve_device(device) if device is not None else data.device
    if tuple(data.shape) != tuple(geometry.projection_shape):
        raise InputError(f"projections have shape {tuple(data.shape)} but the geometry expects "
                         f"{tuple(geometry.projection_shape)} (views, detector rows, detector columns)")
    if not data.is_floating_point():
        data = data.to(torch.float32)
    if not bool(torch.isfinite(data).all()):
        raise InputError("projections contain NaN or infinite values")
    return data.to(device=target, dtype=torch.float32)


def _check_detector_sees_volume(geometry: ConeBeamGeometry) -> None:
    """InputError when no view projects any part of the volume's bounding box onto the detector."""
    lower, upper = geometry.volume.bounds()
    corners = np.array([[x, y, z] for x in (lower[0], upper[0]) for y in (lower[1], upper[1])
                        for z in (lower[2], upper[2])])
    rows, columns = geometry.detector_coordinates(corners)        # [A, 8] fractional pixel indices
    (n_rows, n_columns) = geometry.nDetector                      # the detector spans [-0.5, n - 0.5]
    overlaps = ((columns.min(1) < n_columns - 0.5) & (columns.max(1) > -0.5)
                & (rows.min(1) < n_rows - 0.5) & (rows.max(1) > -0.5))
    if not overlaps.any():
        raise InputError("the scan geometry does not see the reconstruction volume: no view projects it onto "
                         "the detector (check offOrigin/offDetector)")
