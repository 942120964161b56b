"""Scan geometry from files: RTK geometry XML, TIGRE-style JSON and ctrecon's own JSON, and the default
reconstruction grid of a measured scan (the field of view).

    detector = DetectorGrid(nDetector=(V, U), dDetector=(dv, du), origin=None)   # from the projection files
    geometry = read_geometry_file("geometry.xml", detector).geometry  # ConeBeamGeometry or ConeVecGeometry
    geometry = geometry.with_volume(field_of_view_grid(geometry))     # or a grid of the user's

**RTK** (``rtk::ThreeDCircularProjectionGeometry``, the XML that ``rtksimulatedgeometry`` and RTK's
readers write, versions 2 and 3; IEC 61217 frame). Per view: SourceToIsocenterDistance (SID),
SourceToDetectorDistance (SDD), GantryAngle, OutOfPlaneAngle, InPlaneAngle (degrees), SourceOffsetX/Y,
ProjectionOffsetX/Y (mm); elements beside the ``Projection`` ones hold values shared by every view.
RTK's model: with ``R = Ry(gantry)·Rx(out of plane)·Rz(in plane)`` (rotated frame to fixed frame),
the source is at ``R·(SourceOffsetX, SourceOffsetY, SID)`` and the point of projection coordinates
(x, y) at ``R·(x + ProjectionOffsetX, y + ProjectionOffsetY, SID - SDD)``; projection coordinates are
the physical coordinates of the projection images (their origin and spacing; pixel column c, row r at
``origin + (c·du, r·dv)``). RTK rotates about its y axis, ctrecon about z: ctrecon's (x, y, z) is
RTK's (Z, X, Y), so RTK's gantry angle is ctrecon's angle, its projection x is ctrecon's u and y is v,
and an RTK volume array ``[Z][Y][X]`` is ctrecon's ``[z][y][x]`` array transposed by (1, 2, 0).
A file that RTK's circle matches (no tilts, no source offsets, distances and projection offsets equal
in every view) becomes a :class:`ConeBeamGeometry`, any other a :class:`ConeVecGeometry`. Each view's
``Matrix`` (when present) must agree with its parameters.

**JSON**: ctrecon's own (``ScanGeometry.to_dict``; ``"kind": "cone_vec"`` for per-view vectors) or a
TIGRE ``geo`` written as JSON (DSO, DSD, nDetector, dDetector, offDetector — per view ``[A, 2]`` too —
offOrigin, and TIGRE's sDetector, sVoxel, nVoxel, dVoxel, accuracy, mode, COR, rotDetector), angles in
radians under ``"angles"``. Unknown fields, and TIGRE features not supported here (non-zero COR or
rotDetector, per-view offOrigin, other modes than "cone"), are refused.
"""
from __future__ import annotations

import dataclasses
import json
import math
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Optional

import numpy as np

from ctrecon.core.errors import InputError
from ctrecon.core.geometry import (ConeBeamGeometry, ConeVecGeometry, ScanGeometry, VolumeGeometry,
                                   geometry_from_dict, nominal_arc)

__all__ = ["DetectorGrid", "RtkParameters", "read_rtk_geometry", "rtk_scan_geometry", "rtk_parameters",
           "write_rtk_geometry", "rtk_volume_image", "volume_from_rtk", "rtk_stack_image", "GeometryFile", "read_geometry_file", "field_of_view_grid", "PLACEHOLDER_VOLUME"]

#: The grid a geometry carries before its reconstruction grid is chosen (validation needs one).
PLACEHOLDER_VOLUME = VolumeGeometry((1, 1, 1), (1.0, 1.0, 1.0))

# ctrecon (x, y, z) = RTK (Z, X, Y): the rows of this matrix pick RTK's coordinates.
_RTK_TO_CTRECON = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


@dataclasses.dataclass(frozen=True)
class DetectorGrid:
    """The detector as the projection files give it: nDetector (V, U) pixels of dDetector (dv, du) mm
    (None: the files carry no spacing); origin (v0, u0) mm: the projection coordinates of pixel [0, 0]
    (RTK's projection image origin), or None for a detector centred on its coordinate origin."""

    nDetector: tuple
    dDetector: Optional[tuple] = None
    origin: Optional[tuple] = None

    def pitch(self, where: str) -> tuple:
        """dDetector, or an InputError saying where a pixel size must come from."""
        if self.dDetector is None:
            raise InputError(f"{where} gives no detector pixel size and the projection files carry none: "
                             "pass --pixel-size DV,DU (mm)")
        return tuple(float(v) for v in self.dDetector)

    def centre(self) -> tuple:
        """Projection coordinates (v, u) mm of the centre of the pixel grid."""
        if self.origin is None:
            return 0.0, 0.0
        (nv, nu), (dv, du), (v0, u0) = self.nDetector, self.pitch("the geometry"), self.origin
        return v0 + (nv - 1) / 2.0 * dv, u0 + (nu - 1) / 2.0 * du


# ----------------------------------------------------------------------------- RTK
_RTK_FIELDS = {"SourceToIsocenterDistance": "sid", "SourceToDetectorDistance": "sdd", "GantryAngle": "gantry",
               "OutOfPlaneAngle": "out_of_plane", "InPlaneAngle": "in_plane", "SourceOffsetX": "source_x",
               "SourceOffsetY": "source_y", "ProjectionOffsetX": "projection_x", "ProjectionOffsetY": "projection_y"}
_RTK_DEFAULTS = {"out_of_plane": 0.0, "in_plane": 0.0, "source_x": 0.0, "source_y": 0.0, "projection_x": 0.0,
                 "projection_y": 0.0}
# Known, accepted, not used: collimation only narrows what RTK's own filters backproject.
_RTK_IGNORED = {"CollimationUInf", "CollimationUSup", "CollimationVInf", "CollimationVSup"}


@dataclasses.dataclass(frozen=True)
class RtkParameters:
    """RTK's nine parameters per view, float64 ``[A]`` each: distances and offsets in mm, angles in
    degrees (as in the XML)."""

    sid: np.ndarray
    sdd: np.ndarray
    gantry: np.ndarray
    out_of_plane: np.ndarray
    in_plane: np.ndarray
    source_x: np.ndarray
    source_y: np.ndarray
    projection_x: np.ndarray
    projection_y: np.ndarray

    @property
    def n_views(self) -> int:
        return int(self.sid.shape[0])

    def rotations(self) -> np.ndarray:
        """``[A, 3, 3]`` rotated-to-fixed matrices ``Ry(gantry)·Rx(out of plane)·Rz(in plane)`` (RTK frame)."""
        g, o, i = (np.radians(a) for a in (self.gantry, self.out_of_plane, self.in_plane))
        zero, one = np.zeros_like(g), np.ones_like(g)
        ry = np.stack([np.stack([np.cos(g), zero, np.sin(g)], -1), np.stack([zero, one, zero], -1),
                       np.stack([-np.sin(g), zero, np.cos(g)], -1)], -2)
        rx = np.stack([np.stack([one, zero, zero], -1), np.stack([zero, np.cos(o), -np.sin(o)], -1),
                       np.stack([zero, np.sin(o), np.cos(o)], -1)], -2)
        rz = np.stack([np.stack([np.cos(i), -np.sin(i), zero], -1), np.stack([np.sin(i), np.cos(i), zero], -1),
                       np.stack([zero, zero, one], -1)], -2)
        return ry @ rx @ rz

    def matrices(self) -> np.ndarray:
        """``[A, 3, 4]`` projection matrices as RTK computes them: fixed-frame point (homogeneous) to
        ``w·(x, y, 1)``, (x, y) its projection coordinates."""
        to_rotated = np.swapaxes(self.rotations(), -1, -2)
        source = np.stack([self.source_x, self.source_y, self.sid], -1)
        zero, one = np.zeros_like(self.sid), np.ones_like(self.sid)
        intrinsic = np.stack([np.stack([-self.sdd, zero, self.source_x - self.projection_x], -1),
                              np.stack([zero, -self.sdd, self.source_y - self.projection_y], -1),
                              np.stack([zero, zero, one], -1)], -2)
        extrinsic = np.concatenate([to_rotated, -source[..., None]], axis=-1)
        return intrinsic @ extrinsic


def _number(text: Optional[str], tag: str, where: str) -> float:
    try:
        value = float((text or "").strip())
    except ValueError:
        raise InputError(f"{where}: <{tag}> is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise InputError(f"{where}: <{tag}> must be finite, got {text!r}")
    return value


def _rtk_values(element, where: str, is_view: bool) -> tuple:
    """The parameters set by ``element``'s children (name → value) and, for a view (a <Projection>), its
    Matrix ``[3, 4]`` or None; the root holds the shared values and the views."""
    values, matrix = {}, None
    for child in element:
        tag = child.tag
        if tag in _RTK_FIELDS:
            values[_RTK_FIELDS[tag]] = _number(child.text, tag, where)
        elif tag == "RadiusCylindricalDetector":
            if _number(child.text, tag, where) != 0.0:
                raise InputError(f"{where}: a cylindrical detector (RadiusCylindricalDetector ≠ 0) is not supported; "
                                 "flat detectors only")
        elif tag == "Matrix" and is_view:
            try:
                matrix = np.array([float(v) for v in (child.text or "").split()], dtype=np.float64).reshape(3, 4)
            except ValueError:
                raise InputError(f"{where}: <Matrix> must hold 12 numbers") from None
        elif tag not in _RTK_IGNORED and not (tag == "Projection" and not is_view):
            raise InputError(f"{where}: unknown RTK geometry field <{tag}>")
    return values, matrix


def read_rtk_geometry(path) -> RtkParameters:
    """The per-view parameters of an RTK ``ThreeDCircularProjectionGeometry`` XML file (InputError on
    anything it cannot take: a parallel or cylindrical-detector geometry, unknown fields, a Matrix that
    disagrees with its view's parameters)."""
    source = Path(path)
    try:
        root = ElementTree.parse(source).getroot()
    except FileNotFoundError:
        raise InputError(f"geometry file not found: {source}") from None
    except (OSError, ElementTree.ParseError) as err:
        raise InputError(f"{source} is not readable XML: {err}") from None
    if root.tag != "RTKThreeDCircularGeometry":
        raise InputError(f"{source} is not an RTK ThreeDCircularProjectionGeometry file (root <{root.tag}>)")
    if root.get("version") not in ("2", "3"):
        raise InputError(f"{source}: RTK geometry version {root.get('version')!r} is not supported (2 or 3)")
    shared, _ = _rtk_values(root, str(source), is_view=False)
    views = [child for child in root if child.tag == "Projection"]
    if not views:
        raise InputError(f"{source} holds no <Projection>")
    rows = {name: [] for name in _RTK_FIELDS.values()}
    for index, element in enumerate(views):
        where = f"{source}, projection {index}"
        own, matrix = _rtk_values(element, where, is_view=True)
        values = {**_RTK_DEFAULTS, **shared, **own}
        missing = [tag for tag, name in _RTK_FIELDS.items() if name not in values]
        if missing:
            raise InputError(f"{where}: missing {', '.join(missing)}")
        if values["sdd"] == 0.0:
            raise InputError(f"{where}: a parallel-beam geometry (SourceToDetectorDistance 0) is not supported")
        if not 0.0 < values["sid"] < values["sdd"]:
            raise InputError(f"{where}: needs 0 < SourceToIsocenterDistance < SourceToDetectorDistance, got "
                             f"{values['sid']:g} and {values['sdd']:g}")
        for name, value in values.items():
            rows[name].append(value)
        if matrix is not None:
            single = RtkParameters(**{name: np.array([value]) for name, value in values.items()})
            _check_matrix(single.matrices()[0], matrix, where)
    return RtkParameters(**{name: np.array(values, dtype=np.float64) for name, values in rows.items()})


def _check_matrix(expected: np.ndarray, given: np.ndarray, where: str) -> None:
    """InputError unless the file's projection matrix maps points as its parameters say (up to scale)."""
    scale = float(np.abs(expected).max())
    if not np.allclose(given, expected, rtol=1e-6, atol=1e-6 * scale):
        raise InputError(f"{where}: its <Matrix> disagrees with its angles, distances and offsets")


def rtk_scan_geometry(parameters: RtkParameters, detector: DetectorGrid,
                      volume: VolumeGeometry = PLACEHOLDER_VOLUME) -> ScanGeometry:
    """ctrecon's geometry of an RTK scan whose projection images have ``detector``'s pixels and origin."""
    (nv, nu), (dv, du) = detector.nDetector, detector.pitch("an RTK geometry file")
    centre_v, centre_u = detector.centre()
    p = parameters
    angles = np.unwrap(np.radians(p.gantry))

    def constant(values):
        return bool(np.all(values == values[0]))

    tilted = np.any(np.mod(p.out_of_plane, 360.0) != 0.0) or np.any(np.mod(p.in_plane, 360.0) != 0.0)
    if (not tilted and not np.any(p.source_x) and not np.any(p.source_y)
            and all(constant(values) for values in (p.sid, p.sdd, p.projection_x, p.projection_y))):
        return ConeBeamGeometry(DSO=p.sid[0], DSD=p.sdd[0], nDetector=(nv, nu), dDetector=(dv, du),
                                nVoxel=volume.nVoxel, dVoxel=volume.dVoxel, offOrigin=volume.offOrigin,
                                angles=angles, arc=nominal_arc(angles),
                                offDetector=(centre_v + p.projection_y[0], centre_u + p.projection_x[0]))
    to_ctrecon = _RTK_TO_CTRECON @ p.rotations()                       # [A, 3, 3]: rotated frame -> ctrecon world
    zero = np.zeros_like(p.sid)
    sources = np.einsum("aij,aj->ai", to_ctrecon, np.stack([p.source_x, p.source_y, p.sid], -1))
    detectors = np.einsum("aij,aj->ai", to_ctrecon, np.stack(
        [centre_u + p.projection_x, centre_v + p.projection_y, p.sid - p.sdd], -1))
    u = np.einsum("aij,aj->ai", to_ctrecon, np.stack([zero + du, zero, zero], -1))
    v = np.einsum("aij,aj->ai", to_ctrecon, np.stack([zero, zero + dv, zero], -1))
    return ConeVecGeometry(nDetector=(nv, nu), nVoxel=volume.nVoxel, dVoxel=volume.dVoxel,
                           offOrigin=volume.offOrigin, sources=sources, detectors=detectors, u=u, v=v,
                           angles=angles)


def rtk_parameters(geometry: ConeBeamGeometry) -> RtkParameters:
    """RTK's parameters of a circular scan, for a detector centred on its projection coordinates
    (origin ``-(n-1)/2·d``): the detector offset becomes ProjectionOffsetX/Y."""
    if not isinstance(geometry, ConeBeamGeometry):
        raise InputError("only a circular ConeBeamGeometry can be written as RTK parameters here")
    n = geometry.n_angles
    full = lambda value: np.full(n, float(value))  # noqa: E731
    (ov, ou) = geometry.offDetector
    return RtkParameters(sid=full(geometry.DSO), sdd=full(geometry.DSD), gantry=np.degrees(geometry.angles),
                         out_of_plane=full(0.0), in_plane=full(0.0), source_x=full(0.0), source_y=full(0.0),
                         projection_x=full(ou), projection_y=full(ov))


def write_rtk_geometry(path, parameters: RtkParameters) -> None:
    """Write an RTK geometry XML (version 3, every parameter and the Matrix per view) that RTK reads."""
    from ctrecon.core.io import atomic_output

    root = ElementTree.Element("RTKThreeDCircularGeometry", version="3")
    matrices = parameters.matrices()
    for index in range(parameters.n_views):
        view = ElementTree.SubElement(root, "Projection")
        for tag, name in _RTK_FIELDS.items():
            ElementTree.SubElement(view, tag).text = repr(float(getattr(parameters, name)[index]))
        ElementTree.SubElement(view, "Matrix").text = "\n" + "\n".join(
            " ".join(repr(float(v)) for v in row) for row in matrices[index]) + "\n"
    ElementTree.indent(root)
    text = '<?xml version="1.0"?>\n<!DOCTYPE RTKGEOMETRY>\n' + ElementTree.tostring(root, encoding="unicode") + "\n"
    with atomic_output(path) as temp:
        Path(temp).write_text(text, encoding="utf-8")


def rtk_volume_image(volume: np.ndarray, grid: VolumeGeometry):
    """A ctrecon volume ``[Z, Y, X]`` on ``grid`` as an itk image in RTK's frame (needs itk): its array is
    ours transposed to ``[x][z][y]``, spacing and origin reordered to RTK's (X, Y, Z) = ctrecon (y, z, x)."""
    import itk

    image = itk.GetImageFromArray(np.ascontiguousarray(np.asarray(volume, dtype=np.float32).transpose(2, 0, 1)))
    dz, dy, dx = grid.dVoxel
    image.SetSpacing([dy, dz, dx])
    first = grid.voxel_centres()[0, 0, 0]          # world (x, y, z) of voxel [0, 0, 0]
    image.SetOrigin([first[1], first[2], first[0]])
    return image


def volume_from_rtk(array: np.ndarray) -> np.ndarray:
    """An RTK volume's array ``[x][z][y]`` (itk.GetArrayFromImage) as ctrecon's ``[Z, Y, X]``."""
    return np.ascontiguousarray(np.asarray(array).transpose(1, 2, 0))


def rtk_stack_image(projections: np.ndarray, detector: DetectorGrid):
    """Projections ``[A, V, U]`` as RTK's stack image (needs itk): x = column, y = row, z = view, with
    ``detector``'s spacing and origin (centred when it has none)."""
    import itk

    (nv, nu), (dv, du) = detector.nDetector, detector.pitch("an RTK projection stack")
    v0, u0 = detector.origin if detector.origin is not None else (-(nv - 1) / 2 * dv, -(nu - 1) / 2 * du)
    image = itk.GetImageFromArray(np.ascontiguousarray(projections, dtype=np.float32))
    image.SetSpacing([du, dv, 1.0])
    image.SetOrigin([u0, v0, 0.0])
    return image


# ----------------------------------------------------------------------------- JSON (ctrecon, TIGRE)
_TIGRE_ONLY = {"sDetector", "sVoxel", "accuracy", "mode", "COR", "rotDetector", "filter"}


def _json_geometry(data: dict, detector: DetectorGrid, angles, where: str) -> "GeometryFile":
    """A geometry from ctrecon's or TIGRE's JSON; ``detector`` fills nDetector/dDetector where missing."""
    data = dict(data)
    has_grid = "nVoxel" in data and "dVoxel" in data
    listed = data.pop("angles", None)
    if listed is not None and angles is not None:
        raise InputError(f"{where} lists its angles and --angles gives others: keep one")
    angles = listed if listed is not None else angles
    if angles is None:
        raise InputError(f"{where} has no angles: add \"angles\" (radians) or pass --angles FILE")
    data.setdefault("nDetector", list(detector.nDetector))
    if np.ravel(data["nDetector"]).tolist() != list(detector.nDetector):
        raise InputError(f"{where} has nDetector {np.ravel(data['nDetector']).tolist()}, the projections have "
                         f"{list(detector.nDetector)} (rows, columns)")
    if "dDetector" not in data:
        data["dDetector"] = list(detector.pitch(where))
    elif detector.dDetector is not None and not np.allclose(np.ravel(data["dDetector"]), detector.dDetector,
                                                            rtol=1e-6):
        raise InputError(f"{where} has dDetector {np.ravel(data['dDetector']).tolist()} mm, the projections "
                         f"{list(detector.dDetector)} mm")
    for name, value in PLACEHOLDER_VOLUME.to_dict().items():
        data.setdefault(name, value)
    if data.get("kind") == "cone_vec" or not (set(data) & _TIGRE_ONLY or np.ndim(data.get("offDetector", 0)) == 2):
        try:
            return GeometryFile(geometry_from_dict(data, angles=angles), "ctrecon JSON", has_grid)
        except (TypeError, ValueError) as err:
            raise InputError(f"{where}: {err}") from None
    return GeometryFile(_tigre_geometry(data, angles, where), "TIGRE JSON", has_grid)


def _tigre_geometry(data: dict, angles, where: str) -> ScanGeometry:
    """TIGRE's ``geo`` as JSON: the circle of ``from_tigre``, per-view ``offDetector [A, 2]`` as cone_vec."""
    known = {f.name for f in dataclasses.fields(ConeBeamGeometry)} | _TIGRE_ONLY
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"{where}: unknown geometry field(s): {', '.join(unknown)}")
    offsets = np.asarray(data.get("offDetector", (0.0, 0.0)), dtype=np.float64)
    per_view = offsets.ndim == 2
    try:
        circle = ConeBeamGeometry.from_tigre(_Namespace({**data, "offDetector": (0.0, 0.0)} if per_view else data),
                                            angles)
    except (TypeError, ValueError) as err:
        raise InputError(f"{where}: {err}") from None
    if not per_view:
        return circle
    if offsets.shape != (circle.n_angles, 2) or not np.all(np.isfinite(offsets)):
        raise InputError(f"{where}: per-view offDetector must be [{circle.n_angles}, 2] finite numbers, "
                         f"got shape {list(offsets.shape)}")
    vectors = circle.to_cone_vec()
    shifted = (vectors.detectors + offsets[:, :1] * vectors.v / circle.dDetector[0]
               + offsets[:, 1:] * vectors.u / circle.dDetector[1])
    return vectors.replace(detectors=shifted)


class _Namespace:
    """A read-only attribute view of a dict (TIGRE's ``geo`` is an object with attributes)."""

    def __init__(self, data: dict):
        self.__dict__.update(data)


# ----------------------------------------------------------------------------- dispatch
@dataclasses.dataclass(frozen=True)
class GeometryFile:
    """What a geometry file held: the geometry, its format ("RTK XML", "TIGRE JSON", "ctrecon JSON") and
    whether it gave a reconstruction grid (else the geometry carries :data:`PLACEHOLDER_VOLUME`)."""

    geometry: ScanGeometry
    format: str
    has_grid: bool


def read_geometry_file(path, detector: DetectorGrid, angles=None) -> GeometryFile:
    """The scan geometry in ``path`` (.xml: RTK; .json: ctrecon or TIGRE) for projections on ``detector``.
    angles: radians ``[A]`` where the file has none (RTK files always have theirs)."""
    source = Path(path)
    if not source.is_file():
        raise InputError(f"geometry file not found: {source}")
    suffix = source.suffix.lower()
    if suffix == ".xml":
        if angles is not None:
            raise InputError(f"{source} is an RTK geometry with its own gantry angles: drop --angles")
        return GeometryFile(rtk_scan_geometry(read_rtk_geometry(source), detector), "RTK XML", False)
    if suffix == ".json":
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{source} is not readable JSON: {err}") from None
        if not isinstance(data, dict):
            raise InputError(f"{source} must hold a JSON object")
        return _json_geometry(data, detector, angles, str(source))
    raise InputError(f"unsupported geometry file {source}: use an RTK geometry .xml or a .json (ctrecon or TIGRE)")


def field_of_view_grid(geometry: ScanGeometry, voxel_size=None, shape=None) -> VolumeGeometry:
    """The default reconstruction grid of a measured scan, centred on the isocentre (world origin).

    Voxel size (dz, dy, dx) mm, default: the detector pitch demagnified to the isocentre. Shape
    (Z, Y, X), default: the cylinder about z that every view sees whole (its radius from the central
    plane, its height at that radius), covered by the grid; for a detector offset far to one side
    (half-fan) that cylinder is small: give the shape.
    """
    source, first, column_step, row_step = geometry.pixel_grid()
    normal = np.cross(column_step, row_step)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    to_detector = np.abs(np.einsum("ac,ac->a", first - source, normal))
    to_isocentre = np.abs(np.einsum("ac,ac->a", -source, normal))
    magnification = float(np.median(to_detector / to_isocentre))
    if voxel_size is None:
        pitch_u = float(np.median(np.linalg.norm(column_step, axis=1))) / magnification
        pitch_v = float(np.median(np.linalg.norm(row_step, axis=1))) / magnification
        voxel_size = (pitch_v, pitch_u, pitch_u)
    voxel_size = tuple(float(v) for v in np.broadcast_to(np.asarray(voxel_size, dtype=np.float64), (3,)))
    if shape is not None:
        return VolumeGeometry(shape, voxel_size)
    (nv, nu) = geometry.nDetector
    reach = float(np.min(np.linalg.norm(source, axis=1)))
    phi = np.linspace(0.0, 2.0 * math.pi, 256, endpoint=False)

    def seen(radius: float, half_height: float) -> bool:
        ring = np.stack([radius * np.cos(phi), radius * np.sin(phi), np.zeros_like(phi)], -1)
        points = np.concatenate([ring + [0.0, 0.0, half_height], ring - [0.0, 0.0, half_height]])
        rows, columns = geometry.detector_coordinates(points)
        return bool(np.all((rows >= -0.5) & (rows <= nv - 0.5) & (columns >= -0.5) & (columns <= nu - 0.5)))

    def largest(test, high: float) -> float:
        low = 0.0
        for _ in range(50):
            middle = (low + high) / 2.0
            low, high = (middle, high) if test(middle) else (low, middle)
        return low

    if not seen(0.0, 0.0):
        raise InputError("the detector does not see the isocentre in every view: give the grid "
                         "(--volume-shape Z,Y,X and --voxel-size)")
    radius = largest(lambda r: seen(r, 0.0), 0.999 * reach)
    half_height = largest(lambda h: seen(radius, h), 0.999 * reach)
    dz, dy, dx = voxel_size
    return VolumeGeometry((max(1, int(2 * half_height / dz)), max(1, int(2 * radius / dy)), max(1, int(2 * radius / dx))),
                          voxel_size)
