"""priors.data: discovery, preprocessing, crops, augmentation, caching and the step-wise data order."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from ctrecon.core.errors import InputError
from priors.data import (CropDataset, DataConfig, StepBatches, VolumeStore, augment, find_volumes, preprocess,
                         resample_isotropic, sample_crop)

CT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct"
SMALL_CT = CT_DIR / "abdomen_ts_example_small.nii.gz"  # 122×101×30 (x, y, z) at 3 mm
needs_ct = pytest.mark.skipif(not SMALL_CT.exists(), reason=f"real CT not available at {SMALL_CT}")


@pytest.fixture
def ct_folder(tmp_path):
    if not SMALL_CT.exists():
        pytest.skip(f"real CT not available at {SMALL_CT}")
    folder = tmp_path / "ct"
    folder.mkdir()
    shutil.copy(SMALL_CT, folder / "case.nii.gz")
    return folder


def test_find_volumes_layouts(tmp_path):
    atlas = tmp_path / "atlas"
    for case in ("BDMAP_00000002", "BDMAP_00000001"):
        (atlas / case / "segmentations").mkdir(parents=True)
        (atlas / case / "ct.nii.gz").write_bytes(b"")
        (atlas / case / "segmentations" / "liver.nii.gz").write_bytes(b"")
    files, layout = find_volumes(atlas)
    assert layout == "AbdomenAtlas1.0Mini"
    assert [f.parent.name for f in files] == ["BDMAP_00000001", "BDMAP_00000002"]
    plain = tmp_path / "plain"
    (plain / "sub").mkdir(parents=True)
    (plain / "a.nii").write_bytes(b"")
    (plain / "sub" / "b.nii.gz").write_bytes(b"")
    (plain / "notes.txt").write_bytes(b"")
    files, layout = find_volumes(plain)
    assert layout == "nifti" and [f.name for f in files] == ["a.nii", "b.nii.gz"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError):
        find_volumes(tmp_path / "empty")
    with pytest.raises(InputError):
        find_volumes(tmp_path / "missing")


def test_resampling_matches_scipy_on_an_anisotropic_grid():
    rng = np.random.default_rng(0)
    volume = rng.random((9, 14, 11)).astype(np.float32)
    spacing = (3.0, 0.9, 1.2)
    out = resample_isotropic(volume, spacing, 1.5)
    assert out.shape == tuple(int(np.floor(n * d / 1.5 + 1e-6)) for n, d in zip(volume.shape, spacing))
    # Output centre o along an axis lies at input index (o + ½)·1.5/d − ½ (spacing exactly 1.5 mm).
    coords = np.meshgrid(*[(np.arange(n) + 0.5) * 1.5 / d - 0.5 for n, d in zip(out.shape, spacing)], indexing="ij")
    expected = ndimage.map_coordinates(volume.astype(np.float64), coords, order=1, mode="nearest")
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_window_scaling():
    hu = np.array([[[-1000.0, -175.0, 37.5, 250.0, 1000.0]]])
    out = preprocess(hu, (1.5, 1.5, 1.5), DataConfig())
    np.testing.assert_allclose(out[0, 0], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    unit = preprocess(hu, (1.5, 1.5, 1.5), DataConfig(window_hu=(-1024, 3071)))
    np.testing.assert_allclose(unit[0, 0], (np.clip(hu[0, 0], -1024, 3071) + 1024) / 4095, atol=1e-6)


def test_crops_follow_the_foreground_ratio_and_pad_small_volumes():
    volume = np.zeros((60, 60, 60), np.float32)
    volume[20:40, 20:40, 20:40] = 1.0
    store_fg, store_bg = np.argwhere(volume > 0.5), np.argwhere(volume <= 0.5)
    rng = np.random.default_rng(0)
    centre_values = [sample_crop(volume, store_fg, store_bg, 16, 1.0, rng)[8, 8, 8] for _ in range(20)]
    assert all(v == 1.0 for v in centre_values)
    centre_values = [sample_crop(volume, store_fg, store_bg, 16, 0.0, rng)[8, 8, 8] for _ in range(20)]
    assert all(v == 0.0 for v in centre_values)
    picks = [sample_crop(volume, store_fg, store_bg, 16, 0.75, rng)[8, 8, 8] for _ in range(400)]
    assert 0.68 < np.mean(picks) < 0.82
    small = np.ones((5, 20, 7), np.float32)
    crop = sample_crop(small, np.argwhere(small > 0), np.zeros((0, 3), int), 16, 0.75, rng)
    assert crop.shape == (16, 16, 16)
    # z and x are zero-padded (centred), y (20 > 16) is cropped
    assert crop.sum() == 5 * 16 * 7 and crop[5:10, :, 4:11].sum() == 5 * 16 * 7


def test_augmentations():
    crop = np.random.default_rng(1).random((8, 8, 8)).astype(np.float32)
    rng = np.random.default_rng(0)
    off = DataConfig(flip_prob=0, rotate_prob=0, scale_prob=0, shift_prob=0)
    np.testing.assert_array_equal(augment(crop, off, rng), crop)
    flips = DataConfig(flip_prob=1, rotate_prob=0, scale_prob=0, shift_prob=0)
    np.testing.assert_array_equal(augment(crop, flips, rng), crop[::-1, ::-1, ::-1])
    rotated = augment(crop, DataConfig(flip_prob=0, rotate_prob=1, scale_prob=0, shift_prob=0), rng)
    assert any(np.array_equal(rotated, np.rot90(crop, k, axes=(1, 2))) for k in (1, 2, 3))
    scaled = augment(crop, DataConfig(flip_prob=0, rotate_prob=0, scale_prob=1, shift_prob=0), rng)
    factor = scaled.sum() / crop.sum()
    assert 0.9 <= factor <= 1.1 and np.allclose(scaled, crop * factor, rtol=1e-5)
    shifted = augment(crop, DataConfig(flip_prob=0, rotate_prob=0, scale_prob=0, shift_prob=1), rng)
    offset = float((shifted - crop).mean())
    assert abs(offset) <= 0.1 and np.allclose(shifted, crop + offset, atol=1e-6)


@needs_ct
def test_real_ct_preprocessing_and_cache(ct_folder, tmp_path):
    from ctrecon.core.io import load_volume

    volume, spacing = load_volume(ct_folder / "case.nii.gz")
    cfg = DataConfig()
    unit = preprocess(volume, spacing, cfg)
    assert unit.shape == tuple(int(n * d / 1.5 + 1e-6) for n, d in zip(volume.shape, spacing))
    assert unit.min() >= 0.0 and unit.max() <= 1.0 and 0.05 < unit.mean() < 0.9
    store = VolumeStore([ct_folder / "case.nii.gz"], cfg, cache_dir=tmp_path / "cache")
    fresh, fg, bg = store.get(0)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    cached, fg2, bg2 = VolumeStore([ct_folder / "case.nii.gz"], cfg, cache_dir=tmp_path / "cache").get(0)
    np.testing.assert_allclose(cached, unit, atol=1e-5)
    np.testing.assert_array_equal(fg, fg2)
    assert len(fg) and len(bg)


@needs_ct
def test_dataset_items_are_deterministic_and_worker_independent(ct_folder):
    dataset = CropDataset(sorted(ct_folder.glob("*.nii.gz")), DataConfig(crop_size=32, crops_per_volume=2), seed=3)
    first = dataset[5]
    assert first["image"].shape == (1, 32, 32, 32) and first["image"].dtype == torch.float32
    again = dataset[5]
    assert torch.equal(first["image"], again["image"]) and int(first["seed"]) == int(again["seed"])
    assert not torch.equal(dataset[6]["image"], first["image"])
    sampler = StepBatches(1, 3, batch=4)
    serial = [b for b in torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=0)]
    parallel = [b for b in torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=2)]
    assert len(serial) == 2
    for a, b in zip(serial, parallel):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["seed"], b["seed"])


def test_epoch_order_visits_every_volume_crops_per_volume_times():
    dataset = CropDataset([f"v{i}.nii.gz" for i in range(5)], DataConfig(crops_per_volume=3), seed=0)
    epoch0 = [dataset.volume_of(g) for g in range(15)]
    epoch1 = [dataset.volume_of(g) for g in range(15, 30)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(list(range(5)) * 3)
    assert epoch0[:3] == [epoch0[0]] * 3 and epoch0 != epoch1


def test_step_batches_partition_each_step():
    one = list(StepBatches(2, 4, batch=8))
    assert one == [list(range(16, 24)), list(range(24, 32))]
    shards = [list(StepBatches(2, 4, batch=8, rank=r, world=2, accum=2)) for r in range(2)]
    for step in range(2):
        items = sorted(i for r in range(2) for micro in shards[r][2 * step:2 * step + 2] for i in micro)
        assert items == one[step]
    with pytest.raises(InputError):
        StepBatches(0, 1, batch=6, world=4)


@needs_ct
def test_corrupted_items_share_the_clean_crop_and_are_pure_functions_of_the_index(ct_folder, tmp_path):
    """MDAE-style inputs: the clean target is the very crop of the uncorrupted dataset; the FDK input is
    the same region of a cached sparse-view FDK of the volume; the noise input the crop plus σ·z."""
    files = sorted(ct_folder.glob("*.nii.gz"))
    base = dict(crop_size=32, crops_per_volume=2, spacing_mm=3.0, window_hu=(-1024.0, 3071.0))
    clean = CropDataset(files, DataConfig(**base), seed=3, cache_dir=tmp_path / "cache")
    fdk_config = DataConfig(**base, corruption="fdk", fdk_views=(40, 80), fdk_variants=2)
    fdk = CropDataset(files, fdk_config, seed=3, cache_dir=tmp_path / "cache")
    noise = CropDataset(files, DataConfig(**base, corruption="noise", noise_sigma_max=0.05), seed=3,
                        cache_dir=tmp_path / "cache")
    for item in (0, 5):
        target = clean[item]
        for dataset in (fdk, noise):
            got = dataset[item]
            assert torch.equal(got["image"], target["image"]) and int(got["seed"]) == int(target["seed"])
            assert got["input"].shape == got["image"].shape and not torch.equal(got["input"], got["image"])
        streaky = fdk[item]["input"].flatten().numpy()
        truth = target["image"].flatten().numpy()
        assert np.corrcoef(streaky, truth)[0, 1] > 0.9                     # the same region, lined up
        assert 0.0 < float((noise[item]["input"] - target["image"]).abs().mean()) < 0.05
    assert len(list((tmp_path / "cache").glob("*.npy"))) >= 2              # the volume and its FDK twins
    again = CropDataset(files, fdk_config, seed=3, cache_dir=tmp_path / "cache")[5]
    assert torch.equal(again["input"], fdk[5]["input"])                    # from the cache, identical
    assert [fdk_config.fdk_view_count(v) for v in range(2)] == [40, 80]
    # with a dose range each scan gets photon noise at its own dose; the noiseless twins stay as they were
    dosed_config = DataConfig(**base, corruption="fdk", fdk_views=(40, 80), fdk_variants=2, fdk_dose=(1e4, 1e5))
    dosed = CropDataset(files, dosed_config, seed=3, cache_dir=tmp_path / "cache")
    doses = [dosed_config.fdk_dose_of(v) for v in range(4)]
    assert fdk_config.fdk_dose_of(1) is None and all(1e4 <= d <= 1e5 for d in doses) and len(set(doses)) == 4
    for item in (0, 5):
        noisy, noiseless = dosed[item], fdk[item]
        assert torch.equal(noisy["image"], noiseless["image"])
        excess = float(((noisy["input"] - noisy["image"]) ** 2).mean() - ((noiseless["input"] - noiseless["image"]) ** 2).mean())
        assert excess > 0                                                  # photon noise on top of the streaks
        assert np.corrcoef(noisy["input"].flatten().numpy(), noisy["image"].flatten().numpy())[0, 1] > 0.8
    assert torch.equal(CropDataset(files, dosed_config, seed=3, cache_dir=tmp_path / "cache")[5]["input"], dosed[5]["input"])
    with pytest.raises(InputError, match="fdk_dose"):
        DataConfig(corruption="fdk", fdk_dose=(1e5, 1e4))
    with pytest.raises(InputError, match="corruption must be one of"):
        DataConfig(corruption="blur")
    with pytest.raises(InputError, match="fdk_views"):
        DataConfig(corruption="fdk", fdk_views=(90, 60))
