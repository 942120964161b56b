"""Analytic phantoms with exact cone-beam line integrals: ellipsoids (3-D Shepp–Logan) and Gaussians.

These are the independent oracles of the projector and of FDK: the projections are computed in
closed form along each source→pixel ray, never by sampling a voxel grid.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from ctrecon.core.geometry import ScanGeometry, VolumeGeometry

__all__ = ["Ellipsoid", "GaussianBlob", "shepp_logan_3d", "ellipsoid_volume", "ellipsoid_projections",
           "random_gaussian_blobs", "gaussian_volume", "gaussian_projections", "rotation_z"]


def rotation_z(phi: float) -> np.ndarray:
    """3×3 rotation by ``phi`` radians about the z axis."""
    c, s = math.cos(phi), math.sin(phi)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclasses.dataclass(frozen=True)
class Ellipsoid:
    """Constant-valued ellipsoid: centre (x, y, z) mm, semi-axes (a, b, c) mm along the columns of
    ``rotation`` (3×3, body→world), additive value (unit attenuation)."""

    centre: tuple
    semi_axes: tuple
    value: float
    rotation: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(3))


@dataclasses.dataclass(frozen=True)
class GaussianBlob:
    """``value · exp(-½ (x-μ)ᵀ Σ⁻¹ (x-μ))`` with centre μ (x, y, z) mm and covariance Σ (3×3, mm²)."""

    centre: tuple
    covariance: np.ndarray
    value: float


# Modified (Toft) Shepp–Logan contrasts on the Kak–Slaney 3-D ellipsoids, normalised to [-1, 1]³:
# (value, a, b, c, x0, y0, z0, phi_degrees about z).
_SHEPP_LOGAN_3D = (
    (1.0, 0.6900, 0.920, 0.810, 0.00, 0.0000, 0.00, 0.0),
    (-0.8, 0.6624, 0.874, 0.780, 0.00, -0.0184, 0.00, 0.0),
    (-0.2, 0.1100, 0.310, 0.220, 0.22, 0.0000, 0.00, -18.0),
    (-0.2, 0.1600, 0.410, 0.280, -0.22, 0.0000, 0.00, 18.0),
    (0.1, 0.2100, 0.250, 0.410, 0.00, 0.3500, -0.15, 0.0),
    (0.1, 0.0460, 0.046, 0.050, 0.00, 0.1000, 0.25, 0.0),
    (0.1, 0.0460, 0.046, 0.050, 0.00, -0.1000, 0.25, 0.0),
    (0.1, 0.0460, 0.023, 0.050, -0.08, -0.6050, 0.00, 0.0),
    (0.1, 0.0230, 0.023, 0.020, 0.00, -0.6060, 0.00, 0.0),
    (0.1, 0.0230, 0.046, 0.020, 0.06, -0.6050, 0.00, 0.0),
)


def shepp_logan_3d(volume: VolumeGeometry, fill: float = 0.95, scale: float = 0.25) -> list:
    """The 3-D Shepp–Logan phantom fitted into ``volume`` (``fill`` of its half-extent per axis).

    ``scale`` multiplies the contrasts (0.25: the outer shell ≈ water in unit attenuation).
    """
    half = np.array(volume.sVoxel[::-1]) / 2.0 * fill  # (x, y, z) half-extent, mm
    origin = np.array(volume.offOrigin[::-1])
    out = []
    for value, a, b, c, x0, y0, z0, phi in _SHEPP_LOGAN_3D:
        out.append(Ellipsoid(centre=tuple(origin + half * np.array([x0, y0, z0])),
                             semi_axes=tuple(half * np.array([a, b, c])), value=scale * value,
                             rotation=rotation_z(math.radians(phi))))
    return out


def _rays(geometry: ScanGeometry):
    """Ray origins ``[A, 1, 1, 3]`` and unit directions ``[A, V, U, 3]`` plus their lengths to the pixels."""
    src = geometry.source_positions()[:, None, None, :]
    delta = geometry.pixel_positions() - src
    length = np.linalg.norm(delta, axis=-1, keepdims=True)
    return src, delta / length


def ellipsoid_projections(ellipsoids: Sequence[Ellipsoid], geometry: ScanGeometry) -> np.ndarray:
    """Exact line integrals ``[A, V, U]`` (value × mm) of the ellipsoids along every source→pixel ray."""
    src, direction = _rays(geometry)
    out = np.zeros(geometry.projection_shape, dtype=np.float64)
    for e in ellipsoids:
        inv_axes = 1.0 / np.asarray(e.semi_axes, dtype=np.float64)
        rot = np.asarray(e.rotation, dtype=np.float64)
        q = ((src - np.asarray(e.centre)) @ rot) * inv_axes  # body frame, unit sphere
        d = (direction @ rot) * inv_axes
        a = np.sum(d * d, axis=-1)
        b = np.sum(q * d, axis=-1)
        c = np.sum(q * q, axis=-1) - 1.0
        disc = np.clip(b * b - a * c, 0.0, None)
        out += e.value * 2.0 * np.sqrt(disc) / a
    return out


def ellipsoid_volume(ellipsoids: Sequence[Ellipsoid], volume: VolumeGeometry, supersample: int = 3) -> np.ndarray:
    """Voxelised ellipsoids ``[Z, Y, X]`` (float32): each voxel is the mean over ``supersample³`` sub-points."""
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    dz, dy, dx = volume.dVoxel
    centres = volume.voxel_centres()
    out = np.zeros(volume.shape, dtype=np.float64)
    for oz in offsets:
        for oy in offsets:
            for ox in offsets:
                pts = centres + np.array([ox * dx, oy * dy, oz * dz])
                for e in ellipsoids:
                    body = ((pts - np.asarray(e.centre)) @ np.asarray(e.rotation)) / np.asarray(e.semi_axes)
                    out += e.value * (np.sum(body * body, axis=-1) <= 1.0)
    return (out / supersample ** 3).astype(np.float32)


def random_gaussian_blobs(volume: VolumeGeometry, n: int = 12, seed: int = 0, sigma_range=(0.04, 0.12),
                          value_range=(0.2, 1.0)) -> list:
    """``n`` random anisotropic, rotated Gaussians well inside ``volume`` (σ as fractions of its extent)."""
    rng = np.random.default_rng(seed)
    extent = np.array(volume.sVoxel[::-1])
    origin = np.array(volume.offOrigin[::-1])
    blobs = []
    for _ in range(n):
        sigma = rng.uniform(*sigma_range, size=3) * extent.min()
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        centre = origin + rng.uniform(-0.25, 0.25, size=3) * extent
        blobs.append(GaussianBlob(centre=tuple(centre), covariance=q @ np.diag(sigma ** 2) @ q.T,
                                  value=float(rng.uniform(*value_range))))
    return blobs


def gaussian_volume(blobs: Sequence[GaussianBlob], volume: VolumeGeometry) -> np.ndarray:
    """Gaussians sampled at voxel centres ``[Z, Y, X]`` (float32)."""
    pts = volume.voxel_centres()
    out = np.zeros(volume.shape, dtype=np.float64)
    for g in blobs:
        d = pts - np.asarray(g.centre)
        out += g.value * np.exp(-0.5 * np.einsum("...i,ij,...j->...", d, np.linalg.inv(g.covariance), d))
    return out.astype(np.float32)


def gaussian_projections(blobs: Sequence[GaussianBlob], geometry: ScanGeometry) -> np.ndarray:
    """Exact line integrals ``[A, V, U]`` of the Gaussians along every ray (integrated over the whole line)."""
    src, direction = _rays(geometry)
    out = np.zeros(geometry.projection_shape, dtype=np.float64)
    for g in blobs:
        precision = np.linalg.inv(g.covariance)
        p = src - np.asarray(g.centre)
        pd = direction @ precision
        a = np.sum(pd * direction, axis=-1)
        b = np.sum(pd * p, axis=-1)
        c = np.einsum("...i,ij,...j->...", p, precision, p)
        out += g.value * np.sqrt(2.0 * math.pi / a) * np.exp(-0.5 * (c - b * b / a))
    return out
