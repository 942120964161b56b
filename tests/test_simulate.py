import math

import numpy as np
import pytest
import torch

import ctrecon
from ctrecon.core.errors import InputError
from ctrecon.core.geometry import VolumeGeometry
from ctrecon.core.io import Scan
from ctrecon.core.phantoms import GaussianBlob, gaussian_projections, gaussian_volume, random_gaussian_blobs
from ctrecon.core.units import hu_to_unit, unit_to_hu
from ctrecon.core.noise import add_noise
from ctrecon.pipeline.simulate import regrid_scan, resample_volume, simulate_scan


def test_hu_unit_round_trip_and_clipping():
    hu = np.array([-1024.0, -1000.0, 0.0, 40.0, 1500.0, 3071.0])
    unit = hu_to_unit(hu)
    np.testing.assert_allclose(unit_to_hu(unit), hu, atol=1e-9)
    assert unit[0] == 0.0 and unit[-1] == 1.0 and unit[2] == pytest.approx(1024 / 4095)
    assert hu_to_unit(np.array([-3000.0, 5000.0])).tolist() == [0.0, 1.0]
    tensor = hu_to_unit(torch.tensor(hu))
    assert torch.is_tensor(tensor)
    np.testing.assert_allclose(tensor.numpy(), unit)


@pytest.mark.parametrize("sigma", [0.0, 20.0])
def test_noise_statistics_on_a_flat_path_match_the_poisson_model(sigma):
    path, i0, mu_water = 20.0, 4000.0, 0.02  # unit × mm, photons, mm⁻¹
    kappa = mu_water * 4095 / 1024
    expected_counts = i0 * math.exp(-kappa * path)  # ≈ 810 photons
    noisy = add_noise(np.full((40, 50, 100), path), i0, electronic_sigma=sigma, seed=3, mu_water=mu_water)
    noisy = noisy.astype(np.float64) * kappa  # back to -log(N / I0)
    # Delta method: var(-log N) ≈ var(N)/N̄², bias ≈ var(N)/(2 N̄²), with var(N) = N̄ + σ².
    variance = (expected_counts + sigma ** 2) / expected_counts ** 2
    assert noisy.var() == pytest.approx(variance, rel=0.03)
    assert noisy.mean() - kappa * path == pytest.approx(variance / 2, abs=4 * math.sqrt(variance / noisy.size))


def test_water_gets_the_physical_attenuation_of_water():
    # 200 mm of water (u = 1024/4095) at μ_water = 0.0192 mm⁻¹ transmits exp(-3.84) of the photons.
    water_path = 200.0 * 1024 / 4095
    noisy = add_noise(np.full(200_000, water_path), 1e6, seed=0)
    transmitted = np.exp(-noisy.astype(np.float64) * 0.0192 * 4095 / 1024)
    assert transmitted.mean() == pytest.approx(math.exp(-0.0192 * 200.0), rel=2e-3)


def test_noise_is_seeded_and_clipped_at_one_count():
    projections = np.linspace(0.0, 12.0, 600).reshape(2, 3, 100)
    first = add_noise(projections, 1000.0, 5.0, seed=7)
    assert np.array_equal(first, add_noise(projections, 1000.0, 5.0, seed=7))
    assert not np.array_equal(first, add_noise(projections, 1000.0, 5.0, seed=8))
    assert first.dtype == np.float32 and np.all(np.isfinite(first))
    assert first.max() <= math.log(1000.0) / (0.0192 * 4095 / 1024) + 1e-4  # N ≥ 1 count: at most log(I0)/κ
    with pytest.raises(InputError, match="dose"):
        add_noise(projections, 0.0)
    with pytest.raises(InputError, match="too low .* 100 % of the detector readings"):
        add_noise(projections, 1e-3)  # ~no photon anywhere: the "scan" would be the clip value
    with pytest.raises(InputError, match="electronic"):
        add_noise(projections, 100.0, -1.0)
    with pytest.raises(InputError, match="mu_water"):
        add_noise(projections, 100.0, mu_water=0.0)


def test_resampling_keeps_extent_and_is_exact_on_linear_ramps():
    spacing = (2.0, 1.0, 1.5)
    geometry = VolumeGeometry((10, 16, 12), spacing)
    centres = geometry.voxel_centres()
    ramp = lambda pts: 0.3 * pts[..., 0] - 0.2 * pts[..., 1] + 0.7 * pts[..., 2]  # noqa: E731
    out, new_spacing = resample_volume(ramp(centres), spacing, shape=(20, 8, 18))
    assert out.shape == (20, 8, 18) and new_spacing == pytest.approx((1.0, 2.0, 1.0))
    new_centres = VolumeGeometry(out.shape, new_spacing).voxel_centres()
    # Away from the faces (where align_corners=False clamps) trilinear reproduces a linear function.
    inner = (slice(2, -2), slice(1, -1), slice(2, -2))
    np.testing.assert_allclose(out[inner], ramp(new_centres)[inner], atol=1e-4)
    by_spacing, spacing_b = resample_volume(ramp(centres), spacing, spacing_out=3.0)
    assert by_spacing.shape == (7, 5, 6) and spacing_b == pytest.approx((20 / 7, 16 / 5, 3.0))
    same, same_spacing = resample_volume(ramp(centres), spacing)
    assert same.shape == (10, 16, 12) and same_spacing == spacing
    with pytest.raises(InputError, match="not both"):
        resample_volume(ramp(centres), spacing, shape=(4, 4, 4), spacing_out=2.0)
    with pytest.raises(InputError, match="shape"):
        resample_volume(ramp(centres), spacing, shape=(4, 4))


@pytest.fixture(scope="module")
def blob_volume():
    volume = VolumeGeometry((20, 28, 24), (1.5, 1.25, 1.25))
    blobs = [GaussianBlob((2.0, -3.0, 1.0), np.diag([9.0, 6.0, 5.0]), 0.3),
             GaussianBlob((-4.0, 3.0, -2.0), np.array([[6.0, 2.0, 0.0], [2.0, 5.0, 1.0], [0.0, 1.0, 4.0]]), 0.2),
             GaussianBlob((3.0, 5.0, 3.0), np.diag([4.0, 4.0, 9.0]), 0.25)]
    return volume, blobs, gaussian_volume(blobs, volume)


def test_simulated_projections_match_analytic_line_integrals(blob_volume):
    volume, blobs, unit = blob_volume
    scan = simulate_scan(unit, volume.dVoxel, 6, input_units="unit", source="blobs")
    assert isinstance(scan, Scan)
    assert scan.geometry.nVoxel == volume.nVoxel and scan.geometry.dVoxel == volume.dVoxel
    assert scan.projections.shape == (6, 20, 28) and scan.projections.dtype == np.float32
    np.testing.assert_array_equal(scan.ground_truth, unit)
    exact = gaussian_projections(blobs, scan.geometry)
    # The projector's interpolation of blobs 2-3 voxels wide errs by about 3 %; a misplaced grid by far more.
    assert np.linalg.norm(scan.projections - exact) / np.linalg.norm(exact) < 0.045
    assert scan.meta["source"] == "blobs" and scan.meta["noise"] == {"model": "noiseless"}
    assert scan.meta["version"] == ctrecon.__version__ and scan.meta["resampling"] is None


def test_hu_input_short_arc_noise_and_seed(blob_volume):
    volume, _, unit = blob_volume
    hu = unit_to_hu(unit) - 300.0  # some air below -1000 HU: clipped to 0 in unit attenuation
    arc = math.radians(240)
    scan = simulate_scan(hu, volume.dVoxel, 5, arc=arc, dose_i0=2e4, electronic_sigma=2.0, seed=5)
    np.testing.assert_allclose(scan.ground_truth, hu_to_unit(hu), atol=1e-6)
    assert scan.geometry.arc == pytest.approx(arc) and scan.angles[-1] == pytest.approx(arc)
    again = simulate_scan(hu, volume.dVoxel, 5, arc=arc, dose_i0=2e4, electronic_sigma=2.0, seed=5)
    other = simulate_scan(hu, volume.dVoxel, 5, arc=arc, dose_i0=2e4, electronic_sigma=2.0, seed=6)
    np.testing.assert_array_equal(scan.projections, again.projections)
    assert not np.array_equal(scan.projections, other.projections)
    clean = simulate_scan(hu, volume.dVoxel, 5, arc=arc)
    kappa = 0.0192 * 4095 / 1024
    counts = 2e4 * np.exp(-kappa * clean.projections.astype(np.float64))
    expected_std = np.sqrt(counts + 2.0 ** 2) / counts / kappa  # delta method, per pixel
    assert ((scan.projections - clean.projections) / expected_std).std() == pytest.approx(1.0, abs=0.1)
    assert scan.meta["noise"]["model"] == "poisson+gaussian" and scan.meta["noise"]["I0"] == 2e4
    assert scan.meta["seed"] == 5 and scan.meta["input_units"] == "hu"


def test_resampling_in_simulation_and_origin(blob_volume):
    volume, _, unit = blob_volume
    scan = simulate_scan(unit, volume.dVoxel, 3, input_units="unit", shape=(10, 14, 12), origin=(10.0, 20.0, 30.0))
    assert scan.ground_truth.shape == (10, 14, 12) and scan.geometry.dVoxel == pytest.approx((3.0, 2.5, 2.5))
    # Voxel [0,0,0] of the coarser grid is centred half a new voxel minus half an old one further on.
    assert scan.meta["origin"] == pytest.approx([10.625, 20.625, 30.75])
    assert scan.meta["source_shape"] == [20, 28, 24] and scan.meta["resampling"].startswith("trilinear")
    by_spacing = simulate_scan(unit, volume.dVoxel, 3, input_units="unit", spacing_out=(3.0, 2.5, 2.5))
    assert by_spacing.ground_truth.shape == (10, 14, 12)


@pytest.mark.parametrize("volume, kwargs, message", [
    (np.random.default_rng(0).uniform(0, 1, (4, 5, 6)), {}, "input_units='unit'"),
    (np.full((4, 5, 6), 1000.0), {"input_units": "unit"}, "input_units='hu'"),
    (np.zeros((5, 6)), {}, "3-D"),
    (np.where(np.eye(6)[None, :5, :] > 0, np.nan, -1000.0) + np.zeros((4, 1, 1)), {}, "NaN"),
    (np.linspace(-1000, 1000, 120).reshape(4, 5, 6), {"shape": (2, 2, 2), "spacing_out": 2.0}, "not both"),
    (np.linspace(-1000, 1000, 120).reshape(4, 5, 6), {"n_views": 0}, "views"),
    (np.linspace(-1000, 1000, 120).reshape(4, 5, 6), {"electronic_sigma": 3.0}, "dose"),
    (np.linspace(-1000, 1000, 120).reshape(4, 5, 6), {"arc": 7.0}, "arc"),
    (np.linspace(-1000, 1000, 120).reshape(4, 5, 6), {"input_units": "mu"}, "input_units"),
    (np.linspace(-1000, 1000, 120).reshape(4, 5, 6), {"DSO": 2.0}, "geometry"),
])
def test_bad_input_is_an_input_error(volume, kwargs, message):
    kwargs = {"n_views": 4, **kwargs}
    with pytest.raises(InputError, match=message):
        simulate_scan(volume, 1.0, **kwargs)


def test_regrid_keeps_the_measured_scan_and_averages_the_truth(tmp_path):
    """A coarser reconstruction grid: same extent and centre, the projections and detector untouched, the
    ground truth block-averaged; the CLI reconstructs on it and says so."""
    from cli_helpers import run_cli
    from ctrecon.core.io import save_scan
    from ctrecon.operators.projector import Projector

    grid = VolumeGeometry((12, 24, 24), (2.0, 1.0, 1.0))
    truth = 0.3 * gaussian_volume(random_gaussian_blobs(grid, n=6, seed=1, sigma_range=(0.15, 0.3)), grid).astype(np.float32)
    scan = simulate_scan(truth, grid.dVoxel, 24, input_units="unit")
    coarse = regrid_scan(scan, 2.0)
    assert coarse.geometry.nVoxel == (12, 12, 12) and coarse.geometry.dVoxel == (2.0, 2.0, 2.0)
    assert coarse.geometry.sVoxel == scan.geometry.sVoxel and coarse.geometry.offOrigin == scan.geometry.offOrigin
    np.testing.assert_array_equal(coarse.projections, scan.projections)
    np.testing.assert_allclose(coarse.geometry.pixel_positions(), scan.geometry.pixel_positions())
    block = scan.ground_truth.reshape(12, 12, 2, 12, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(coarse.ground_truth, block, rtol=1e-6)
    # the coarse grid's projection of the averaged (smooth) truth is close to the measured projections
    fine_projection = Projector(scan.geometry)(torch.from_numpy(scan.ground_truth))
    coarse_projection = Projector(coarse.geometry)(torch.from_numpy(coarse.ground_truth))
    assert float((coarse_projection - fine_projection).norm() / fine_projection.norm()) < 0.05
    save_scan(tmp_path / "scan.npz", scan)
    code, out, err = run_cli(["reconstruct", tmp_path / "scan.npz", "--method", "sart", "--iters", "2",
                              "--grid-spacing", "2", "--out", tmp_path / "run"])
    assert code == 0, err
    assert "grid: 12x12x12 voxels at 2x2x2 mm (the scan's: 12x24x24 at 2x1x1 mm)" in out
    code, out, err = run_cli(["reconstruct", tmp_path / "scan.npz", "--method", "sart", "--grid-spacing", "2,0",
                              "--out", tmp_path / "bad"])
    assert code == 2 and "--grid-spacing" in err and not (tmp_path / "bad").exists()
