"""Measured projections in: a projection stack, its flat/dark fields and its geometry file -> a scan.

    scan, summary = import_scan("projections/", "geometry.xml", flat="flat.tif", dark="dark.tif",
                                pixel_size=(0.4, 0.4))
    save_scan("scan.npz", scan)

Readers: :mod:`ctrecon.core.projection_files` (TIFF/PNG folders, MetaImage, NIfTI, .npy, raw) and
:mod:`ctrecon.core.geometry_files` (RTK XML, TIGRE or ctrecon JSON). Scanner data are physical:
``-log`` transmissions are line integrals of μ (mm⁻¹ × mm); ctrecon reconstructs unit attenuation, and
with μ = κ·u, ``κ = mu_water·4095/1024`` (the model ``simulate`` writes its intensities with), the scan's
line integrals are the physical ones divided by κ. The scan has no ground truth.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ctrecon import __version__
from ctrecon.core.errors import InputError
from ctrecon.core.geometry_files import DetectorGrid, field_of_view_grid, read_geometry_file
from ctrecon.core.io import Scan
from ctrecon.core.projection_files import line_integrals, read_projection_image, read_projection_stack
from ctrecon.core.geometry import ConeBeamGeometry
from ctrecon.core.units import MU_WATER, attenuation_scale

__all__ = ["import_scan", "read_angles_file", "LINE_INTEGRAL_UNITS"]

#: What stored line integrals (no flat field or i0) measure: "physical" ∫μ dl with μ in mm⁻¹ (scanners,
#: RTK, TIGRE), or "unit": ctrecon's unit attenuation × mm already.
LINE_INTEGRAL_UNITS = ("physical", "unit")


def read_angles_file(path, unit: str = "deg") -> np.ndarray:
    """Gantry angles (radians ``[A]``) from a text file: numbers separated by spaces, commas or new lines,
    ``#`` starts a comment; ``unit`` "deg" or "rad"."""
    source = Path(path)
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"angles file not found: {source}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read the angles file {source}: {err}") from None
    words = " ".join(line.split("#", 1)[0] for line in lines).replace(",", " ").split()
    try:
        angles = np.array([float(word) for word in words], dtype=np.float64)
    except ValueError as err:
        raise InputError(f"{source} must hold numbers only: {err}") from None
    if angles.size == 0 or not np.all(np.isfinite(angles)):
        raise InputError(f"{source} must hold at least one angle, all finite")
    if unit not in ("deg", "rad"):
        raise InputError(f"angle unit must be deg or rad, got {unit!r}")
    return np.radians(angles) if unit == "deg" else angles


def _raw_frames_options(path, raw: dict, detector: tuple) -> dict:
    """Raw-file options for a flat/dark field on the same detector: as many frames as the file holds."""
    if not raw.get("raw_dtype") or Path(path).suffix.lower() not in (".raw", ".bin"):
        return {key: value for key, value in raw.items() if key == "byte_order"}
    frame = int(np.dtype(raw["raw_dtype"]).itemsize) * detector[0] * detector[1]
    try:
        size = Path(path).stat().st_size - int(raw.get("raw_offset", 0))
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}") from None
    return {**raw, "raw_shape": (max(1, size // frame), *detector)}


def import_scan(projections, geometry, *, flat=None, dark=None, i0: Optional[float] = None,
                min_transmission: float = 1e-6, angles=None, angles_unit: str = "deg", pixel_size=None,
                volume_shape=None, voxel_size=None, mu_water: float = MU_WATER, line_integral_units: str = "physical",
                raw_dtype=None, raw_shape=None, raw_offset: int = 0, byte_order: str = "little") -> tuple:
    """Read measured projections and their geometry into a :class:`Scan` (InputError on anything wrong).

    projections: a projection stack path; geometry: a geometry file (.xml RTK, .json TIGRE/ctrecon).
    flat/dark: image or stack files (dark needs flat or i0); i0: the unattenuated intensity instead of a
    flat. Without either the stack holds line integrals, in ``line_integral_units``. angles: a text file
    (``angles_unit``) where the geometry has none. pixel_size (dv, du) mm where the files carry none.
    volume_shape (Z, Y, X) / voxel_size (mm, one or three): the reconstruction grid (default: the
    geometry file's, else :func:`field_of_view_grid`). mu_water (mm⁻¹): the physical scale. raw_*: a
    headerless stack. Returns (scan, summary dict of what was read and done).
    """
    if line_integral_units not in LINE_INTEGRAL_UNITS:
        raise InputError(f"line integral units must be one of {', '.join(LINE_INTEGRAL_UNITS)}, got {line_integral_units!r}")
    if not (mu_water > 0 and np.isfinite(mu_water)):
        raise InputError(f"mu_water must be a positive number (mm^-1), got {mu_water!r}")
    intensities = flat is not None or i0 is not None
    if dark is not None and not intensities:
        raise InputError("a dark field needs a flat field or i0: without them the stack is taken as line integrals")
    raw = {"raw_dtype": raw_dtype, "raw_shape": raw_shape, "raw_offset": raw_offset, "byte_order": byte_order}
    stack = read_projection_stack(projections, **raw)
    n_views, *detector_shape = stack.data.shape
    pitch = stack.pixel_size
    if pixel_size is not None:
        pixel_size = tuple(float(v) for v in pixel_size)
        if pitch is not None and not np.allclose(pitch, pixel_size, rtol=1e-6):
            raise InputError(f"{projections} gives pixels of {pitch[0]:g} x {pitch[1]:g} mm; --pixel-size says "
                             f"{pixel_size[0]:g} x {pixel_size[1]:g}: drop it")
        pitch = pixel_size
    detector = DetectorGrid(tuple(detector_shape), pitch, stack.origin)

    kappa = attenuation_scale(mu_water)         # mm⁻¹ per unit attenuation
    clipped = 0
    if intensities:
        fields = {}
        for name, path in (("flat", flat), ("dark", dark)):
            if path is not None:
                fields[name] = read_projection_image(path, **_raw_frames_options(path, raw, tuple(detector_shape))).data
        physical, clipped = line_integrals(stack.data, flat=fields.get("flat"), dark=fields.get("dark"), i0=i0,
                                           min_transmission=min_transmission)
        values = physical / np.float32(kappa)
        conversion = (f"-log((I - dark) / ({'flat' if flat is not None else 'i0'} - dark)) / k, "
                      f"k = mu_water*4095/1024 = {kappa:.6g} per mm")
    else:
        values = stack.data / np.float32(kappa) if line_integral_units == "physical" else stack.data
        conversion = ("physical line integrals / k, k = mu_water*4095/1024" if line_integral_units == "physical"
                      else "line integrals of unit attenuation, as stored")

    listed = None if angles is None else read_angles_file(angles, angles_unit)
    read = read_geometry_file(geometry, detector, listed)
    scan_geometry = read.geometry
    if scan_geometry.n_angles != n_views:
        raise InputError(f"{geometry} describes {scan_geometry.n_angles} views but {projections} holds {n_views} "
                         "projections")
    if volume_shape is not None or voxel_size is not None or not read.has_grid:
        grid = field_of_view_grid(scan_geometry, voxel_size=voxel_size, shape=volume_shape)
        scan_geometry = scan_geometry.with_volume(grid)
    summary = {"projections": str(projections), "projection_files": stack.description,
               "geometry": str(geometry), "geometry_format": read.format,
               "geometry_kind": "circular" if isinstance(scan_geometry, ConeBeamGeometry) else "cone_vec",
               "flat": None if flat is None else str(flat), "dark": None if dark is None else str(dark),
               "i0": i0, "conversion": conversion, "clipped_transmissions": clipped,
               "min_transmission": min_transmission if intensities else None, "mu_water_per_mm": mu_water,
               "n_views": n_views, "nDetector": list(scan_geometry.nDetector),
               "grid": {"nVoxel": list(scan_geometry.nVoxel), "dVoxel": list(scan_geometry.dVoxel),
                        "from": "options" if volume_shape is not None or voxel_size is not None
                        else "geometry file" if read.has_grid else "field of view"}}
    meta = {"source": "import", **summary, "version": __version__}
    return Scan(values.astype(np.float32), scan_geometry.angles.copy(), scan_geometry, None, meta), summary
