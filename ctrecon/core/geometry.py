"""Volume grids and circular cone-beam geometry (DESIGN.md §2), in TIGRE's vocabulary.

World frame: x, y, z in mm, rotation axis z. Volumes are ``[Z, Y, X]``; every per-axis tuple that
describes the volume (``nVoxel``, ``dVoxel``, ``offOrigin``) is ordered ``(z, y, x)`` like the array,
and every detector tuple (``nDetector``, ``dDetector``, ``offDetector``) is ordered ``(v, u)``.

At gantry angle θ the source sits at ``DSO·(cos θ, sin θ, 0)``, the detector centre at
``-(DSD-DSO)·(cos θ, sin θ, 0)``, with detector axes ``u = (-sin θ, cos θ, 0)`` and ``v = (0, 0, 1)``.

Scans whose source and detector leave that circle (offsets, distances or detector tilts that vary per
view: what RTK geometry files describe) are a :class:`ConeVecGeometry`, one source position and one
detector frame per view (tomosipo's ``cone_vec``). Both are a :class:`ScanGeometry`, which is all the
projector needs; FDK takes the circle only.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["VolumeGeometry", "ScanGeometry", "ConeBeamGeometry", "ConeVecGeometry", "geometry_from_dict",
           "full_scan_angles", "nominal_arc", "short_scan_arc"]

TWO_PI = 2.0 * math.pi


def _triple(name: str, value: Any, *, kind: type, positive: bool) -> tuple:
    return _tuple_of(name, value, 3, kind=kind, positive=positive)


def _pair(name: str, value: Any, *, kind: type, positive: bool) -> tuple:
    return _tuple_of(name, value, 2, kind=kind, positive=positive)


def _tuple_of(name: str, value: Any, length: int, *, kind: type, positive: bool) -> tuple:
    """Validate a per-axis tuple; a bad value is a ValueError naming the field."""
    try:
        items = tuple(np.asarray(value, dtype=np.float64).reshape(-1).tolist())
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {length} numbers, got {value!r}") from None
    if len(items) != length:
        raise ValueError(f"{name} must have {length} entries, got {len(items)}")
    if not all(math.isfinite(v) for v in items):
        raise ValueError(f"{name} must be finite, got {items}")
    if kind is int:
        if any(v != int(v) for v in items):
            raise ValueError(f"{name} must be integers, got {items}")
        items = tuple(int(v) for v in items)
    if positive and any(v <= 0 for v in items):
        raise ValueError(f"{name} must be positive, got {items}")
    return items


def _scalar(name: str, value: Any, *, positive: bool = True) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out) or (positive and out <= 0):
        raise ValueError(f"{name} must be a finite {'positive ' if positive else ''}number, got {value!r}")
    return out


def full_scan_angles(n_views: int, arc: float = TWO_PI, start: float = 0.0) -> np.ndarray:
    """``n_views`` equally spaced gantry angles (radians) over ``arc``; a full 2π scan excludes the end."""
    if int(n_views) < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    endpoint = not math.isclose(arc, TWO_PI) and n_views > 1
    return start + np.linspace(0.0, arc, int(n_views), endpoint=endpoint, dtype=np.float64)


def nominal_arc(angles) -> float:
    """The scan's arc (radians) from its gantry angles: 2π when they span a full turn (span plus one
    step), else their span; FDK weights a short scan by it."""
    angles = np.asarray(angles, dtype=np.float64).reshape(-1)
    step = float(np.median(np.abs(np.diff(angles)))) if angles.size > 1 else 0.0
    span = float(np.ptp(angles))
    return TWO_PI if span + step >= TWO_PI - 1e-6 or span == 0.0 else span


def short_scan_arc(DSD: float, nDetector: Sequence[int], dDetector: Sequence[float],
                   offDetector: Sequence[float] = (0.0, 0.0)) -> float:
    """Minimal short-scan arc: π plus the full fan angle 2γ of the detector (radians)."""
    half_width = nDetector[1] * dDetector[1] / 2.0 + abs(offDetector[1])
    return math.pi + 2.0 * math.atan(half_width / DSD)


@dataclasses.dataclass(frozen=True)
class VolumeGeometry:
    """A regular voxel grid in the world frame.

    nVoxel: (Z, Y, X) voxel counts. dVoxel: (dz, dy, dx) voxel size in mm. offOrigin: (oz, oy, ox)
    world position (mm) of the volume centre. Voxel (k, j, i) has its centre at
    ``((i-(X-1)/2)·dx + ox, (j-(Y-1)/2)·dy + oy, (k-(Z-1)/2)·dz + oz)``.
    """

    nVoxel: tuple
    dVoxel: tuple
    offOrigin: tuple = (0.0, 0.0, 0.0)

    def __post_init__(self):
        object.__setattr__(self, "nVoxel", _triple("nVoxel", self.nVoxel, kind=int, positive=True))
        object.__setattr__(self, "dVoxel", _triple("dVoxel", self.dVoxel, kind=float, positive=True))
        object.__setattr__(self, "offOrigin", _triple("offOrigin", self.offOrigin, kind=float, positive=False))

    @property
    def shape(self) -> tuple:
        """Array shape ``(Z, Y, X)``."""
        return self.nVoxel

    @property
    def sVoxel(self) -> tuple:
        """Physical extent (mm) of the grid, ``(Z·dz, Y·dy, X·dx)``."""
        return tuple(n * d for n, d in zip(self.nVoxel, self.dVoxel))

    def axis_centres(self, axis: int) -> np.ndarray:
        """World coordinates (mm) of voxel centres along array axis 0 (z), 1 (y) or 2 (x)."""
        n, d, o = self.nVoxel[axis], self.dVoxel[axis], self.offOrigin[axis]
        return (np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * d + o

    def voxel_centres(self) -> np.ndarray:
        """World coordinates ``[Z, Y, X, 3]`` (x, y, z order in the last axis) of every voxel centre."""
        z, y, x = (self.axis_centres(a) for a in range(3))
        zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
        return np.stack([xx, yy, zz], axis=-1)

    def world_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Continuous voxel indices ``(..., 3)`` in (i, j, k) = (x, y, z) order of world points ``(..., 3)``."""
        xyz = np.asarray(xyz, dtype=np.float64)
        n = np.array(self.nVoxel[::-1], dtype=np.float64)
        d = np.array(self.dVoxel[::-1])
        o = np.array(self.offOrigin[::-1])
        return (xyz - o) / d + (n - 1) / 2.0

    def bounds(self) -> np.ndarray:
        """Axis-aligned box of the grid (voxel faces) as ``[[xmin, ymin, zmin], [xmax, ymax, zmax]]`` mm."""
        half = np.array(self.sVoxel[::-1]) / 2.0
        centre = np.array(self.offOrigin[::-1])
        return np.stack([centre - half, centre + half])

    def to_dict(self) -> dict:
        return {"nVoxel": list(self.nVoxel), "dVoxel": list(self.dVoxel), "offOrigin": list(self.offOrigin)}


class ScanGeometry:
    """What every scan geometry has, and all the projector needs: a voxel grid (nVoxel, dVoxel,
    offOrigin, as :class:`VolumeGeometry`), a detector of nDetector (V, U) pixels, one gantry angle per
    view (radians) and, per view, the rays of :meth:`pixel_grid`. Subclasses are frozen dataclasses,
    validated on construction."""

    def pixel_grid(self) -> tuple:
        """Per view, in world mm: the source ``[A, 3]``, the centre of pixel (0, 0) ``[A, 3]`` and the
        steps ``[A, 3]`` to the next detector column and to the next row: pixel (r, c) is centred at
        ``first + c·column_step + r·row_step``."""
        raise NotImplementedError

    @property
    def volume(self) -> VolumeGeometry:
        return VolumeGeometry(self.nVoxel, self.dVoxel, self.offOrigin)

    @property
    def n_angles(self) -> int:
        return int(self.angles.shape[0])

    @property
    def projection_shape(self) -> tuple:
        """Shape ``(A, V, U)`` of the projections."""
        return (self.n_angles, *self.nDetector)

    @property
    def sVoxel(self) -> tuple:
        return self.volume.sVoxel

    def source_positions(self) -> np.ndarray:
        """``[A, 3]`` source positions (mm)."""
        return self.pixel_grid()[0]

    def pixel_positions(self) -> np.ndarray:
        """World positions ``[A, V, U, 3]`` (mm) of every detector pixel centre."""
        _, first, column_step, row_step = self.pixel_grid()
        rows, columns = (np.arange(n, dtype=np.float64) for n in self.nDetector)
        return (first[:, None, None, :] + columns[None, None, :, None] * column_step[:, None, None, :]
                + rows[None, :, None, None] * row_step[:, None, None, :])

    def detector_coordinates(self, points) -> tuple:
        """Where world points ``[N, 3]`` (mm) project, per view: fractional detector row and column indices
        ``[A, N]`` each (pixel centres at integers); NaN where a point is not between source and detector."""
        source, first, column_step, row_step = self.pixel_grid()
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        normal = np.cross(column_step, row_step)                                   # [A, 3]
        direction = points[None, :, :] - source[:, None, :]                        # [A, N, 3]
        with np.errstate(divide="ignore", invalid="ignore"):
            # the ray source + t·direction meets the detector plane at t (> 1: the point lies before it)
            t = (np.einsum("ac,ac->a", first - source, normal)[:, None]
                 / np.einsum("anc,ac->an", direction, normal))
        hit = source[:, None, :] + t[..., None] * direction - first[:, None, :]   # [A, N, 3] from pixel (0, 0)
        steps = np.stack([column_step, row_step], axis=1)                          # [A, 2, 3]
        gram = np.einsum("aic,ajc->aij", steps, steps)
        column, row = np.moveaxis(np.linalg.solve(gram[:, None], np.einsum("anc,aic->ani", hit, steps)[..., None])
                                  [..., 0], -1, 0)
        outside = ~(t > 1.0)
        return np.where(outside, np.nan, row), np.where(outside, np.nan, column)

    def __len__(self) -> int:
        return self.n_angles

    def replace(self, **changes) -> "ScanGeometry":
        """A copy with fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def with_volume(self, volume: VolumeGeometry) -> "ScanGeometry":
        return self.replace(nVoxel=volume.nVoxel, dVoxel=volume.dVoxel, offOrigin=volume.offOrigin)

    def __eq__(self, other) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def to_json(self, include_angles: bool = True) -> str:
        return json.dumps(self.to_dict(include_angles))

    def _set_volume(self) -> VolumeGeometry:
        """Validate nVoxel/dVoxel/offOrigin and store them normalised (frozen dataclass); returns the grid."""
        volume = VolumeGeometry(self.nVoxel, self.dVoxel, self.offOrigin)
        for name in ("nVoxel", "dVoxel", "offOrigin"):
            object.__setattr__(self, name, getattr(volume, name))
        return volume


def _angle_array(value) -> np.ndarray:
    """Gantry angles as a read-only float64 ``[A]`` array (at least one, all finite)."""
    try:
        angles = np.array(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"angles must be a sequence of numbers, got {value!r}") from None
    if angles.size == 0:
        raise ValueError("angles must hold at least one angle")
    if not np.all(np.isfinite(angles)):
        raise ValueError("angles must be finite")
    angles.setflags(write=False)
    return angles


@dataclasses.dataclass(frozen=True, eq=False)
class ConeBeamGeometry(ScanGeometry):
    """Circular cone-beam scan of a voxel grid, as TIGRE's ``geo`` plus the gantry angles.

    DSO, DSD: source–isocentre and source–detector distances (mm). nDetector (V, U) pixels of size
    dDetector (dv, du) mm, offset offDetector (ov, ou) mm. nVoxel/dVoxel/offOrigin as in
    :class:`VolumeGeometry`. angles: gantry angles (radians). arc: nominal angular range of the
    scan (radians; 2π full scan, ``short_scan_arc`` for a short scan); FDK uses it for Parker weights.
    """

    DSO: float
    DSD: float
    nDetector: tuple
    dDetector: tuple
    nVoxel: tuple
    dVoxel: tuple
    angles: np.ndarray
    offOrigin: tuple = (0.0, 0.0, 0.0)
    offDetector: tuple = (0.0, 0.0)
    arc: float = TWO_PI

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("DSO", _scalar("DSO", self.DSO))
        set_("DSD", _scalar("DSD", self.DSD))
        if self.DSD <= self.DSO:
            raise ValueError(f"DSD must exceed DSO (detector behind the isocentre), got DSD={self.DSD}, DSO={self.DSO}")
        set_("nDetector", _pair("nDetector", self.nDetector, kind=int, positive=True))
        set_("dDetector", _pair("dDetector", self.dDetector, kind=float, positive=True))
        set_("offDetector", _pair("offDetector", self.offDetector, kind=float, positive=False))
        volume = self._set_volume()
        set_("arc", _scalar("arc", self.arc))
        set_("angles", _angle_array(self.angles))
        radius = float(np.linalg.norm(np.abs(np.array(volume.offOrigin[1:])) + np.array(volume.sVoxel[1:]) / 2.0))
        if radius >= self.DSO:
            raise ValueError(f"DSO ({self.DSO} mm) must exceed the volume's radius about the axis ({radius:.1f} mm): "
                             "the source would be inside the volume")

    # ----------------------------------------------------------------- constructors
    @classmethod
    def circular(cls, *, DSO: float, DSD: float, nDetector, dDetector, nVoxel, dVoxel, n_views: int,
                 arc: float = TWO_PI, start_angle: float = 0.0, offOrigin=(0.0, 0.0, 0.0),
                 offDetector=(0.0, 0.0)) -> "ConeBeamGeometry":
        """A scan of ``n_views`` equally spaced angles over ``arc`` radians."""
        return cls(DSO=DSO, DSD=DSD, nDetector=nDetector, dDetector=dDetector, nVoxel=nVoxel, dVoxel=dVoxel,
                   angles=full_scan_angles(n_views, arc, start_angle), offOrigin=offOrigin,
                   offDetector=offDetector, arc=arc)

    @classmethod
    def covering(cls, volume: VolumeGeometry, *, n_views: int, DSO: float | None = None,
                 DSD: float | None = None, nDetector=None, margin: float = 1.05, arc: float = TWO_PI,
                 start_angle: float = 0.0) -> "ConeBeamGeometry":
        """A scan whose detector just covers ``volume`` from every angle.

        Defaults: DSO = 2× the volume's diagonal half-width (at least 4×), DSD = 1.5·DSO (a
        typical clinical magnification), detector pixels sized so that the detector's field of
        view spans the volume with ``margin``. ``nDetector`` (V, U) defaults to (Z, max(Y, X)).
        """
        sz, sy, sx = volume.sVoxel
        oz, oy, ox = volume.offOrigin
        r_xy = math.hypot(sx / 2 + abs(ox), sy / 2 + abs(oy))  # cylinder radius enclosing the volume
        z_half = sz / 2 + abs(oz)
        if DSO is None:
            DSO = max(4.0 * r_xy, 2.0 * math.hypot(r_xy, z_half))
        if DSD is None:
            DSD = 1.5 * DSO
        if DSO <= r_xy:
            raise ValueError(f"DSO ({DSO} mm) must exceed the volume's radius about the axis ({r_xy:.1f} mm)")
        if nDetector is None:
            nDetector = (volume.nVoxel[0], max(volume.nVoxel[1], volume.nVoxel[2]))
        nDetector = _pair("nDetector", nDetector, kind=int, positive=True)
        # Half-width on the detector: the tangent to the enclosing cylinder, magnified.
        u_half = DSD * r_xy / math.sqrt(DSO ** 2 - r_xy ** 2)
        # Half-height: the cylinder's top edge nearest the source is the most magnified.
        v_half = DSD * z_half / (DSO - r_xy)
        dDetector = (2 * v_half * margin / nDetector[0], 2 * u_half * margin / nDetector[1])
        return cls.circular(DSO=DSO, DSD=DSD, nDetector=nDetector, dDetector=dDetector, nVoxel=volume.nVoxel,
                            dVoxel=volume.dVoxel, offOrigin=volume.offOrigin, n_views=n_views, arc=arc,
                            start_angle=start_angle)

    # ----------------------------------------------------------------- derived
    @property
    def sDetector(self) -> tuple:
        return (self.nDetector[0] * self.dDetector[0], self.nDetector[1] * self.dDetector[1])

    @property
    def fan_angle(self) -> float:
        """Full fan angle 2γ (radians) subtended by the detector width at the source."""
        return 2.0 * math.atan((self.sDetector[1] / 2.0 + abs(self.offDetector[1])) / self.DSD)

    def _source_positions(self) -> np.ndarray:
        c, s = np.cos(self.angles), np.sin(self.angles)
        return self.DSO * np.stack([c, s, np.zeros_like(c)], axis=-1)

    def detector_frames(self) -> tuple:
        """Per-angle detector centre ``[A, 3]`` and unit axes u ``[A, 3]``, v ``[A, 3]``."""
        c, s = np.cos(self.angles), np.sin(self.angles)
        zero = np.zeros_like(c)
        centre = -(self.DSD - self.DSO) * np.stack([c, s, zero], axis=-1)
        u = np.stack([-s, c, zero], axis=-1)
        v = np.stack([zero, zero, np.ones_like(c)], axis=-1)
        return centre, u, v

    def pixel_offsets(self) -> tuple:
        """Pixel-centre offsets (mm) along v ``[V]`` and u ``[U]`` from the detector centre."""
        (nv, nu), (dv, du), (ov, ou) = self.nDetector, self.dDetector, self.offDetector
        v = (np.arange(nv) - (nv - 1) / 2.0) * dv + ov
        u = (np.arange(nu) - (nu - 1) / 2.0) * du + ou
        return v, u

    def pixel_grid(self) -> tuple:
        centre, u_axis, v_axis = self.detector_frames()
        v_offsets, u_offsets = self.pixel_offsets()
        first = centre + u_offsets[0] * u_axis + v_offsets[0] * v_axis
        return (self._source_positions(), first, u_axis * self.dDetector[1], v_axis * self.dDetector[0])

    def to_cone_vec(self) -> "ConeVecGeometry":
        """The same scan as per-view vectors (the same rays, pixel for pixel)."""
        centre, u_axis, v_axis = self.detector_frames()
        (ov, ou), (dv, du) = self.offDetector, self.dDetector
        return ConeVecGeometry(nDetector=self.nDetector, nVoxel=self.nVoxel, dVoxel=self.dVoxel,
                               offOrigin=self.offOrigin, sources=self._source_positions(),
                               detectors=centre + ou * u_axis + ov * v_axis, u=u_axis * du, v=v_axis * dv,
                               angles=self.angles)

    def is_short_scan(self) -> bool:
        return self.arc < TWO_PI - 1e-9

    # ----------------------------------------------------------------- subsets and copies
    def __getitem__(self, index) -> "ConeBeamGeometry":
        """View subset: ``geom[::2]``, ``geom[10:20]``, ``geom[[0, 5, 9]]``; the arc is kept."""
        angles = self.angles[index]
        if np.ndim(angles) == 0:
            angles = np.array([angles])
        return dataclasses.replace(self, angles=np.array(angles))

    def __repr__(self) -> str:
        return (f"ConeBeamGeometry(DSO={self.DSO}, DSD={self.DSD}, nDetector={self.nDetector}, "
                f"dDetector={self.dDetector}, nVoxel={self.nVoxel}, dVoxel={self.dVoxel}, "
                f"offOrigin={self.offOrigin}, offDetector={self.offDetector}, "
                f"angles=<{self.n_angles} in [{self.angles.min():.4f}, {self.angles.max():.4f}] rad>, "
                f"arc={self.arc:.4f})")

    # ----------------------------------------------------------------- serialisation
    def to_dict(self, include_angles: bool = True) -> dict:
        out = {"DSO": self.DSO, "DSD": self.DSD, "nDetector": list(self.nDetector),
               "dDetector": list(self.dDetector), "nVoxel": list(self.nVoxel), "dVoxel": list(self.dVoxel),
               "offOrigin": list(self.offOrigin), "offDetector": list(self.offDetector), "arc": self.arc}
        if include_angles:
            out["angles"] = self.angles.tolist()
        return out

    @classmethod
    def from_dict(cls, data: Mapping, angles=None) -> "ConeBeamGeometry":
        """Inverse of :meth:`to_dict`; ``angles`` overrides (or supplies) the gantry angles."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown geometry field(s): {', '.join(sorted(unknown))}")
        fields = dict(data)
        if angles is not None:
            fields["angles"] = angles
        missing = {"DSO", "DSD", "nDetector", "dDetector", "nVoxel", "dVoxel", "angles"} - set(fields)
        if missing:
            raise ValueError(f"missing geometry field(s): {', '.join(sorted(missing))}")
        return cls(**fields)

    @classmethod
    def from_json(cls, text: str, angles=None) -> "ConeBeamGeometry":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"geometry is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError("geometry JSON must be an object")
        return cls.from_dict(data, angles=angles)

    # ----------------------------------------------------------------- TIGRE adapters
    def to_tigre(self, geo=None):
        """Fill a TIGRE-style ``geo`` (any object with attributes; a fresh namespace by default).

        Returns ``(geo, angles)`` as TIGRE takes them. TIGRE orders nVoxel/dVoxel/offOrigin (z, y, x)
        and nDetector/dDetector/offDetector (v, u) like this class. The given ``geo`` is copied,
        never mutated.
        """
        import copy
        import types

        out = types.SimpleNamespace() if geo is None else copy.copy(geo)
        out.DSO = np.float64(self.DSO)
        out.DSD = np.float64(self.DSD)
        out.nDetector = np.array(self.nDetector, dtype=np.int64)
        out.dDetector = np.array(self.dDetector, dtype=np.float64)
        out.sDetector = out.nDetector * out.dDetector
        out.nVoxel = np.array(self.nVoxel, dtype=np.int64)
        out.dVoxel = np.array(self.dVoxel, dtype=np.float64)
        out.sVoxel = out.nVoxel * out.dVoxel
        out.offOrigin = np.array(self.offOrigin, dtype=np.float64)
        out.offDetector = np.array(self.offDetector, dtype=np.float64)
        out.accuracy = getattr(out, "accuracy", 0.5)
        out.mode = "cone"
        out.COR = np.float64(0.0)                      # a template's would shift every ray in TIGRE
        out.rotDetector = np.zeros(3, dtype=np.float64)
        return out, self.angles.copy()

    @classmethod
    def from_tigre(cls, geo, angles, arc: float | None = None) -> "ConeBeamGeometry":
        """Build from a TIGRE-style ``geo`` (read only) and its angles (radians).

        TIGRE's ``sVoxel``/``sDetector`` must agree with n·d when present. ``arc`` defaults to 2π
        when the angles span more than π + fan angle, else to their span. ``angles`` may be TIGRE's
        ``[A, 3]`` Euler triples with the second and third zero. What this circle cannot describe is a
        ValueError: another ``mode`` than "cone", a non-zero ``COR`` or ``rotDetector``, per-view offsets.
        (tests/test_tigre_conventions.py checks all of it against a reading of TIGRE's own code.)
        """
        def get(name, required=True):
            if not hasattr(geo, name):
                if required:
                    raise ValueError(f"TIGRE geo lacks field {name}")
                return None
            return getattr(geo, name)

        mode = get("mode", required=False)
        if mode is not None and mode != "cone":
            raise ValueError(f"TIGRE mode {mode!r} is not a cone beam")
        for name in ("COR", "rotDetector"):
            value = get(name, required=False)
            if value is not None and np.any(np.asarray(value, dtype=np.float64) != 0.0):
                raise ValueError(f"a non-zero TIGRE {name} is not supported")
        fields = {name: get(name) for name in ("DSO", "DSD", "nDetector", "dDetector", "nVoxel", "dVoxel")}
        for name, default in (("offOrigin", (0.0, 0.0, 0.0)), ("offDetector", (0.0, 0.0))):
            value = get(name, required=False)
            value = default if value is None else np.asarray(value, dtype=np.float64).reshape(-1)
            if name == "offOrigin" and np.size(value) != 3:
                raise ValueError("offOrigin must be one (z, y, x) offset; per-angle offsets are not supported")
            fields[name] = value
        for s_name, n_name, d_name in (("sVoxel", "nVoxel", "dVoxel"), ("sDetector", "nDetector", "dDetector")):
            s = get(s_name, required=False)
            if s is not None and not np.allclose(np.asarray(s, float),
                                                 np.asarray(fields[n_name], float) * np.asarray(fields[d_name], float),
                                                 rtol=1e-6):
                raise ValueError(f"{s_name} disagrees with {n_name}·{d_name}")
        angles = np.asarray(angles, dtype=np.float64)
        if angles.ndim == 2 and angles.shape[1] == 3:
            if np.any(angles[:, 1:] != 0.0):
                raise ValueError("TIGRE Euler angles with non-zero second or third angles (a tilted orbit) "
                                 "are not supported")
            angles = angles[:, 0]
        angles = angles.reshape(-1)
        return cls(angles=angles, arc=nominal_arc(angles) if arc is None else arc, **fields)


_VECTOR_FIELDS = ("sources", "detectors", "u", "v")


@dataclasses.dataclass(frozen=True, eq=False)
class ConeVecGeometry(ScanGeometry):
    """A cone-beam scan given view by view (tomosipo's ``cone_vec``): any orbit, offsets, distances and
    detector tilts that vary per view (RTK geometry files, measured trajectories).

    sources ``[A, 3]``: source positions (mm). detectors ``[A, 3]``: centre of the detector's pixel grid
    (mm). u ``[A, 3]``: the step from one detector column to the next (a vector whose length is the
    column pitch, mm); v ``[A, 3]``: the step to the next row. nDetector (V, U). nVoxel/dVoxel/offOrigin
    as in :class:`VolumeGeometry`. angles ``[A]``: nominal gantry angles (radians), for view orders and
    reports; by default the azimuth of each source. Pixel (r, c) is centred at
    ``detectors + (c - (U-1)/2)·u + (r - (V-1)/2)·v``. FDK does not apply (it needs the circle).
    """

    nDetector: tuple
    nVoxel: tuple
    dVoxel: tuple
    sources: np.ndarray
    detectors: np.ndarray
    u: np.ndarray
    v: np.ndarray
    angles: np.ndarray | None = None
    offOrigin: tuple = (0.0, 0.0, 0.0)

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("nDetector", _pair("nDetector", self.nDetector, kind=int, positive=True))
        volume = self._set_volume()
        vectors = {}
        for name in _VECTOR_FIELDS:
            try:
                value = np.array(getattr(self, name), dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be an [A, 3] array of numbers") from None
            if value.ndim != 2 or value.shape[1] != 3 or value.shape[0] == 0:
                raise ValueError(f"{name} must be an [A, 3] array with A >= 1, got shape {value.shape}")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"{name} must be finite")
            vectors[name] = value
        if len({value.shape[0] for value in vectors.values()}) != 1:
            raise ValueError("sources, detectors, u and v must have one row per view each, got "
                             + ", ".join(f"{name} {value.shape[0]}" for name, value in vectors.items()))
        sources, detectors, u, v = (vectors[name] for name in _VECTOR_FIELDS)
        normal = np.cross(u, v)
        area = np.linalg.norm(normal, axis=1)
        degenerate = area <= 1e-9 * np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1)
        if degenerate.any():
            raise ValueError(f"view {int(np.argmax(degenerate))}: u and v must be non-zero and not parallel")
        normal /= area[:, None]
        source_side = np.einsum("ac,ac->a", sources - detectors, normal)
        centre_side = np.einsum("ac,ac->a", np.array(volume.offOrigin[::-1]) - detectors, normal)
        wrong = ~((source_side * centre_side > 0) & (np.abs(centre_side) < np.abs(source_side)))
        if wrong.any():
            raise ValueError(f"view {int(np.argmax(wrong))}: the volume centre must lie between the source and "
                             "the detector plane")
        lower, upper = volume.bounds()
        inside = np.all((sources > lower) & (sources < upper), axis=1)
        if inside.any():
            raise ValueError(f"view {int(np.argmax(inside))}: the source is inside the volume")
        for name, value in vectors.items():
            value.setflags(write=False)
            set_(name, value)
        if self.angles is None:
            set_("angles", _angle_array(np.unwrap(np.arctan2(sources[:, 1], sources[:, 0]))))
        else:
            set_("angles", _angle_array(self.angles))
            if self.angles.shape[0] != sources.shape[0]:
                raise ValueError(f"angles must have one entry per view ({sources.shape[0]}), got {self.angles.shape[0]}")

    def pixel_grid(self) -> tuple:
        (nv, nu) = self.nDetector
        first = self.detectors - (nu - 1) / 2.0 * self.u - (nv - 1) / 2.0 * self.v
        return self.sources.copy(), first, self.u.copy(), self.v.copy()

    def __getitem__(self, index) -> "ConeVecGeometry":
        """View subset: ``geom[::2]``, ``geom[10:20]``, ``geom[[0, 5, 9]]``."""
        rows = np.arange(self.n_angles)[index]
        rows = np.atleast_1d(rows)
        return self.replace(**{name: getattr(self, name)[rows] for name in _VECTOR_FIELDS},
                            angles=self.angles[rows])

    def __repr__(self) -> str:
        return (f"ConeVecGeometry(nDetector={self.nDetector}, nVoxel={self.nVoxel}, dVoxel={self.dVoxel}, "
                f"offOrigin={self.offOrigin}, <{self.n_angles} views>)")

    def to_dict(self, include_angles: bool = True) -> dict:
        out = {"kind": "cone_vec", "nDetector": list(self.nDetector), "nVoxel": list(self.nVoxel),
               "dVoxel": list(self.dVoxel), "offOrigin": list(self.offOrigin)}
        out.update({name: getattr(self, name).tolist() for name in _VECTOR_FIELDS})
        if include_angles:
            out["angles"] = self.angles.tolist()
        return out

    @classmethod
    def from_dict(cls, data: Mapping, angles=None) -> "ConeVecGeometry":
        """Inverse of :meth:`to_dict`; ``angles`` overrides (or supplies) the nominal angles."""
        fields = {key: value for key, value in data.items() if key != "kind"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(fields) - known
        if unknown:
            raise ValueError(f"unknown cone_vec geometry field(s): {', '.join(sorted(unknown))}")
        if angles is not None:
            fields["angles"] = angles
        missing = {"nDetector", "nVoxel", "dVoxel", *_VECTOR_FIELDS} - set(fields)
        if missing:
            raise ValueError(f"missing cone_vec geometry field(s): {', '.join(sorted(missing))}")
        return cls(**fields)


def geometry_from_dict(data: Mapping, angles=None) -> ScanGeometry:
    """A :class:`ConeVecGeometry` when ``data["kind"] == "cone_vec"``, else a :class:`ConeBeamGeometry`
    (the circle: files written before cone_vec existed have no "kind")."""
    kind = data.get("kind", "circular")
    if kind == "cone_vec":
        return ConeVecGeometry.from_dict(data, angles=angles)
    if kind != "circular":
        raise ValueError(f"unknown geometry kind {kind!r} (circular or cone_vec)")
    return ConeBeamGeometry.from_dict({key: value for key, value in data.items() if key != "kind"}, angles=angles)
