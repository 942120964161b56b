"""Simulated cone-beam scans of CT volumes: HU → unit attenuation, resampling, projection, dose/noise model.

Intensity scale (DESIGN.md §2): ``u = (clip(HU, -1024, 3071) + 1024) / 4095`` (air 0, water ≈ 0.25).

Noise model (``dose_i0`` given): :mod:`ctrecon.core.noise`.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

from ctrecon.operators._backend import resolve_device
from ctrecon.core.errors import InputError
from ctrecon.core.limits import check_memory
from ctrecon.core.units import MU_WATER, hu_to_unit
from ctrecon.core.geometry import TWO_PI, ConeBeamGeometry, VolumeGeometry
from ctrecon.core.io import Scan
from ctrecon.core.noise import add_noise

__all__ = ["resample_volume", "resampled_grid", "regrid_scan", "add_noise", "simulate_scan"]

def resample_volume(volume, spacing, *, shape=None, spacing_out=None) -> tuple:
    """Trilinear resampling of ``volume`` ``[Z, Y, X]`` to ``shape`` (Z, Y, X) or to ``spacing_out`` mm.

    Semantics of ``torch.nn.functional.interpolate(mode="trilinear", align_corners=False)``: the
    grid keeps its physical extent (n·d per axis) and its centre, so the new spacing is
    ``d·n / n_new``; with ``spacing_out`` (a number or (dz, dy, dx)) ``n_new = round(n·d / spacing_out)``
    and the returned spacing is that exact ``d·n / n_new`` (close to the request). No anti-aliasing
    filter is applied when downsampling. Returns ``(float32 array [Z, Y, X], spacing (dz, dy, dx))``.
    """
    data = np.asarray(volume, dtype=np.float32)
    spacing = _positive_triple(spacing, "spacing")
    new_shape, new_spacing = resampled_grid(data.shape, spacing, shape=shape, spacing_out=spacing_out)
    if new_shape == data.shape:
        return data, new_spacing
    resampled = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(data))[None, None],
                                                size=new_shape, mode="trilinear", align_corners=False)
    return resampled[0, 0].numpy(), new_spacing


def resampled_grid(shape_in, spacing, *, shape=None, spacing_out=None) -> tuple:
    """``(shape, spacing)`` that :func:`resample_volume` makes of a ``shape_in`` grid of ``spacing`` mm."""
    spacing = _positive_triple(spacing, "spacing")
    if shape is not None and spacing_out is not None:
        raise InputError("give either a shape or an output spacing, not both")
    if shape is not None:
        new_shape = _shape_triple(shape)
    elif spacing_out is not None:
        target = _positive_triple(spacing_out, "output spacing")
        new_shape = tuple(max(1, int(round(n * d / t))) for n, d, t in zip(shape_in, spacing, target))
    else:
        return tuple(shape_in), spacing
    return new_shape, tuple(d * n / m for n, d, m in zip(shape_in, spacing, new_shape))


def regrid_scan(scan: Scan, spacing) -> Scan:
    """``scan`` to be reconstructed on a grid of ``spacing`` mm (a number or (dz, dy, dx)) with the same extent
    and centre (the shape and exact spacing of :func:`resampled_grid`). The projections and the scan's
    geometry stay as measured, so the projector stays exact on the detector; a ground truth is averaged
    onto the new grid (area averaging where it is coarser on every axis, else trilinear)."""
    grid = scan.geometry.volume
    shape, new_spacing = resampled_grid(grid.nVoxel, grid.dVoxel, spacing_out=spacing)
    geometry = scan.geometry.with_volume(VolumeGeometry(shape, new_spacing, grid.offOrigin))
    truth, coarser = scan.ground_truth, all(new <= old for new, old in zip(shape, grid.nVoxel))
    if truth is not None and shape != grid.nVoxel:
        truth = torch.nn.functional.interpolate(torch.from_numpy(truth)[None, None], size=shape,
                                                mode="area" if coarser else "trilinear",
                                                **({} if coarser else {"align_corners": False}))[0, 0].numpy()
    meta = {**scan.meta, "regridded": {"from_nVoxel": list(grid.nVoxel), "from_dVoxel": list(grid.dVoxel),
                                       "ground_truth": "area average" if coarser else "trilinear"}}
    return Scan(scan.projections, scan.angles, geometry, truth, meta)


def simulate_scan(volume, spacing, n_views: int, *, arc: float = TWO_PI, dose_i0: Optional[float] = None,
                  electronic_sigma: float = 0.0, mu_water: float = MU_WATER, shape=None, spacing_out=None,
                  input_units: str = "hu", DSO: Optional[float] = None, DSD: Optional[float] = None, seed: int = 0,
                  device="cpu", projector: Optional[Callable] = None, source: Optional[str] = None, origin=None):
    """Simulate a circular cone-beam scan of ``volume`` and return a :class:`ctrecon.core.io.Scan`.

    volume: ``[Z, Y, X]`` numpy array or tensor in HU (``input_units="hu"``) or unit attenuation
    (``"unit"``); spacing: (dz, dy, dx) mm or one number. The volume is converted to unit
    attenuation, optionally resampled (:func:`resample_volume`: ``shape`` or ``spacing_out``), and
    becomes the scan's ground truth. The geometry is ``ConeBeamGeometry.covering`` of the (centred)
    volume with ``n_views`` equally spaced angles over ``arc`` radians (DSO/DSD: defaults of
    ``covering``); projections come from ``projector(geometry)`` (default :class:`ctrecon.operators.projector.Projector`)
    on ``device``; ``dose_i0`` (photons per pixel), ``electronic_sigma`` (counts) and ``mu_water``
    (mm⁻¹) add the seeded noise of the module docstring. ``source`` (a
    description) and ``origin`` ((x, y, z) LPS mm of voxel [0, 0, 0] of the input) go into ``meta``
    so that reconstructions can be written in the source's patient frame.
    """
    from ctrecon import __version__

    data = _volume_array(volume)
    spacing = _positive_triple(spacing, "spacing")
    unit = _to_unit(data, input_units)
    if dose_i0 is None and float(electronic_sigma) != 0.0:
        raise InputError("electronic noise needs a dose (incident photons per pixel, dose_i0 / --dose)")
    n_views = _view_count(n_views)
    arc = float(arc)
    if not (0.0 < arc <= TWO_PI + 1e-9):
        raise InputError(f"the scan arc must be in (0°, 360°], got {math.degrees(arc):.1f}°")
    new_shape, new_spacing = resampled_grid(unit.shape, spacing, shape=shape, spacing_out=spacing_out)
    try:
        geometry = ConeBeamGeometry.covering(VolumeGeometry(new_shape, new_spacing), n_views=n_views,
                                             arc=min(arc, TWO_PI), DSO=DSO, DSD=DSD)
    except ValueError as err:
        raise InputError(f"cannot build the scan geometry: {err}") from None
    # float32: the resampled volume and its tensor; the projections, a float64 noise pass and the saved copy
    check_memory(4 * 2 * math.prod(new_shape), f"a {'x'.join(map(str, new_shape))} voxel grid",
                 "use a smaller --shape or a larger --spacing")
    check_memory(4 * 4 * math.prod(geometry.projection_shape),
                 f"{n_views} views of {geometry.nDetector[0]}x{geometry.nDetector[1]} pixels", "use fewer --views")
    ground_truth, new_spacing = resample_volume(unit, spacing, shape=shape, spacing_out=spacing_out)
    device = resolve_device(device)
    if projector is None:
        from ctrecon.operators.projector import Projector as projector
    with torch.no_grad():
        volume_tensor = torch.from_numpy(np.ascontiguousarray(ground_truth)).to(device)
        projections = projector(geometry)(volume_tensor).detach().cpu().numpy().astype(np.float32)
    noise = {"model": "noiseless"}
    if dose_i0 is not None:
        projections = add_noise(projections, dose_i0, electronic_sigma, seed, mu_water)
        noise = {"model": "poisson+gaussian", "I0": float(dose_i0), "electronic_sigma": float(electronic_sigma),
                 "mu_water_per_mm": float(mu_water),
                 "formula": "p = -log(max(1, Poisson(I0*exp(-k*p)) + Normal(0, sigma^2)) / I0) / k, "
                            "k = mu_water*4095/1024"}
    meta = {"source": source or "array", "input_units": input_units, "source_shape": list(data.shape),
            "source_spacing": list(spacing), "shape": list(ground_truth.shape), "spacing": list(new_spacing),
            "resampling": None if ground_truth.shape == data.shape else
            "trilinear, torch interpolate align_corners=False (extent and centre kept)",
            "noise": noise, "seed": int(seed), "version": __version__}
    if origin is not None:
        origin = np.asarray(origin, dtype=np.float64).reshape(3)
        # Voxel [0,0,0] of the resampled grid sits half a new voxel minus half an old voxel further along.
        meta["origin"] = (origin + 0.5 * (np.array(new_spacing[::-1]) - np.array(spacing[::-1]))).tolist()
    return Scan(projections=projections, angles=geometry.angles.copy(), geometry=geometry,
                ground_truth=ground_truth.astype(np.float32), meta=meta)


# --------------------------------------------------------------------------- validation
def _volume_array(volume) -> np.ndarray:
    if torch.is_tensor(volume):
        volume = volume.detach().cpu().numpy()
    data = np.asarray(volume)
    if data.dtype.kind not in "iuf":
        raise InputError(f"the volume must hold real numbers, got dtype {data.dtype}")
    if data.ndim != 3:
        raise InputError(f"the volume must be a 3-D [Z, Y, X] array, got {data.ndim}-D shape {data.shape}")
    if data.size == 0:
        raise InputError(f"the volume is empty (shape {data.shape})")
    data = data.astype(np.float32)
    if not np.all(np.isfinite(data)):
        raise InputError("the volume contains NaN or Inf values")
    return data


def _to_unit(data: np.ndarray, input_units: str) -> np.ndarray:
    """HU (checked to look like CT) or unit attenuation (checked to look like it) → unit attenuation."""
    low, high = float(data.min()), float(data.max())
    if input_units == "hu":
        # CT holds air or at least fat (≤ -100 HU) and spans hundreds of HU; [0, 1] or [0, 255] images do not.
        if low > -100.0 or high - low < 100.0:
            raise InputError(f"the volume does not look like CT in Hounsfield units (values span [{low:.4g}, {high:.4g}]; "
                             "CT has air at -1000 HU and water at 0 HU); if it holds unit attenuation already, "
                             "use input_units='unit' (CLI: --input-units unit)")
        return hu_to_unit(data).astype(np.float32)
    if input_units == "unit":
        if low < -0.1 or high > 1.5:
            raise InputError(f"the volume does not look like unit attenuation (values span [{low:.4g}, {high:.4g}], "
                             "expected about [0, 1]); for Hounsfield units use input_units='hu'")
        return data
    raise InputError(f"input_units must be 'hu' or 'unit', got {input_units!r}")


def _positive_triple(value, name: str) -> tuple:
    try:
        items = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number or 3 numbers (dz, dy, dx) mm, got {value!r}") from None
    if items.size == 1:
        items = np.repeat(items, 3)
    if items.size != 3 or not np.all(np.isfinite(items)) or np.any(items <= 0):
        raise InputError(f"{name} must be a positive number or 3 positive numbers (dz, dy, dx) mm, got {value!r}")
    return tuple(float(v) for v in items)


def _shape_triple(shape) -> tuple:
    try:
        items = tuple(int(v) for v in shape)
        exact = all(float(v) == int(v) for v in shape)
    except (TypeError, ValueError):
        raise InputError(f"shape must be 3 positive integers (Z, Y, X), got {shape!r}") from None
    if len(items) != 3 or not exact or min(items) < 1:
        raise InputError(f"shape must be 3 positive integers (Z, Y, X), got {shape!r}")
    return items


def _view_count(n_views) -> int:
    try:
        count = int(n_views)
    except (TypeError, ValueError):
        raise InputError(f"the number of views must be a positive integer, got {n_views!r}") from None
    if count < 1 or count != n_views:
        raise InputError(f"the number of views must be a positive integer, got {n_views!r}")
    return count
