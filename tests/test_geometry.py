import json
import math
import types

import numpy as np
import pytest

from ctrecon.core.geometry import ConeBeamGeometry, VolumeGeometry, full_scan_angles, short_scan_arc


def make_geometry(**changes):
    fields = dict(DSO=500.0, DSD=800.0, nDetector=(32, 48), dDetector=(1.5, 1.2), nVoxel=(16, 24, 20),
                  dVoxel=(2.0, 1.0, 1.5), angles=full_scan_angles(12), offOrigin=(1.0, -2.0, 3.0),
                  offDetector=(0.5, -0.7))
    fields.update(changes)
    return ConeBeamGeometry(**fields)


def test_voxel_centres_follow_design_formula():
    vol = VolumeGeometry((3, 4, 5), (2.0, 1.0, 0.5), (10.0, -1.0, 2.0))
    c = vol.voxel_centres()
    k, j, i = 2, 1, 4
    expected = ((i - 2) * 0.5 + 2.0, (j - 1.5) * 1.0 - 1.0, (k - 1) * 2.0 + 10.0)
    np.testing.assert_allclose(c[k, j, i], expected)
    np.testing.assert_allclose(vol.world_to_index(c[k, j, i]), (i, j, k))


def test_source_detector_frame_follows_design():
    g = make_geometry(angles=[0.3])
    theta = 0.3
    np.testing.assert_allclose(g.source_positions()[0], 500 * np.array([math.cos(theta), math.sin(theta), 0]))
    centre, u, v = g.detector_frames()
    np.testing.assert_allclose(centre[0], -300 * np.array([math.cos(theta), math.sin(theta), 0]))
    np.testing.assert_allclose(u[0], [-math.sin(theta), math.cos(theta), 0])
    np.testing.assert_allclose(v[0], [0, 0, 1])
    pix = g.pixel_positions()
    r, c = 3, 40
    expected = centre[0] + ((c - 23.5) * 1.2 - 0.7) * u[0] + ((r - 15.5) * 1.5 + 0.5) * v[0]
    np.testing.assert_allclose(pix[0, r, c], expected)
    # source, isocentre-projection and detector centre are collinear through the axis
    assert np.linalg.norm(g.source_positions()[0] - centre[0]) == pytest.approx(800.0)


@pytest.mark.parametrize("field,value", [("DSO", -1), ("DSD", 100.0), ("nDetector", (0, 3)), ("dDetector", (1, -1)),
                                         ("nVoxel", (2, 2)), ("dVoxel", (1, 1, float("nan"))), ("angles", []),
                                         ("offOrigin", "abc"), ("arc", 0.0), ("nVoxel", (2.5, 2, 2))])
def test_invalid_field_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        make_geometry(**{field: value})


def test_source_inside_volume_rejected():
    with pytest.raises(ValueError, match="DSO"):
        make_geometry(DSO=10.0, DSD=20.0)


def test_immutable_and_json_round_trip():
    g = make_geometry()
    with pytest.raises(Exception):
        g.DSO = 3.0
    with pytest.raises(ValueError):
        g.angles[0] = 1.0
    again = ConeBeamGeometry.from_json(g.to_json())
    assert again == g
    np.testing.assert_array_equal(again.angles, g.angles)
    data = json.loads(g.to_json(include_angles=False))
    assert "angles" not in data
    assert ConeBeamGeometry.from_dict(data, angles=g.angles) == g
    with pytest.raises(ValueError, match="unknown"):
        ConeBeamGeometry.from_dict({**g.to_dict(), "bogus": 1})


def test_view_subsets():
    g = make_geometry()
    half = g[::2]
    assert half.n_angles == 6 and half.arc == g.arc
    np.testing.assert_array_equal(half.angles, g.angles[::2])
    assert g[[0, 3]].n_angles == 2 and g[5].n_angles == 1
    assert g.n_angles == 12  # original untouched


def test_tigre_adapters_round_trip_without_mutation():
    g = make_geometry()
    given = types.SimpleNamespace(accuracy=0.25, extra="keep")
    geo, angles = g.to_tigre(given)
    assert not hasattr(given, "DSO") and given.accuracy == 0.25
    assert geo.extra == "keep" and geo.mode == "cone"
    np.testing.assert_allclose(geo.sVoxel, np.array(g.nVoxel) * np.array(g.dVoxel))
    snapshot = {k: np.copy(v) for k, v in vars(geo).items() if isinstance(v, np.ndarray)}
    back = ConeBeamGeometry.from_tigre(geo, angles)
    for k, v in snapshot.items():
        np.testing.assert_array_equal(getattr(geo, k), v)
    assert back == g
    geo.sVoxel = geo.sVoxel * 2
    with pytest.raises(ValueError, match="sVoxel"):
        ConeBeamGeometry.from_tigre(geo, angles)


def test_short_scan_arc_and_angles():
    arc = short_scan_arc(800.0, (32, 48), (1.5, 1.2))
    assert arc == pytest.approx(math.pi + 2 * math.atan(24 * 1.2 / 800))
    g = ConeBeamGeometry.circular(DSO=500, DSD=800, nDetector=(32, 48), dDetector=(1.5, 1.2), nVoxel=(8, 8, 8),
                                  dVoxel=(1, 1, 1), n_views=10, arc=arc)
    assert g.is_short_scan() and g.angles[-1] == pytest.approx(arc)
    assert g.fan_angle == pytest.approx(arc - math.pi)
    full = full_scan_angles(8)
    assert full[-1] < 2 * math.pi and np.allclose(np.diff(full), 2 * math.pi / 8)
    assert ConeBeamGeometry.from_tigre(g.to_tigre()[0], g.angles).arc == pytest.approx(arc)


def test_covering_detector_sees_every_voxel():
    vol = VolumeGeometry((20, 40, 30), (2.0, 1.0, 1.0), (3.0, 4.0, -5.0))
    g = ConeBeamGeometry.covering(vol, n_views=16)
    corners = np.array([[x, y, z] for x in vol.bounds()[:, 0] for y in vol.bounds()[:, 1] for z in vol.bounds()[:, 2]])
    src = g.source_positions()
    centre, u, v = g.detector_frames()
    for a in range(g.n_angles):
        ray = corners - src[a]
        normal = -src[a] / np.linalg.norm(src[a])  # towards the detector
        t = (np.dot(centre[a] - src[a], normal)) / (ray @ normal)
        hit = src[a] + t[:, None] * ray - centre[a]
        assert np.all(np.abs(hit @ u[a]) <= g.sDetector[1] / 2)
        assert np.all(np.abs(hit @ v[a]) <= g.sDetector[0] / 2)
