import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from ctrecon.core.errors import InputError
from ctrecon.operators.fdk import (FILTERS, angular_weights, backproject, fdk, filter_projections, filter_response,
                                   parker_weights, ramp_kernel, redundancy_weights)
from ctrecon.core.geometry import ConeBeamGeometry, VolumeGeometry, short_scan_arc
from ctrecon.core.phantoms import (Ellipsoid, ellipsoid_projections, ellipsoid_volume, gaussian_projections,
                                   gaussian_volume, random_gaussian_blobs, shepp_logan_3d)


def relative_error(x, ref, region=slice(None)):
    return float(np.linalg.norm((x - ref)[region]) / np.linalg.norm(ref[region]))


def central_slices(volume_shape, half_width=3):
    z = volume_shape[0] // 2
    return slice(z - half_width, z + half_width)


# --------------------------------------------------------------------------- filter and backprojection units
def test_ramp_filter_equals_direct_convolution_with_kak_slaney_kernel():
    vol = VolumeGeometry((4, 4, 4), (1.0, 1.0, 1.0))
    geom = ConeBeamGeometry.covering(vol, n_views=2, nDetector=(3, 37))
    tau = geom.dDetector[1] * geom.DSO / geom.DSD
    rows = np.random.default_rng(0).normal(size=(2, 3, 37))
    lags = np.arange(-36, 37)
    kernel = np.where(lags == 0, 1 / (4 * tau ** 2), np.where(lags % 2 == 1, -1 / (math.pi * lags * tau) ** 2, 0.0))
    expected = tau * np.apply_along_axis(lambda r: np.convolve(r, kernel)[36:36 + 37], -1, rows)
    got = filter_projections(torch.tensor(rows), geom, "ram-lak").numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_ramp_kernel_is_the_spatial_kernel_and_windows_roll_off():
    h = ramp_kernel(16, 2.0)
    assert h[0] == pytest.approx(1 / 16) and h[2] == 0.0 and h[1] == h[15] == pytest.approx(-1 / (4 * math.pi ** 2))
    responses = {name: filter_response(50, 2.0, name)[0] for name in FILTERS}
    assert filter_response(50, 2.0)[1] == 128
    ram_lak = responses["ram-lak"]
    # Sampled spatial kernel: a small positive DC (no |f| notch at zero); |f| = 1/(2τ) at Nyquist.
    assert 0 < ram_lak[0] < 0.01 * ram_lak[-1]
    assert ram_lak[-1] == pytest.approx(1 / (2 * 2.0), rel=1e-2)
    nyquist = [responses[name][-1] for name in ("ram-lak", "shepp-logan", "cosine", "hann")]
    assert nyquist[0] > nyquist[1] > nyquist[2] > nyquist[3] == pytest.approx(0.0, abs=1e-12)
    for name in FILTERS:
        assert np.all(responses[name] <= ram_lak + 1e-15)


def brute_force_backprojection(filtered, geom, view_weights):
    """The discretisation documented in ``backproject``, voxel by voxel in float64."""
    (n_views, n_rows, n_cols) = filtered.shape
    (dv, du), (ov, ou) = geom.dDetector, geom.offDetector
    out = np.zeros(geom.nVoxel)
    centres = geom.volume.voxel_centres()
    for a, theta in enumerate(geom.angles):
        for index in np.ndindex(*geom.nVoxel):
            x, y, z = centres[index]
            s = x * math.cos(theta) + y * math.sin(theta)
            t = -x * math.sin(theta) + y * math.cos(theta)
            m = geom.DSD / (geom.DSO - s)
            c = (m * t - ou) / du + (n_cols - 1) / 2
            r = (m * z - ov) / dv + (n_rows - 1) / 2
            value = 0.0
            for rr in (math.floor(r), math.floor(r) + 1):
                for cc in (math.floor(c), math.floor(c) + 1):
                    if 0 <= rr < n_rows and 0 <= cc < n_cols:
                        value += (1 - abs(r - rr)) * (1 - abs(c - cc)) * filtered[a, rr, cc]
            out[index] += view_weights[a] * (geom.DSO / (geom.DSO - s)) ** 2 * value
    return out


def test_backprojection_matches_its_documented_discretisation():
    geom = ConeBeamGeometry(DSO=40.0, DSD=70.0, nDetector=(7, 9), dDetector=(2.0, 1.5), nVoxel=(4, 5, 6),
                            dVoxel=(2.5, 1.5, 2.0), offOrigin=(1.0, -2.0, 1.5), offDetector=(0.7, -1.1),
                            angles=np.array([0.1, 1.7, 2.9, 4.4]))
    filtered = np.random.default_rng(1).normal(size=geom.projection_shape)
    view_weights = np.array([0.5, 1.0, 1.5, 2.0])
    got = backproject(torch.tensor(filtered, dtype=torch.float32), geom, view_weights, max_elements=40).numpy()
    expected = brute_force_backprojection(filtered, geom, view_weights)
    assert np.abs(expected).max() > 1.0 and np.count_nonzero(expected == 0) < expected.size // 2
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_angular_weights_follow_the_gaps_between_views():
    vol = VolumeGeometry((4, 4, 4), (1.0, 1.0, 1.0))
    base = ConeBeamGeometry.covering(vol, n_views=4)
    full = base.replace(angles=np.array([3.0, 0.0, 1.0, 5.0]))  # unsorted, non-uniform, wraps round 2π
    np.testing.assert_allclose(angular_weights(full), [2.0, (1 + 2 * math.pi - 5) / 2, 1.5, (2 * math.pi - 3) / 2])
    assert angular_weights(full).sum() == pytest.approx(2 * math.pi)
    short = base.replace(angles=np.array([0.0, 1.0, 2.5, 4.0]), arc=4.0)
    np.testing.assert_allclose(angular_weights(short), [0.5, 1.25, 1.5, 0.75])


@pytest.mark.parametrize("arc_extra", [0.0, 0.6, 2 * math.pi - math.pi - 0.4 - 1e-3])
def test_parker_weights_sum_to_one_over_every_redundant_ray(arc_extra):
    half_fan = 0.2
    arc = math.pi + 2 * half_fan + arc_extra
    rng = np.random.default_rng(2)
    beta = rng.uniform(0, arc, 2000)
    gamma = rng.uniform(-half_fan, half_fan, 2000)
    total = parker_weights(beta, gamma, arc)
    # Every other measurement of the same line inside the arc: (β ± 2π, γ) and (β + π + 2γ + 2πk, -γ).
    others = [(beta + 2 * math.pi * k, gamma) for k in (-1, 1)]
    others += [(beta + math.pi + 2 * gamma + 2 * math.pi * k, -gamma) for k in (-1, 0, 1)]
    for other_beta, other_gamma in others:
        total = total + parker_weights(other_beta, other_gamma, arc)
    np.testing.assert_allclose(total, 1.0, atol=1e-12)
    assert parker_weights(np.array([0.0, arc]), np.array([0.1, -0.1]), arc) == pytest.approx([0.0, 0.0])


# --------------------------------------------------------------------------- reconstructions of analytic phantoms
@pytest.fixture(scope="module")
def shepp_logan_case():
    vol = VolumeGeometry((64, 64, 64), (1.0, 1.0, 1.0))
    geom = ConeBeamGeometry.covering(vol, n_views=180)
    ellipsoids = shepp_logan_3d(vol)
    truth = ellipsoid_volume(ellipsoids, vol, supersample=1)  # the tests look only where the truth is flat
    return geom, ellipsoid_projections(ellipsoids, geom), truth


def test_shepp_logan_full_scan_is_accurate_away_from_edges(shepp_logan_case):
    geom, projections, truth = shepp_logan_case
    recon = fdk(projections, geom).numpy()
    assert recon.shape == truth.shape and recon.dtype == np.float32
    # Away from edges: voxels whose 3×3×3 neighbourhood is constant in the truth.
    flat = ndimage.maximum_filter(truth, 3) == ndimage.minimum_filter(truth, 3)
    error = np.abs(recon - truth)
    centre = central_slices(truth.shape, 4)
    assert error[centre][flat[centre]].mean() < 0.0065   # contrasts: skull 0.25, brain 0.05, details ±0.025
    assert error[flat].mean() < 0.004
    brain = flat & np.isclose(truth, 0.05)
    assert recon[brain].mean() == pytest.approx(0.05, rel=0.03)


def test_absolute_scale_inside_a_uniform_ellipsoid():
    vol = VolumeGeometry((48, 48, 48), (1.0, 1.0, 1.0))
    geom = ConeBeamGeometry.covering(vol, n_views=120)
    body = Ellipsoid(centre=(1.0, -2.0, 0.0), semi_axes=(20.0, 16.0, 18.0), value=0.25)
    recon = fdk(ellipsoid_projections([body], geom), geom).numpy()
    inner = ellipsoid_volume([Ellipsoid(body.centre, (14.0, 11.0, 12.0), 1.0)], vol, supersample=1) > 0
    assert recon[inner].mean() == pytest.approx(0.25, rel=0.02)
    assert np.abs(recon[inner] - 0.25).max() < 0.25 * 0.1


@pytest.fixture(scope="module")
def blob_case():
    """Smooth Gaussian blobs, a full-scan geometry and its FDK reconstruction."""
    vol = VolumeGeometry((40, 64, 64), (1.0, 1.0, 1.0))
    blobs = random_gaussian_blobs(vol, n=8, seed=1, sigma_range=(0.06, 0.15))
    geom = ConeBeamGeometry.covering(vol, n_views=160, nDetector=(64, 96))
    return vol, blobs, gaussian_volume(blobs, vol), geom, fdk(gaussian_projections(blobs, geom), geom).numpy()


def test_smooth_phantom_full_scan(blob_case):
    vol, blobs, truth, geom, recon = blob_case
    assert relative_error(recon, truth, central_slices(truth.shape)) < 0.011
    assert relative_error(recon, truth) < 0.016


@pytest.mark.parametrize("extra_arc", [0.0, math.radians(60)])
def test_short_scan_with_parker_weights_matches_full_scan_in_central_slices(blob_case, extra_arc):
    vol, blobs, truth, base, full = blob_case
    arc = short_scan_arc(base.DSD, base.nDetector, base.dDetector) + extra_arc
    short = ConeBeamGeometry.circular(DSO=base.DSO, DSD=base.DSD, nDetector=base.nDetector, dDetector=base.dDetector,
                                      nVoxel=vol.nVoxel, dVoxel=vol.dVoxel, n_views=120, arc=arc, start_angle=0.7)
    recon = fdk(gaussian_projections(blobs, short), short).numpy()
    centre = central_slices(truth.shape)
    assert relative_error(recon, truth, centre) < 1.5 * relative_error(full, truth, centre) + 0.005
    assert relative_error(recon, truth) < 0.08  # short-scan cone-beam artefacts grow off the central plane
    assert abs(recon.sum() / truth.sum() - 1) < 0.02


def test_non_uniform_angular_sampling_is_weighted_by_its_gaps(blob_case):
    vol, blobs, truth, base, _ = blob_case
    # 100 views over the first half turn, 50 over the second: equal weights would favour the first half.
    angles = np.concatenate([np.linspace(0, math.pi, 100, endpoint=False), np.linspace(math.pi, 2 * math.pi, 50, endpoint=False)])
    geom = base.replace(angles=angles)
    recon = fdk(gaussian_projections(blobs, geom), geom).numpy()
    assert relative_error(recon, truth, central_slices(truth.shape)) < 0.015


def test_offsets_and_anisotropic_voxels_reconstruct_in_place():
    vol = VolumeGeometry((24, 40, 34), (2.0, 1.25, 1.5), offOrigin=(6.0, -5.0, 4.0))
    blobs = random_gaussian_blobs(vol, n=6, seed=3, sigma_range=(0.06, 0.15))
    covering = ConeBeamGeometry.covering(vol, n_views=150, nDetector=(48, 64))
    geom = covering.replace(nDetector=(56, 76), offDetector=(5.0, -7.0))  # shifted detector, still covering
    truth = gaussian_volume(blobs, vol)
    recon = fdk(gaussian_projections(blobs, geom), geom).numpy()
    assert relative_error(recon, truth, central_slices(truth.shape)) < 0.02
    assert relative_error(recon, truth) < 0.028
    # Ignoring the offsets puts the blobs in the wrong place: the test can see a misplacement.
    wrong = fdk(gaussian_projections(blobs, geom), geom.replace(offDetector=(0.0, 0.0))).numpy()
    assert relative_error(wrong, truth) > 0.2


def test_smoother_filters_trade_noise_for_resolution(shepp_logan_case):
    geom, projections, truth = shepp_logan_case
    slab = geom.replace(nVoxel=(12, *geom.nVoxel[1:]))  # the central 12 slices of the same grid
    truth = truth[26:38]
    flat = (ndimage.maximum_filter(truth, 5) == ndimage.minimum_filter(truth, 5)) & (truth > 0)  # 2 voxels from edges
    noise = np.random.default_rng(4).normal(0.0, 0.05, size=geom.projection_shape)
    stds, detail, means = [], [], []
    for name in ("ram-lak", "shepp-logan", "cosine", "hann"):
        stds.append(fdk(noise, slab, name).numpy().std())
        recon = fdk(projections, slab, name).numpy()
        detail.append(np.square(ndimage.laplace(recon.astype(np.float64))).mean())
        means.append(recon[flat].mean())
    assert stds[0] > stds[1] > stds[2] > stds[3] > 0
    assert detail[0] > detail[1] > detail[2] > detail[3]
    np.testing.assert_allclose(means, truth[flat].mean(), rtol=0.02)


# --------------------------------------------------------------------------- interface
def test_numpy_and_tensor_inputs_progress_and_device():
    vol = VolumeGeometry((8, 10, 12), (1.0, 1.0, 1.0))
    geom = ConeBeamGeometry.covering(vol, n_views=12)
    projections = ellipsoid_projections([Ellipsoid((0.0, 0.0, 0.0), (4.0, 3.0, 3.0), 0.2)], geom)
    calls = []
    from_numpy = fdk(projections, geom, "hann", max_elements=2000, progress=lambda done, total: calls.append((done, total)))
    from_tensor = fdk(torch.tensor(projections, dtype=torch.float64), geom, "hann")
    assert from_numpy.dtype == torch.float32 and from_numpy.device.type == "cpu" and from_numpy.shape == (8, 10, 12)
    np.testing.assert_allclose(from_numpy.numpy(), from_tensor.numpy(), rtol=1e-5, atol=1e-6)
    assert calls[-1] == (12, 12) and len(calls) > 1 and all(a < b for (a, _), (b, _) in zip(calls, calls[1:]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(blob_case):
    vol, blobs, truth, geom, _ = blob_case
    projections = torch.tensor(gaussian_projections(blobs, geom), dtype=torch.float32)
    on_gpu = fdk(projections.cuda(), geom)
    assert on_gpu.device.type == "cuda"
    np.testing.assert_allclose(on_gpu.cpu().numpy(), fdk(projections, geom).numpy(), rtol=1e-4, atol=1e-5)
    assert fdk(projections, geom, device="cuda").device.type == "cuda"


def test_bad_input_is_an_input_error():
    vol = VolumeGeometry((8, 8, 8), (1.0, 1.0, 1.0))
    geom = ConeBeamGeometry.covering(vol, n_views=6)
    good = np.zeros(geom.projection_shape, dtype=np.float32)
    with pytest.raises(InputError, match="shape"):
        fdk(good[:, :, :-1], geom)
    bad = good.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        fdk(bad, geom)
    with pytest.raises(InputError, match="filter"):
        fdk(good, geom, "butterworth")
    too_short = ConeBeamGeometry.circular(DSO=geom.DSO, DSD=geom.DSD, nDetector=geom.nDetector, dDetector=geom.dDetector,
                                          nVoxel=vol.nVoxel, dVoxel=vol.dVoxel, n_views=6, arc=math.pi)
    with pytest.raises(InputError, match="arc"):
        fdk(good, too_short)
    away = geom.replace(offOrigin=(500.0, 0.0, 0.0))  # volume far above the cone
    with pytest.raises(InputError, match="does not see"):
        fdk(good, away)


def test_redundancy_weights_are_half_for_a_full_scan_and_parker_for_a_short_one():
    vol = VolumeGeometry((8, 8, 8), (1.0, 1.0, 1.0))
    full = ConeBeamGeometry.covering(vol, n_views=10)
    assert np.all(redundancy_weights(full) == 0.5)
    arc = short_scan_arc(full.DSD, full.nDetector, full.dDetector)
    short = ConeBeamGeometry.covering(vol, n_views=40, arc=arc)
    w = redundancy_weights(short)
    assert w.shape == (40, 8) and w[0].max() == 0.0 and w[-1].max() == pytest.approx(0.0, abs=1e-12)
    assert w.max() == 1.0 and w.min() >= 0.0


def test_fdk_refuses_a_detector_that_never_sees_the_volume():
    geometry = ConeBeamGeometry.circular(DSO=500, DSD=800, nDetector=(20, 30), dDetector=(1.5, 1.5),
                                         nVoxel=(10, 12, 14), dVoxel=(1, 1, 1), n_views=6, offDetector=(0, 300))
    with pytest.raises(InputError, match="does not see the reconstruction volume"):
        fdk(np.zeros(geometry.projection_shape, np.float32), geometry)
    fdk(np.zeros(geometry.projection_shape, np.float32), geometry.replace(offDetector=(0, 20)))  # an edge sees it
