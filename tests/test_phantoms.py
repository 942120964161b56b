import numpy as np
import pytest
from scipy import integrate

from ctrecon.core.geometry import ConeBeamGeometry, VolumeGeometry
from ctrecon.core.phantoms import (Ellipsoid, GaussianBlob, ellipsoid_projections, ellipsoid_volume, gaussian_projections,
                                   rotation_z, shepp_logan_3d)


@pytest.fixture
def geometry():
    vol = VolumeGeometry((16, 16, 16), (1.0, 1.0, 1.0))
    return ConeBeamGeometry.covering(vol, n_views=4, nDetector=(9, 9))


def test_sphere_chord_through_centre(geometry):
    sphere = Ellipsoid(centre=(0.0, 0.0, 0.0), semi_axes=(5.0, 5.0, 5.0), value=0.3)
    p = ellipsoid_projections([sphere], geometry)
    assert p[:, 4, 4] == pytest.approx(np.full(4, 0.3 * 10.0))  # the central ray passes through the centre
    assert p.min() >= 0


def test_ellipsoid_chord_matches_quadrature(geometry):
    e = Ellipsoid(centre=(1.0, -2.0, 0.5), semi_axes=(6.0, 3.0, 4.0), value=1.0, rotation=rotation_z(0.4))
    p = ellipsoid_projections([e], geometry)
    src = geometry.source_positions()[1]
    pix = geometry.pixel_positions()[1, 3, 5]
    d = (pix - src) / np.linalg.norm(pix - src)
    inside = lambda t: float(np.sum((((src + t * d) - e.centre) @ e.rotation / e.semi_axes) ** 2) <= 1.0)
    ts = np.linspace(0, np.linalg.norm(pix - src), 200001)
    numeric = np.trapezoid([inside(t) for t in ts], ts)
    assert p[1, 3, 5] == pytest.approx(numeric, abs=2e-2)


def test_gaussian_line_integral_matches_quadrature(geometry):
    cov = np.array([[9.0, 2.0, 0.5], [2.0, 4.0, 0.3], [0.5, 0.3, 6.0]])
    g = GaussianBlob(centre=(0.5, 1.0, -1.0), covariance=cov, value=0.7)
    p = gaussian_projections([g], geometry)
    src = geometry.source_positions()[2]
    pix = geometry.pixel_positions()[2, 6, 2]
    d = (pix - src) / np.linalg.norm(pix - src)
    prec = np.linalg.inv(cov)
    f = lambda t: 0.7 * np.exp(-0.5 * (src + t * d - g.centre) @ prec @ (src + t * d - g.centre))
    numeric, _ = integrate.quad(f, 0, 2 * np.linalg.norm(src), points=[np.linalg.norm(src)], limit=200)
    assert p[2, 6, 2] == pytest.approx(numeric, rel=1e-8)


def test_shepp_logan_fits_and_voxelises():
    vol = VolumeGeometry((32, 32, 32), (1.0, 1.0, 1.0))
    ellipsoids = shepp_logan_3d(vol)
    x = ellipsoid_volume(ellipsoids, vol, supersample=2)
    assert x.shape == (32, 32, 32)
    assert x[16, 16, 16] == pytest.approx(0.25 * 0.2, abs=1e-6)  # 1 - 0.8 inside the skull
    assert x[0, 0, 0] == 0.0 and x.max() <= 0.25 + 1e-6
