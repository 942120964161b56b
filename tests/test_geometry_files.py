"""Per-view geometry (ConeVecGeometry) and geometry files (RTK XML, TIGRE/ctrecon JSON), checked against
RTK itself where itk-rtk is installed: its geometry object, its Joseph forward projector and its FDK."""
import json
import math

import numpy as np
import pytest
import torch

from ctrecon.core.errors import InputError
from ctrecon.core.geometry import (ConeBeamGeometry, ConeVecGeometry, VolumeGeometry, geometry_from_dict,
                                   short_scan_arc)
from ctrecon.core.geometry_files import (DetectorGrid, RtkParameters, field_of_view_grid, read_geometry_file,
                                         read_rtk_geometry, rtk_parameters, rtk_scan_geometry, rtk_stack_image,
                                         rtk_volume_image, volume_from_rtk, write_rtk_geometry)
from ctrecon.core.phantoms import ellipsoid_volume, shepp_logan_3d
from ctrecon.operators.fdk import fdk
from ctrecon.operators.projector import Projector

GRID = VolumeGeometry((20, 24, 28), (1.2, 1.0, 0.9))
DETECTOR = DetectorGrid((40, 56), (1.1, 1.0), origin=(-19.5 * 1.1 + 0.7, -27.5 - 1.3))


def random_parameters(n_views=9, seed=1, tilted=True) -> RtkParameters:
    """RTK parameters of every kind varying per view (distances, offsets, tilts)."""
    rng = np.random.default_rng(seed)
    spread = (lambda scale: rng.uniform(-scale, scale, n_views)) if tilted else (lambda scale: np.zeros(n_views))
    return RtkParameters(sid=300 + spread(10), sdd=450 + spread(10), gantry=np.arange(n_views) * 40.0,
                         out_of_plane=spread(5), in_plane=spread(5), source_x=spread(2), source_y=spread(2),
                         projection_x=spread(3), projection_y=spread(2))


def phantom(grid=GRID) -> np.ndarray:
    return ellipsoid_volume(shepp_logan_3d(grid, fill=0.8), grid).astype(np.float32)


# ----------------------------------------------------------------------------- ConeVecGeometry
def test_circle_as_cone_vec_is_the_same_scan():
    circle = ConeBeamGeometry.covering(GRID, n_views=7).replace(offDetector=(0.3, -0.8))
    vectors = circle.to_cone_vec()
    np.testing.assert_allclose(vectors.pixel_positions(), circle.pixel_positions(), atol=1e-9)
    np.testing.assert_array_equal(vectors.angles, circle.angles)
    volume = torch.from_numpy(phantom())
    torch.testing.assert_close(Projector(vectors)(volume), Projector(circle)(volume), rtol=1e-5, atol=1e-5)
    assert geometry_from_dict(json.loads(vectors.to_json())) == vectors
    assert len(vectors[1:4]) == 3 and vectors[[0, 6]].angles.tolist() == [circle.angles[0], circle.angles[6]]


def test_detector_coordinates_put_points_on_their_rays():
    geometry = rtk_scan_geometry(random_parameters(), DETECTOR, GRID)
    points = GRID.voxel_centres().reshape(-1, 3)[::97]
    rows, columns = geometry.detector_coordinates(points)
    source, first, column_step, row_step = geometry.pixel_grid()
    hit = first[:, None] + columns[..., None] * column_step[:, None] + rows[..., None] * row_step[:, None]
    to_point, to_hit = points[None] - source[:, None], hit - source[:, None]
    sine = np.linalg.norm(np.cross(to_point, to_hit), axis=-1) / np.linalg.norm(to_point, axis=-1) \
        / np.linalg.norm(to_hit, axis=-1)
    assert sine.max() < 1e-12


@pytest.mark.parametrize("change, message", [
    (dict(u=[[0, 1, 0]] * 2, v=[[0, 2, 0]] * 2), "not parallel"),
    (dict(sources=[[-80, 0, 0], [100, 0, 0]]), "between the source and"),
    (dict(sources=[[1, 0, 0], [100, 0, 0]]), "between the source and|inside the volume"),
    (dict(detectors=[[-50, 0, 0]]), "one row per view"),
    (dict(sources=[[np.nan, 0, 0], [100, 0, 0]]), "finite"),
])
def test_cone_vec_refuses_impossible_views(change, message):
    fields = dict(nDetector=(4, 4), nVoxel=(4, 4, 4), dVoxel=(1, 1, 1), sources=[[100, 0, 0]] * 2,
                  detectors=[[-50, 0, 0]] * 2, u=[[0, 1, 0]] * 2, v=[[0, 0, 1]] * 2)
    with pytest.raises(ValueError, match=message):
        ConeVecGeometry(**{**fields, **change})


def test_fdk_refuses_cone_vec_with_a_way_out():
    geometry = rtk_scan_geometry(random_parameters(), DETECTOR, GRID)
    with pytest.raises(InputError, match="circular scan.*--method sart"):
        fdk(np.zeros(geometry.projection_shape, np.float32), geometry)


# ----------------------------------------------------------------------------- RTK files (no itk needed)
def test_rtk_file_round_trip_and_the_circle(tmp_path):
    circle = ConeBeamGeometry.circular(DSO=300, DSD=450, nDetector=(40, 56), dDetector=(1.1, 1.0), nVoxel=GRID.nVoxel,
                                       dVoxel=GRID.dVoxel, n_views=12, offDetector=(1.5, -2.0))
    write_rtk_geometry(tmp_path / "circle.xml", rtk_parameters(circle))
    back = rtk_scan_geometry(read_rtk_geometry(tmp_path / "circle.xml"), DetectorGrid((40, 56), (1.1, 1.0)), GRID)
    assert isinstance(back, ConeBeamGeometry) and back.offDetector == pytest.approx(circle.offDetector)
    np.testing.assert_allclose(back.pixel_positions(), circle.pixel_positions(), atol=1e-9)
    parameters = random_parameters()
    write_rtk_geometry(tmp_path / "views.xml", parameters)
    read = read_rtk_geometry(tmp_path / "views.xml")
    for name in ("sid", "gantry", "in_plane", "projection_y"):
        np.testing.assert_array_equal(getattr(read, name), getattr(parameters, name))
    assert isinstance(rtk_scan_geometry(read, DETECTOR, GRID), ConeVecGeometry)


def test_rtk_short_scan_keeps_its_arc_across_the_wrap(tmp_path):
    """Gantry angles 300° ... 160° (RTK wraps them into [0, 360)) are one 220° arc."""
    degrees = np.mod(300 + np.linspace(0, 220, 45), 360)
    p = random_parameters(45, tilted=False)
    write_rtk_geometry(tmp_path / "short.xml", RtkParameters(**{**vars(p), "gantry": degrees}))
    geometry = rtk_scan_geometry(read_rtk_geometry(tmp_path / "short.xml"), DETECTOR, GRID)
    assert geometry.is_short_scan() and math.degrees(geometry.arc) == pytest.approx(220, abs=1e-6)
    assert np.all(np.diff(geometry.angles) > 0)


RTK_HEAD = '<?xml version="1.0"?>\n<RTKThreeDCircularGeometry version="3">\n'


@pytest.mark.parametrize("body, message", [
    ("<SourceToIsocenterDistance>1000</SourceToIsocenterDistance><Projection><GantryAngle>0</GantryAngle>"
     "</Projection>", "missing SourceToDetectorDistance"),
    ("<SourceToIsocenterDistance>1000</SourceToIsocenterDistance><SourceToDetectorDistance>1500"
     "</SourceToDetectorDistance><Projection><GantryAngle>0</GantryAngle><Tilt>3</Tilt></Projection>",
     "unknown RTK geometry field <Tilt>"),
    ("<SourceToIsocenterDistance>1000</SourceToIsocenterDistance><SourceToDetectorDistance>0"
     "</SourceToDetectorDistance><Projection><GantryAngle>0</GantryAngle></Projection>", "parallel-beam"),
    ("<SourceToIsocenterDistance>1000</SourceToIsocenterDistance><SourceToDetectorDistance>1500"
     "</SourceToDetectorDistance><RadiusCylindricalDetector>900</RadiusCylindricalDetector>"
     "<Projection><GantryAngle>0</GantryAngle></Projection>", "cylindrical detector"),
    ("<SourceToIsocenterDistance>1000</SourceToIsocenterDistance><SourceToDetectorDistance>1500"
     "</SourceToDetectorDistance><Projection><GantryAngle>ten</GantryAngle></Projection>", "not a number"),
    ("<SourceToIsocenterDistance>1000</SourceToIsocenterDistance><SourceToDetectorDistance>1500"
     "</SourceToDetectorDistance><Projection><GantryAngle>90</GantryAngle><Matrix>-1500 0 0 0 0 -1500 0 0 0 0 1 "
     "-1000</Matrix></Projection>", "Matrix> disagrees"),
    ("", "holds no <Projection>"),
])
def test_rtk_bad_files_are_one_clear_line(tmp_path, body, message):
    path = tmp_path / "geometry.xml"
    path.write_text(RTK_HEAD + body + "</RTKThreeDCircularGeometry>\n")
    with pytest.raises(InputError, match=message):
        read_rtk_geometry(path)
    (tmp_path / "broken.xml").write_text(RTK_HEAD + "<Projection>")
    with pytest.raises(InputError, match="not readable XML"):
        read_rtk_geometry(tmp_path / "broken.xml")


# ----------------------------------------------------------------------------- JSON files
def test_json_geometries_ctrecon_and_tigre(tmp_path):
    circle = ConeBeamGeometry.covering(GRID, n_views=10).replace(offDetector=(0.5, -1.0))
    detector = DetectorGrid(circle.nDetector, circle.dDetector)
    (tmp_path / "own.json").write_text(circle.to_json())
    read = read_geometry_file(tmp_path / "own.json", detector)
    assert read.geometry == circle and read.has_grid and read.format == "ctrecon JSON"
    geo, angles = circle.to_tigre()
    tigre = {key: (value.tolist() if isinstance(value, np.ndarray) else value) for key, value in vars(geo).items()}
    tigre["DSO"], tigre["DSD"] = float(tigre["DSO"]), float(tigre["DSD"])
    (tmp_path / "tigre.json").write_text(json.dumps({**tigre, "angles": angles.tolist()}))
    read = read_geometry_file(tmp_path / "tigre.json", detector)
    assert read.format == "TIGRE JSON"
    np.testing.assert_allclose(read.geometry.pixel_positions(), circle.pixel_positions(), atol=1e-9)
    per_view = np.stack([np.linspace(-1, 1, 10), np.linspace(2, -2, 10)], -1)          # (ov, ou) per view
    (tmp_path / "shifts.json").write_text(json.dumps({**tigre, "offDetector": per_view.tolist(),
                                                      "angles": angles.tolist()}))
    shifted = read_geometry_file(tmp_path / "shifts.json", detector).geometry
    assert isinstance(shifted, ConeVecGeometry)
    for view in (0, 7):
        expected = circle.replace(offDetector=tuple(per_view[view])).pixel_positions()[view]
        np.testing.assert_allclose(shifted.pixel_positions()[view], expected, atol=1e-9)


@pytest.mark.parametrize("change, message", [
    ({"COR": 1.0}, "COR"), ({"rotDetector": [0.1, 0, 0]}, "rotDetector"), ({"mode": "parallel"}, "not a cone"),
    ({"focus": 1}, "unknown geometry field"), ({"nDetector": [3, 3]}, "the projections have"),
    ({"dDetector": [9.0, 9.0]}, "dDetector"),
])
def test_json_geometry_refusals(tmp_path, change, message):
    circle = ConeBeamGeometry.covering(GRID, n_views=4)
    geo, angles = circle.to_tigre()
    data = {key: (value.tolist() if isinstance(value, np.ndarray) else value) for key, value in vars(geo).items()}
    data = {**data, "DSO": float(geo.DSO), "DSD": float(geo.DSD), "angles": angles.tolist(), **change}
    (tmp_path / "g.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=message):
        read_geometry_file(tmp_path / "g.json", DetectorGrid(circle.nDetector, circle.dDetector))


def test_field_of_view_grid_is_seen_by_every_view():
    circle = ConeBeamGeometry.covering(VolumeGeometry((24, 64, 64), (1.0, 1.0, 1.0)), n_views=90)
    grid = field_of_view_grid(circle)
    assert grid.dVoxel[1] == pytest.approx(circle.dDetector[1] * circle.DSO / circle.DSD)
    # the inscribed cylinder: radius where the detector's edge ray passes, height at the near side
    half_fan = math.atan(circle.sDetector[1] / 2 / circle.DSD)
    radius = circle.DSO * math.sin(half_fan)
    assert grid.sVoxel[1] / 2 == pytest.approx(radius, abs=grid.dVoxel[1])
    height = circle.sDetector[0] / 2 * (circle.DSO - radius) / circle.DSD
    assert grid.sVoxel[0] / 2 == pytest.approx(height, abs=grid.dVoxel[0])
    assert field_of_view_grid(circle, voxel_size=2.0, shape=(5, 6, 7)) == VolumeGeometry((5, 6, 7), (2.0, 2.0, 2.0))


# ----------------------------------------------------------------------------- against RTK (itk-rtk)
def _rtk():
    itk = pytest.importorskip("itk", reason="itk-rtk is not installed (pip install itk-rtk)")
    try:
        from itk import RTK
    except ImportError:
        pytest.skip("itk is installed without RTK (pip install itk-rtk)")
    return itk, RTK


def _rtk_geometry(rtk, path):
    reader = rtk.ThreeDCircularProjectionGeometryXMLFileReader.New()
    reader.SetFilename(str(path))
    reader.GenerateOutputInformation()
    return reader.GetOutputObject()


def _rtk_forward(itk, rtk, path, volume, grid, detector, n_views):
    image_type = itk.Image[itk.F, 3]
    joseph = rtk.JosephForwardProjectionImageFilter[image_type, image_type].New()
    joseph.SetInput(0, rtk_stack_image(np.zeros((n_views, *detector.nDetector)), detector))
    joseph.SetInput(1, rtk_volume_image(volume, grid))
    joseph.SetGeometry(_rtk_geometry(rtk, path))
    joseph.Update()
    return itk.GetArrayFromImage(joseph.GetOutput())


def test_rtk_geometry_object_agrees_with_ours(tmp_path):
    """RTK writes the XML; its own source positions and detector matrices against the geometry we read."""
    itk, rtk = _rtk()
    p = random_parameters()
    theirs = rtk.ThreeDCircularProjectionGeometry.New()
    for i in range(p.n_views):
        theirs.AddProjection(*(float(getattr(p, name)[i]) for name in (
            "sid", "sdd", "gantry", "projection_x", "projection_y", "out_of_plane", "in_plane", "source_x",
            "source_y")))
    writer = rtk.ThreeDCircularProjectionGeometryXMLFileWriter.New()
    writer.SetFilename(str(tmp_path / "rtk.xml"))
    writer.SetObject(theirs)
    writer.WriteFile()
    ours = rtk_scan_geometry(read_rtk_geometry(tmp_path / "rtk.xml"), DETECTOR, GRID)
    to_ours = lambda xyz: np.asarray(xyz)[..., [2, 0, 1]]  # noqa: E731 (RTK X, Y, Z -> ctrecon y, z, x)
    pixels = ours.pixel_positions()
    (nv, nu), (dv, du), (v0, u0) = DETECTOR.nDetector, DETECTOR.dDetector, DETECTOR.origin
    for i in range(p.n_views):
        np.testing.assert_allclose(ours.source_positions()[i], to_ours(np.array(theirs.GetSourcePosition(i))[:3]),
                                   atol=1e-9)
        matrix = itk.array_from_matrix(theirs.GetProjectionCoordinatesToFixedSystemMatrix(i))
        for r, c in ((0, 0), (nv - 1, 3), (7, nu - 1)):
            point = matrix @ np.array([u0 + c * du, v0 + r * dv, 0.0, 1.0])
            np.testing.assert_allclose(pixels[i, r, c], to_ours(point[:3]), atol=1e-9)


@pytest.mark.parametrize("case", ["offsets", "tilted", "short"])
def test_forward_projection_agrees_with_rtk_joseph(tmp_path, case):
    itk, rtk = _rtk()
    if case == "tilted":      # every parameter varies per view: a ConeVecGeometry
        parameters, detector, n_views = random_parameters(), DETECTOR, 9
    else:
        arc = 2 * math.pi if case == "offsets" else short_scan_arc(450, (40, 56), (1.1, 1.0), (1.5, -2.0)) + 0.05
        n_views = 12 if case == "offsets" else 20
        circle = ConeBeamGeometry.circular(DSO=300, DSD=450, nDetector=(40, 56), dDetector=(1.1, 1.0),
                                           nVoxel=GRID.nVoxel, dVoxel=GRID.dVoxel, n_views=n_views, arc=arc,
                                           start_angle=0.4, offDetector=(1.5, -2.0))
        parameters, detector = rtk_parameters(circle), DetectorGrid((40, 56), (1.1, 1.0))
    write_rtk_geometry(tmp_path / "g.xml", parameters)
    geometry = read_geometry_file(tmp_path / "g.xml", detector).geometry.with_volume(GRID)
    assert isinstance(geometry, ConeVecGeometry if case == "tilted" else ConeBeamGeometry)
    volume = phantom()
    ours = Projector(geometry)(torch.from_numpy(volume)).numpy()
    theirs = _rtk_forward(itk, rtk, tmp_path / "g.xml", volume, GRID, detector, n_views)
    assert np.abs(ours).max() > 1.0
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


@pytest.mark.parametrize("short", [False, True], ids=["full", "short"])
def test_fdk_agrees_with_rtk_fdk(tmp_path, short):
    itk, rtk = _rtk()
    grid = VolumeGeometry((24, 48, 48), (1.0, 1.0, 1.0))
    offsets = (0.8, -1.3)
    base = ConeBeamGeometry.covering(grid, n_views=8)
    arc = short_scan_arc(base.DSD, base.nDetector, base.dDetector, offsets) + 0.02 if short else 2 * math.pi
    geometry = ConeBeamGeometry.covering(grid, n_views=120 if short else 180, arc=arc).replace(offDetector=offsets)
    volume = phantom(grid)
    projections = Projector(geometry)(torch.from_numpy(volume)).numpy()
    ours = fdk(projections, geometry).numpy()
    write_rtk_geometry(tmp_path / "g.xml", rtk_parameters(geometry))
    rtk_geometry = _rtk_geometry(rtk, tmp_path / "g.xml")
    image_type = itk.Image[itk.F, 3]
    stack = rtk_stack_image(projections, DetectorGrid(geometry.nDetector, geometry.dDetector))
    if short:
        parker = rtk.ParkerShortScanImageFilter[image_type].New()
        parker.SetInput(stack)
        parker.SetGeometry(rtk_geometry)
        parker.Update()
        stack = parker.GetOutput()
    reconstruction = rtk.FDKConeBeamReconstructionFilter[image_type].New()
    reconstruction.SetInput(0, rtk_volume_image(np.zeros(grid.nVoxel), grid))
    reconstruction.SetInput(1, stack)
    reconstruction.SetGeometry(rtk_geometry)
    reconstruction.Update()
    theirs = volume_from_rtk(itk.GetArrayFromImage(reconstruction.GetOutput()))
    central = slice(8, 16)
    difference = np.linalg.norm(ours[central] - theirs[central]) / np.linalg.norm(theirs[central])
    assert difference < 1e-4
