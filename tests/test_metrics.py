"""PSNR / SSIM against scikit-image (the oracle), input handling, and the convergence tracker."""
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import ctrecon.pipeline.metrics as metrics
from ctrecon.core.errors import InputError
from ctrecon.core.geometry import VolumeGeometry
from ctrecon.pipeline.metrics import ConvergenceTracker, evaluate, psnr, ssim3d, ssim_slice
from ctrecon.core.phantoms import ellipsoid_volume, shepp_logan_3d

CT_FILE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct" / "abdomen_ts_example_small.nii.gz"


def skimage_ssim3d(x, ref):
    return structural_similarity(x, ref, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0)


def skimage_ssim_slice(x, ref, data_range=1.0):
    return float(np.mean([structural_similarity(a, b, win_size=7, data_range=data_range) for a, b in zip(x, ref)]))


def skimage_3dgr_code_ssim(x, ref):
    """What 3DGR-CT's train_ct_recon.py computes: ``compare_ssim(pred, gt, multichannel=True)`` on float
    volumes whose last axis is the slice axis, with the float dtype range [-1, 1] of scikit-image < 0.20."""
    return float(structural_similarity(np.moveaxis(x, 0, -1), np.moveaxis(ref, 0, -1), channel_axis=-1, win_size=7,
                                       data_range=2.0))


def degraded(ref, seed=0, noise=0.05, blur=1.0):
    """A plausible reconstruction of ``ref``: blurred, noisy, clipped to [0, 1]."""
    rng = np.random.default_rng(seed)
    return np.clip(ndimage.gaussian_filter(ref, blur) + noise * rng.standard_normal(ref.shape), 0, 1)


def phantom(shape=(24, 40, 36)):
    return ellipsoid_volume(shepp_logan_3d(VolumeGeometry(shape, (1.0, 1.0, 1.0))), VolumeGeometry(shape, (1, 1, 1)),
                            supersample=1).astype(np.float64) * 4  # values spread over [0, 1]


def real_ct_unit():
    if not CT_FILE.is_file():
        pytest.skip(f"real CT volume {CT_FILE} is absent")
    from ctrecon.core.io import load_volume

    hu, _ = load_volume(CT_FILE)
    return (np.clip(hu[:, 10:90, 10:110].astype(np.float64), -1024, 3071) + 1024) / 4095


@pytest.mark.parametrize("case", ["random", "random_min_size", "phantom", "real_ct"])
def test_metrics_match_scikit_image(case):
    rng = np.random.default_rng(1)
    if case == "random":
        ref = rng.random((15, 23, 19))
        x = np.clip(ref + 0.2 * rng.standard_normal(ref.shape), 0, 1)
    elif case == "random_min_size":  # 11 voxels: a single valid window position along z
        ref = rng.random((11, 12, 30))
        x = degraded(ref, noise=0.1)
    elif case == "phantom":
        ref = phantom()
        x = degraded(ref)
    else:
        ref = real_ct_unit()
        x = degraded(ref, noise=0.01, blur=0.7)
    assert ssim3d(x, ref) == pytest.approx(skimage_ssim3d(x, ref), abs=1e-9)
    assert ssim_slice(x, ref) == pytest.approx(skimage_ssim_slice(x, ref), abs=1e-9)
    assert evaluate(x, ref)["ssim_slice_3dgr_code"] == pytest.approx(skimage_3dgr_code_ssim(x, ref), abs=1e-9)
    assert psnr(x, ref) == pytest.approx(peak_signal_noise_ratio(ref, x, data_range=1.0), abs=1e-9)


def test_border_handling_matches_scikit_image():
    """Differences confined to the outer voxels enter only through the windows that skimage keeps."""
    rng = np.random.default_rng(2)
    ref = rng.random((16, 18, 20))
    x = ref.copy()
    border = np.ones(ref.shape, bool)
    border[6:-6, 6:-6, 6:-6] = False
    x[border] = rng.random(int(border.sum()))
    assert ssim3d(x, ref) == pytest.approx(skimage_ssim3d(x, ref), abs=1e-9)
    assert ssim_slice(x, ref) == pytest.approx(skimage_ssim_slice(x, ref), abs=1e-9)
    x_outer = ref.copy()
    x_outer[0] = rng.random(ref.shape[1:])  # only the first slice differs
    assert ssim3d(x_outer, ref) == pytest.approx(skimage_ssim3d(x_outer, ref), abs=1e-9) and ssim3d(x_outer, ref) < 1


def test_data_range_and_identity():
    ref = phantom()
    x = degraded(ref)
    for scale in (255.0, 0.5):
        assert ssim3d(x * scale, ref * scale, data_range=scale) == pytest.approx(ssim3d(x, ref), abs=1e-9)
        assert ssim_slice(x * scale, ref * scale, data_range=scale) == pytest.approx(ssim_slice(x, ref), abs=1e-9)
        assert psnr(x * scale, ref * scale, data_range=scale) == pytest.approx(psnr(x, ref), abs=1e-9)
    assert ssim3d(ref, ref) == pytest.approx(1.0) and ssim_slice(ref, ref) == pytest.approx(1.0)
    assert psnr(ref, ref) == float("inf")
    assert psnr(np.zeros(10), np.full(10, 0.1)) == pytest.approx(20.0)  # 10·log10(1 / 0.01)


def test_torch_inputs_any_dtype_and_mixed():
    ref = phantom()
    x = degraded(ref)
    expected = evaluate(x, ref)
    assert tuple(expected) == metrics.QUALITY_METRICS
    got = evaluate(torch.from_numpy(x), ref)
    assert got == pytest.approx(expected, abs=1e-12)
    x32 = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    got32 = evaluate(x32, torch.tensor(ref, dtype=torch.float32))
    assert all(isinstance(v, float) for v in got32.values())
    assert got32 == pytest.approx(evaluate(x.astype(np.float32).astype(np.float64), ref.astype(np.float32)), abs=1e-9)
    assert got32 == pytest.approx(expected, abs=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_match_cpu():
    ref = phantom()
    x = degraded(ref)
    on_gpu = evaluate(torch.tensor(x, device="cuda"), torch.tensor(ref, device="cuda", dtype=torch.float32))
    assert on_gpu == pytest.approx(evaluate(x, ref.astype(np.float32)), abs=1e-9)


def test_chunked_ssim_equals_one_pass(monkeypatch):
    ref = phantom((30, 20, 22))
    x = degraded(ref)
    whole = (ssim3d(x, ref), ssim_slice(x, ref))
    monkeypatch.setattr(metrics, "_CHUNK_VOXELS", 3 * 20 * 22)  # three output slices a chunk, ragged end
    assert (ssim3d(x, ref), ssim_slice(x, ref)) == pytest.approx(whole, abs=1e-12)


def test_bad_inputs():
    ref = np.random.default_rng(3).random((12, 12, 12))
    with pytest.raises(InputError, match="shape mismatch"):
        psnr(ref[1:], ref)
    bad = ref.copy()
    bad[3, 3, 3] = np.nan
    for fn in (psnr, ssim3d, ssim_slice):
        with pytest.raises(InputError, match="x contains NaN"):
            fn(bad, ref)
        with pytest.raises(InputError, match="ref contains NaN"):
            fn(ref, torch.from_numpy(bad))
        with pytest.raises(InputError, match="data_range"):
            fn(ref, ref, data_range=0)
    with pytest.raises(InputError, match="3-D"):
        ssim3d(ref[0], ref[0])
    with pytest.raises(InputError, match="at least 11"):
        ssim3d(ref[:10], ref[:10])
    with pytest.raises(InputError, match="at least 7"):
        ssim_slice(ref[:, :6], ref[:, :6])
    assert ssim_slice(ref[:2], ref[:2]) == pytest.approx(1.0)  # a thin slab is fine slice-wise
    with pytest.raises(InputError, match="real numbers"):
        psnr(np.array(["a"]), np.array(["b"]))


def test_convergence_tracker_records_first_crossings():
    tracker = ConvergenceTracker()
    assert tracker.summary() == {"psnr35": None, "ssim90": None}
    assert tracker.update(100, 1.5, psnr=30.0, ssim_slice=0.91, ssim3d=0.80) == ["ssim90"]
    assert tracker.update(200, 3.0, psnr=34.99, ssim_slice=0.85) == []
    assert tracker.update(300, 4.5, psnr=np.float32(35.2), ssim_slice=0.95) == ["psnr35"]
    assert tracker.update(400, 6.0, psnr=36.0, ssim_slice=0.97) == []
    assert tracker.summary() == {"psnr35": {"iteration": 300, "seconds": 4.5},
                                 "ssim90": {"iteration": 100, "seconds": 1.5}}
    assert tracker.all_reached
    assert [row["iteration"] for row in tracker.history] == [100, 200, 300, 400]
    assert tracker.history[0] == {"iteration": 100, "seconds": 1.5, "psnr": 30.0, "ssim_slice": 0.91, "ssim3d": 0.80}
    assert isinstance(tracker.history[2]["psnr"], float)
    with pytest.raises(InputError, match="go back"):
        tracker.update(350, 7.0, psnr=40.0)
    with pytest.raises(KeyError):
        tracker.reached("psnr40")


def test_convergence_tracker_custom_metric_and_missing_values():
    tracker = ConvergenceTracker([("ssim3d90", "ssim3d", 0.9), ("psnr30", "psnr", 30)])
    tracker.update(10, 0.1, psnr=31.0, ssim_slice=0.99)  # ssim_slice does not count for ssim3d90
    tracker.update(20, 0.2, psnr=float("nan"), ssim3d=0.93)
    assert tracker.summary() == {"ssim3d90": {"iteration": 20, "seconds": 0.2},
                                 "psnr30": {"iteration": 10, "seconds": 0.1}}
    with pytest.raises(InputError, match="unique"):
        ConvergenceTracker([("a", "psnr", 1), ("a", "psnr", 2)])
    with pytest.raises(InputError, match="name, metric, value"):
        ConvergenceTracker([("a", "psnr")])


def test_threshold_names_and_labels_follow_their_values():
    assert metrics.quality_thresholds(35.0, 0.9) == (("psnr35", "psnr", 35.0), ("ssim90", "ssim_slice", 0.9))
    assert metrics.quality_thresholds(30, 0.95, "ssim3d") == (("psnr30", "psnr", 30.0), ("ssim95", "ssim3d", 0.95))
    assert metrics.threshold_key("psnr", 32.5) == "psnr32.5" and metrics.threshold_key("ssim", 0.925) == "ssim92.5"
    assert metrics.threshold_label("psnr", 30.0) == "PSNR 30 dB" and metrics.threshold_label("ssim", 0.95) == "SSIM 0.95"
