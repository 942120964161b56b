"""ctrecon's TIGRE adapter against TIGRE's own conventions, read from TIGRE's source.

TIGRE needs CUDA and cannot run here, so ``tigre_reference`` re-derives, from TIGRE's C/CUDA and
Python code (commit ``TIGRE_COMMIT``), where TIGRE puts the source and every pixel of its projection
array relative to the image array it is given. These tests check that a ``geo`` read by
``ConeBeamGeometry.from_tigre`` (and one written by ``to_tigre``) describes the same rays: the same
voxel of the same ``[Z, Y, X]`` array is seen by the same pixel ``[a, r, c]`` of the same
``[A, V, U]`` projection array.

Conventions found in TIGRE (and asserted in ``test_tigre_conventions_in_words``):
- gantry angle alpha: source at DSO·(cos a, sin a, 0), counter-clockwise about +z seen from +z;
- detector column c grows along u = (-sin a, cos a, 0); row r grows along +z (row 0 is the bottom);
- offDetector = (ov, ou) moves the detector centre by ou·u + ov·z;
- offOrigin = (oz, oy, ox) moves the *image*: its centre sits at (ox, oy, oz); the isocentre stays put;
- image ``img[k, j, i]``: i (last axis) is x, j is y, k (first axis) is z.
"""
from __future__ import annotations

import math
import types

import numpy as np
import pytest

from ctrecon.core.geometry import ConeBeamGeometry
from tigre_reference import (TIGRE_COMMIT, tigre_check_geo, tigre_image_origin_in_world, tigre_rays,
                             tigre_voxel_centres, tigre_voxel_to_detector)

RTOL = 1e-9
DSO, DSD = 500.0, 800.0


def tigre_geo(**fields):
    """A TIGRE-style geo as a user writes it (numpy arrays, (z, y, x) and (v, u) orders)."""
    geo = types.SimpleNamespace(
        DSO=DSO, DSD=DSD,
        nDetector=np.array([12, 16]), dDetector=np.array([1.3, 1.1]),        # (V, U): V != U on purpose
        nVoxel=np.array([6, 8, 10]), dVoxel=np.array([1.5, 1.2, 1.0]),      # (Z, Y, X): all distinct
        offOrigin=np.array([0.0, 0.0, 0.0]), offDetector=np.array([0.0, 0.0]),
        accuracy=0.5, mode="cone")
    for name, value in fields.items():
        setattr(geo, name, np.asarray(value, dtype=np.float64) if isinstance(value, (list, tuple)) else value)
    geo.sVoxel = geo.nVoxel * geo.dVoxel
    geo.sDetector = geo.nDetector * geo.dDetector
    return geo


CASES = {
    "centred": (dict(), np.linspace(0.0, 2 * math.pi, 8, endpoint=False)),
    "offDetector": (dict(offDetector=[2.5, -4.0]), 0.3 + np.linspace(0.0, 2 * math.pi, 7, endpoint=False)),
    "offOrigin": (dict(offOrigin=[3.0, -7.0, 11.0]), np.linspace(2.0, -1.0, 6)),           # decreasing
    "both_irregular": (dict(offOrigin=[-2.5, 4.0, -6.0], offDetector=[-3.0, 1.75]),
                       np.array([5.9, 4.0, 0.1, -2.2, 3.3])),
}


@pytest.fixture(params=sorted(CASES), name="case")
def _case(request):
    fields, angles = CASES[request.param]
    return tigre_geo(**fields), angles


def intersect_grid(source, pixels, points):
    """Fractional (row, col) ``[A, N, 2]`` where source -> point hits the plane of a pixel grid ``[A, V, U, 3]``."""
    origin = pixels[:, 0, 0]
    e_u = pixels[:, 0, 1] - origin
    e_v = pixels[:, 1, 0] - origin
    ray = points[None, :, :] - source[:, None, :]                                 # [A, N, 3]
    A, N = ray.shape[:2]
    # source + t·ray = origin + c·e_u + r·e_v  <=>  [e_u, e_v, -ray] (c, r, t) = source - origin
    M = np.stack([np.broadcast_to(e_u[:, None], (A, N, 3)), np.broadcast_to(e_v[:, None], (A, N, 3)), -ray], -1)
    rhs = np.broadcast_to((source - origin)[:, None, :], (A, N, 3))
    c, r, _ = np.moveaxis(np.linalg.solve(M, rhs[..., None])[..., 0], -1, 0)
    return np.stack([r, c], -1)


def ctrecon_voxel_to_detector(g: ConeBeamGeometry, points):
    """Fractional (row, col) per ctrecon: ray to ``points`` (world) hits the detector plane; index by pixel_offsets."""
    centre, u, v = g.detector_frames()
    v_off, u_off = g.pixel_offsets()
    s = g.source_positions()
    normal = np.cross(u, v)
    ray = points[None] - s[:, None]
    t = np.einsum("ak,ak->a", centre - s, normal)[:, None] / np.einsum("ank,ak->an", ray, normal)
    hit = s[:, None] + t[..., None] * ray - centre[:, None]
    a, b = np.einsum("ank,ak->an", hit, u), np.einsum("ank,ak->an", hit, v)
    col = (a - u_off[0]) / (u_off[1] - u_off[0])
    row = (b - v_off[0]) / (v_off[1] - v_off[0])
    return np.stack([row, col], -1)


def random_voxels(geo, n=40, seed=0):
    """Integer voxel indices (i, j, k) of img[k, j, i], spread over the whole image."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = (int(x) for x in geo.nVoxel)
    return np.stack([rng.integers(0, nx, n), rng.integers(0, ny, n), rng.integers(0, nz, n)], -1)


def assert_close(actual, expected, scale):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=RTOL * scale)


def assert_rays_match(g: ConeBeamGeometry, geo, angles):
    """ctrecon's source/pixels == TIGRE's, once both are put in the frame of the same image voxel [0, 0, 0]."""
    source, pixels = tigre_rays(geo, angles)              # TIGRE image frame: voxel [0,0,0] at the origin
    first_voxel = g.volume.voxel_centres()[0, 0, 0]       # ctrecon's world position of that voxel
    assert g.projection_shape == pixels.shape[:3]
    assert_close(g.source_positions() - first_voxel, source, DSD)
    assert_close(g.pixel_positions() - first_voxel, pixels, DSD)


def _refuses_or_matches(geo, angles):
    """from_tigre may refuse a geo it cannot represent (ValueError), but must not misread it."""
    try:
        g = ConeBeamGeometry.from_tigre(geo, angles)
    except ValueError:
        return
    assert_rays_match(g, geo, angles)


# --------------------------------------------------------------------------- the reference itself
def test_reference_names_its_tigre_commit():
    assert len(TIGRE_COMMIT) == 40 and int(TIGRE_COMMIT, 16)


READINGS = {
    "plain": dict(),
    "offsets": dict(offOrigin=[-2.5, 4.0, -6.0], offDetector=[-3.0, 1.75]),
    "COR": dict(COR=1.7),
    "rotDetector": dict(rotDetector=[0.05, -0.03, 0.08], offDetector=[1.0, -2.0]),
}
# COR with non-circular (Euler) angles is left out: computeDeltas says COR "only works for standard
# rotation, not arbitrary axis rotation", and TIGRE's projector and backprojector then differ.
READING_CASES = [(name, euler) for name in sorted(READINGS) for euler in (False, True)
                 if not (euler and name == "COR")]
READING_IDS = [f"{name}-{'euler' if euler else 'circular'}" for name, euler in READING_CASES]


@pytest.mark.parametrize("name, euler", READING_CASES, ids=READING_IDS)
def test_reference_forward_and_backprojector_readings_agree(name, euler):
    """TIGRE's forward projector (tigre_rays) and FDK backprojector (voxel -> detector) describe one geometry."""
    extra = READINGS[name]
    geo = tigre_geo(**extra)
    angles = np.array([5.9, 4.0, 0.1, -2.2, 3.3])
    if euler:
        angles = np.stack([angles, np.linspace(-0.2, 0.3, 5), np.linspace(0.4, -0.1, 5)], -1)
    ijk = random_voxels(geo)
    source, pixels = tigre_rays(geo, angles)
    points = tigre_voxel_centres(geo)[ijk[:, 2], ijk[:, 1], ijk[:, 0]]
    assert_close(intersect_grid(source, pixels, points), tigre_voxel_to_detector(geo, angles, ijk), 16)


def test_tigre_conventions_in_words():
    """What TIGRE's code does, stated on the reference in the world frame (isocentre at the origin)."""
    geo = tigre_geo(offDetector=[2.5, -4.0], offOrigin=[3.0, -7.0, 11.0])
    angles = np.array([0.0, math.pi / 2, 0.7])
    source, pixels = tigre_rays(geo, angles, frame="world")
    # angle direction: alpha = 0 puts the source on +x, alpha = pi/2 on +y (counter-clockwise about +z).
    assert_close(source[0], [DSO, 0, 0], DSD)
    assert_close(source[1], [0, DSO, 0], DSD)
    a = angles[2]
    e = np.array([math.cos(a), math.sin(a), 0.0])
    u = np.array([-math.sin(a), math.cos(a), 0.0])
    assert_close(source[2], DSO * e, DSD)
    # columns grow along u = (-sin a, cos a, 0), rows grow along +z (row 0 of the array is the lowest).
    assert_close(pixels[2, 0, 1] - pixels[2, 0, 0], 1.1 * u, DSD)
    assert_close(pixels[2, 1, 0] - pixels[2, 0, 0], [0, 0, 1.3], DSD)
    # the detector centre is -(DSD - DSO)·e, moved by offDetector (ov, ou) = ou·u + ov·z.
    centre = pixels[2].mean(axis=(0, 1))
    assert_close(centre, -(DSD - DSO) * e - 4.0 * u + [0, 0, 2.5], DSD)
    # offOrigin (oz, oy, ox) moves the image, whose centre then sits at (ox, oy, oz); the rotation axis stays.
    image_centre = tigre_image_origin_in_world(geo, angles)[0] + (geo.sVoxel[::-1] - geo.dVoxel[::-1]) / 2
    assert_close(image_centre, [11.0, -7.0, 3.0], DSD)
    # image axes: voxel img[k, j, i] is i·dx along x, j·dy along y, k·dz along z from img[0, 0, 0].
    voxels = tigre_voxel_centres(geo)
    assert voxels.shape == (6, 8, 10, 3)
    assert_close(voxels[2, 3, 4], [4 * 1.0, 3 * 1.2, 2 * 1.5], DSD)


# --------------------------------------------------------------------------- from_tigre
def test_from_tigre_sources_and_pixels_match_tigre(case):
    geo, angles = case
    assert_rays_match(ConeBeamGeometry.from_tigre(geo, angles), geo, angles)


def test_from_tigre_voxels_project_to_the_same_detector_index(case):
    """Random voxels of the image land on the same fractional (row, col) of the projection array in both models."""
    geo, angles = case
    g = ConeBeamGeometry.from_tigre(geo, angles)
    ijk = random_voxels(geo)
    world = g.volume.voxel_centres()[ijk[:, 2], ijk[:, 1], ijk[:, 0]]      # ctrecon's [Z, Y, X] indexing
    expected = tigre_voxel_to_detector(geo, angles, ijk)                    # TIGRE's backprojector
    assert_close(ctrecon_voxel_to_detector(g, world), expected, 16)
    # the voxels are not all on the axis: the test would see a flip of u, v or of an image axis
    assert np.ptp(expected[..., 0]) > 3 and np.ptp(expected[..., 1]) > 3


def test_projector_view_table_matches_tigre_compute_deltas(case):
    """ctrecon's projector ray table (voxel-index units) == TIGRE's computeDeltas (source, pixel (0,0), deltas)."""
    from ctrecon.operators.projector import view_table

    geo, angles = case
    g = ConeBeamGeometry.from_tigre(geo, angles)
    source, pixels = tigre_rays(geo, angles)
    d = np.asarray(geo.dVoxel, dtype=np.float64)[::-1]                      # (dx, dy, dz)
    expected = np.concatenate([source / d, pixels[:, 0, 0] / d, (pixels[:, 0, 1] - pixels[:, 0, 0]) / d,
                               (pixels[:, 1, 0] - pixels[:, 0, 0]) / d], axis=1)
    assert_close(view_table(g), expected, DSD)


@pytest.mark.parametrize("field", ["offOrigin", "offDetector", "DSO"])
def test_from_tigre_refuses_or_honours_per_angle_values(field):
    """TIGRE takes per-angle offsets and distances; from_tigre must refuse them or describe the same rays."""
    angles = np.linspace(0.0, 1.0, 4)
    ramp = np.arange(4.0)
    values = {"offOrigin": np.stack([0 * ramp, -ramp, 2 * ramp], -1),
              "offDetector": np.stack([ramp, -2 * ramp], -1),
              "DSO": DSO + ramp}
    _refuses_or_matches(tigre_geo(**{field: values[field]}), angles)


# --------------------------------------------------------------------------- to_tigre
TO_TIGRE = {
    "centred": dict(),
    "offsets_decreasing": dict(offOrigin=(4.0, -3.0, 8.0), offDetector=(-1.5, 2.25), start_angle=3.0, arc=-4.0),
}


@pytest.mark.parametrize("name", sorted(TO_TIGRE))
def test_to_tigre_then_tigre_rays_matches_ctrecon(name):
    opts = dict(TO_TIGRE[name])
    start, arc = opts.pop("start_angle", 0.5), opts.pop("arc", 2 * math.pi)
    angles = start + np.linspace(0.0, arc, 9, endpoint=False)
    g = ConeBeamGeometry(DSO=DSO, DSD=DSD, nDetector=(10, 14), dDetector=(1.4, 1.05), nVoxel=(5, 7, 9),
                         dVoxel=(1.6, 1.1, 0.9), angles=angles, **opts)
    geo, tigre_angles = g.to_tigre()
    tigre_check_geo(geo)                                  # TIGRE's check_geo would accept it
    assert_rays_match(g, geo, tigre_angles)


# --------------------------------------------------------------------------- what the circle cannot describe
# TIGRE applies COR and rotDetector (ray_interpolated_projection.cu computeDeltas): from_tigre must refuse
# them (or, one day, honour them), never build the geometry without them.
def test_from_tigre_does_not_ignore_COR():
    _refuses_or_matches(tigre_geo(COR=1.5), np.linspace(0.0, 2 * math.pi, 6, endpoint=False))


def test_from_tigre_does_not_ignore_rotDetector():
    _refuses_or_matches(tigre_geo(rotDetector=[0.02, 0.0, 0.0]), np.linspace(0.0, 2 * math.pi, 6, endpoint=False))


@pytest.mark.parametrize("tilted", [False, True], ids=["alpha_only", "tilted"])
def test_from_tigre_reads_euler_angle_triples(tilted):
    alpha = np.linspace(0.0, 2 * math.pi, 5, endpoint=False)
    other = np.full(5, 0.1) if tilted else np.zeros(5)
    angles = np.stack([alpha, other, 0 * alpha], -1)
    geo = tigre_geo()
    try:
        g = ConeBeamGeometry.from_tigre(geo, angles)
    except ValueError:
        assert tilted
        return
    assert not tilted and g.n_angles == 5
    assert_rays_match(g, geo, angles)


def test_from_tigre_refuses_parallel_mode():
    with pytest.raises(ValueError):
        ConeBeamGeometry.from_tigre(tigre_geo(mode="parallel"), np.linspace(0.0, math.pi, 4))


def test_to_tigre_template_does_not_leak_COR_or_rotDetector():
    g = ConeBeamGeometry.circular(DSO=DSO, DSD=DSD, nDetector=(10, 14), dDetector=(1.4, 1.05), nVoxel=(5, 7, 9),
                                  dVoxel=(1.6, 1.1, 0.9), n_views=6)
    template = tigre_geo(COR=2.0, rotDetector=[0.03, 0.0, 0.0])
    geo, angles = g.to_tigre(template)
    assert_rays_match(g, geo, angles)
