"""Volume and scan I/O: the LPS convention on synthetic NIfTI/DICOM with known positions and on the
real CT volumes in ../shared/data/ct, every refusal path, atomic writes and scan files."""
import json
import os
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from ctrecon.core.errors import InputError
from ctrecon.core.geometry import ConeBeamGeometry, VolumeGeometry
from ctrecon.core.units import hu_to_unit
from ctrecon.core.io import (Scan, SkippedSlicesWarning, atomic_output, load_scan, load_volume, read_volume, save_scan,
                             save_volume, write_json)

CT_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def one_line_error(call, *args, match: str, **kwargs) -> str:
    """The InputError that ``call`` raises: its message must be one line and match ``match``."""
    with pytest.raises(InputError, match=match) as info:
        call(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.fixture
def volume_lps():
    """A small integer-valued volume [Z, Y, X] (distinct values, so any flip or permutation shows)."""
    rng = np.random.default_rng(7)
    return rng.integers(-1000, 2000, size=(5, 6, 7)).astype(np.float32)


# ----------------------------------------------------------------------------- synthetic DICOM
def lps_position(index_zyx, spacing, origin):
    """LPS (x, y, z) mm of voxel (k, j, i) of a [Z, Y, X] LPS volume."""
    k, j, i = index_zyx
    dz, dy, dx = spacing
    return np.array(origin, float) + np.array([i * dx, j * dy, k * dz])


def acquire(volume, spacing, origin, row_dir, col_dir):
    """Slice a [Z, Y, X] LPS volume as a scanner would for ImageOrientationPatient (row_dir, col_dir):
    returns the images [S, R, C], their ImagePositionPatient [S, 3], PixelSpacing (row, col) and the
    slice step. Each direction is a signed LPS unit axis."""
    directions = [np.cross(row_dir, col_dir), np.asarray(col_dir), np.asarray(row_dir)]  # slice, row, col
    axes, flips = [], []
    for d in directions:
        lps_axis = int(np.argmax(np.abs(d)))
        axes.append(2 - lps_axis)  # LPS x, y, z are array axes 2, 1, 0
        flips.append(d[lps_axis] < 0)
    images = volume.transpose(axes)
    for axis, flip in enumerate(flips):
        if flip:
            images = np.flip(images, axis)
    images = np.ascontiguousarray(images)
    positions = []
    for s in range(images.shape[0]):
        index = [0, 0, 0]
        for acq_axis, (arr_axis, flip) in enumerate(zip(axes, flips)):
            pos = s if acq_axis == 0 else 0
            index[arr_axis] = volume.shape[arr_axis] - 1 - pos if flip else pos
        positions.append(lps_position(index, spacing, origin))
    return images, np.array(positions), (spacing[axes[1]], spacing[axes[2]]), spacing[axes[0]]


def write_slice(path, pixels, position, orientation=(1, 0, 0, 0, 1, 0), pixel_spacing=(1.0, 1.0), *,
                series_uid="1.2.3.4", instance=1, slope=1.0, intercept=-1024.0, preamble=True):
    """One uncompressed CT DICOM file; ``pixels`` are stored raw (uint16)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, implicit_vr=False, little_endian=True)


def write_series(folder, volume, spacing=(2.5, 0.8, 0.7), origin=(-10.0, 20.0, -30.0), *, row_dir=(1, 0, 0),
                 col_dir=(0, 1, 0), slope=1.0, intercept=-1024.0, series_uid="1.2.3.4", positions=None,
                 shuffle=True):
    """Write a [Z, Y, X] LPS volume in HU as a DICOM series (files in shuffled order); returns the paths
    in slice order. ``positions`` overrides the ImagePositionPatient of each slice."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, ipps, pixel_spacing, _ = acquire(volume, spacing, origin, np.array(row_dir), np.array(col_dir))
    ipps = ipps if positions is None else np.asarray(positions, float)
    order = list(range(len(images)))
    if shuffle:
        random.Random(3).shuffle(order)
    paths = [None] * len(images)
    for n, s in enumerate(order):  # file names unrelated to the slice order
        paths[s] = folder / f"img{n:03d}_{series_uid[-1]}.dcm"
        raw = np.rint((images[s] - intercept) / slope)
        write_slice(paths[s], raw, ipps[s], (*row_dir, *col_dir), pixel_spacing, series_uid=series_uid,
                    instance=s + 1, slope=slope, intercept=intercept)
    return paths


@pytest.mark.parametrize("row_dir, col_dir", [
    ((1, 0, 0), (0, 1, 0)),     # axial, the usual
    ((-1, 0, 0), (0, -1, 0)),   # axial, rotated 180° in-plane
    ((1, 0, 0), (0, 0, -1)),    # coronal: slices stack towards posterior
    ((0, 1, 0), (0, 0, -1)),    # sagittal: slices stack towards the left
    ((0, 1, 0), (1, 0, 0)),     # axial with rows/columns swapped: normal points inferior
])
def test_dicom_series_loads_to_lps(tmp_path, volume_lps, row_dir, col_dir):
    spacing, origin = (2.5, 0.8, 0.7), (-10.0, 20.0, -30.0)
    write_series(tmp_path, volume_lps, spacing, origin, row_dir=row_dir, col_dir=col_dir)
    loaded = read_volume(tmp_path)
    np.testing.assert_array_equal(loaded.array, volume_lps)
    assert loaded.spacing == pytest.approx(spacing)
    assert loaded.origin == pytest.approx(origin)
    assert load_volume(tmp_path)[1] == pytest.approx(spacing)


def test_dicom_rescale_and_single_file_selects_its_series(tmp_path, volume_lps):
    even = 2 * np.round(volume_lps / 2)
    paths = write_series(tmp_path, even, slope=2.0, intercept=-1024.0, series_uid="1.2.3.5")
    write_series(tmp_path, volume_lps[:, :, ::-1], series_uid="1.2.3.6")  # a second series in the folder
    array, _ = load_volume(paths[2])
    np.testing.assert_array_equal(array, even)
    assert array.dtype == np.float32


def test_dicom_without_preamble_and_with_extra_files(tmp_path, volume_lps):
    write_series(tmp_path, volume_lps)
    first = sorted(tmp_path.glob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    first.unlink()
    write_slice(tmp_path / "raw_slice", ds.pixel_array, ds.ImagePositionPatient, ds.ImageOrientationPatient,
                ds.PixelSpacing, instance=ds.InstanceNumber, preamble=False)
    (tmp_path / "README.txt").write_text("not DICOM")
    (tmp_path / ".DS_Store").write_bytes(b"\0" * 300)
    np.testing.assert_array_equal(load_volume(tmp_path)[0], volume_lps)


def test_dicom_refusals(tmp_path, volume_lps):
    def series(name, **kwargs):
        folder = tmp_path / name
        write_series(folder, volume_lps, **kwargs)
        return folder

    mixed = series("mixed", series_uid="1.2.3.7")
    write_series(mixed, volume_lps, series_uid="1.2.3.8")
    one_line_error(load_volume, mixed, match="mixes 2 DICOM series")

    resized = series("resized")
    write_slice(resized / "extra.dcm", np.zeros((3, 3)), (-10, 20, 100), series_uid="1.2.3.4")
    one_line_error(load_volume, resized, match="differ in size")

    turned = series("turned")
    path = sorted(turned.glob("*.dcm"))[1]
    ds = pydicom.dcmread(path)
    ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    ds.save_as(path)
    one_line_error(load_volume, turned, match="differ in ImageOrientationPatient")

    _, ipps, _, step = acquire(volume_lps, (2.5, 0.8, 0.7), (-10, 20, -30), np.array([1, 0, 0]), np.array([0, 1, 0]))
    tilted = ipps + np.outer(np.arange(len(ipps)), [0.0, step * np.tan(np.radians(15)), 0.0])
    message = one_line_error(load_volume, series("tilt", positions=tilted), match="gantry tilt", allow_resample=True)
    assert "15.0" in message

    oblique = tmp_path / "oblique"
    oblique.mkdir()
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    for k in range(3):
        write_slice(oblique / f"{k}.dcm", np.zeros((4, 4)), (0, 0, 2.0 * k), (c, s, 0, -s, c, 0), instance=k + 1)
    one_line_error(load_volume, oblique, match="oblique")

    uneven = ipps.copy()
    uneven[3:, 2] += 1.0
    one_line_error(load_volume, series("uneven", positions=uneven), match="non-uniform slice spacing")

    duplicated = ipps.copy()
    duplicated[3] = duplicated[2]
    one_line_error(load_volume, series("duplicate", positions=duplicated), match="duplicate slice position")

    gap = series("gap", shuffle=False)
    sorted(gap.glob("*.dcm"))[2].unlink()
    one_line_error(load_volume, gap, match="missing slice")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    one_line_error(load_volume, empty, match="no DICOM images")

    single = tmp_path / "single"
    single.mkdir()
    write_slice(single / "a.dcm", np.zeros((4, 4)), (0, 0, 0))
    one_line_error(load_volume, single, match="single DICOM image")

    broken = series("broken")
    path = sorted(broken.glob("*.dcm"))[0]
    path.write_bytes(path.read_bytes()[:-40])  # truncated pixel data
    one_line_error(load_volume, broken, match="cannot decode pixel data")

    for end in (0, -1):  # a slice at either end of the series would vanish without a word
        pixelless = series(f"pixelless{end}", shuffle=False)
        path = sorted(pixelless.glob("*.dcm"))[end]
        ds = pydicom.dcmread(path)
        del ds.PixelData
        ds.save_as(path)
        one_line_error(load_volume, pixelless, match=f"{path.name} is a slice of the series without pixel data")
        garbled = series(f"garbled{end}", shuffle=False)
        path = sorted(garbled.glob("*.dcm"))[end]
        path.write_bytes(os.urandom(300))
        one_line_error(load_volume, garbled, match=f"{path.name} cannot be read")

    # ...unless the user asks to skip them: then they are left out with a warning that names them
    whole = read_volume(series("whole", shuffle=False))
    both = series("both", shuffle=False)
    files = sorted(both.glob("*.dcm"))
    ds = pydicom.dcmread(files[0])
    del ds.PixelData
    ds.save_as(files[0])
    files[-1].write_bytes(os.urandom(300))
    with pytest.warns(SkippedSlicesWarning, match=f"left out 2 DICOM file.*{files[0].name} .*without pixel data.*"
                                                  f"{files[-1].name} .*cannot be read"):
        kept = read_volume(both, skip_bad_slices=True)
    np.testing.assert_array_equal(kept.array, whole.array[1:-1])  # the slices between, in place
    assert kept.spacing == whole.spacing
    inner = series("inner", shuffle=False)
    sorted(inner.glob("*.dcm"))[2].write_bytes(os.urandom(300))
    with pytest.warns(SkippedSlicesWarning):
        one_line_error(read_volume, inner, skip_bad_slices=True, match="missing slice")  # a hole stays an error


def test_dicom_resample_non_uniform_and_missing(tmp_path):
    # A volume linear in z: linear interpolation along z reproduces it exactly at any position.
    z_mm = np.array([0.0, 2.0, 4.0, 5.0, 6.0, 10.0, 12.0])  # uneven steps and a gap
    def true(z):
        return np.broadcast_to((10.0 * z)[:, None, None] + np.arange(12).reshape(3, 4), (len(z), 3, 4))

    for k, z in enumerate(z_mm):
        write_slice(tmp_path / f"s{k}.dcm", true(np.array([z]))[0] + 1024, (5.0, -3.0, z), instance=k + 1)
    one_line_error(load_volume, tmp_path, match="missing slice|non-uniform")
    volume = read_volume(tmp_path, allow_resample=True)
    expected_z = np.linspace(0.0, 12.0, volume.array.shape[0])
    assert volume.array.shape[0] == 7  # span 12 mm at the median step of 2 mm
    assert volume.spacing[0] == pytest.approx(2.0)
    np.testing.assert_allclose(volume.array, true(expected_z), atol=1e-3)
    assert volume.origin == pytest.approx((5.0, -3.0, 0.0))
    assert "resampled" in volume.description


# ----------------------------------------------------------------------------- NIfTI
def nifti_storing(volume, spacing, origin, storage_axes, flips):
    """A NIfTI image holding the [Z, Y, X] LPS ``volume`` with its own storage axis order: storage
    axis a is LPS axis ``storage_axes[a]`` (0 = x, 1 = y, 2 = z), reversed where ``flips[a]``."""
    xyz = volume.transpose(2, 1, 0)
    data = xyz.transpose(storage_axes)
    spacing_xyz = spacing[::-1]
    columns = np.zeros((3, 3))
    first = [0, 0, 0]
    for a, (axis, flip) in enumerate(zip(storage_axes, flips)):
        if flip:
            data = np.flip(data, a)
            first[axis] = xyz.shape[axis] - 1
        columns[axis, a] = -spacing_xyz[axis] if flip else spacing_xyz[axis]
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = columns
    affine_lps[:3, 3] = lps_position(first[::-1], spacing, origin)
    return nib.Nifti1Image(np.ascontiguousarray(data), LPS_TO_RAS @ affine_lps)


@pytest.mark.parametrize("storage_axes, flips", [
    ((0, 1, 2), (False, False, False)),  # LPS on disk
    ((0, 1, 2), (True, True, False)),    # RAS on disk, the common case
    ((2, 0, 1), (True, False, True)),    # permuted and flipped
    ((1, 2, 0), (False, True, True)),
])
def test_nifti_any_storage_order_loads_to_the_same_lps_array(tmp_path, volume_lps, storage_axes, flips):
    spacing, origin = (3.0, 1.25, 0.5), (12.0, -7.0, 40.0)
    path = tmp_path / "v.nii.gz"
    nib.save(nifti_storing(volume_lps, spacing, origin, storage_axes, flips), path)
    loaded = read_volume(path)
    np.testing.assert_array_equal(loaded.array, volume_lps)
    assert loaded.spacing == pytest.approx(spacing)
    assert loaded.origin == pytest.approx(origin)


def test_centre_crop_keeps_every_voxel_at_its_world_position(tmp_path, volume_lps):
    """The crop's voxels sit where they sat in the file: nibabel's affine of the saved crop maps its
    voxel (i, j, k) to the same RAS point as the source affine maps the uncropped index."""
    path = tmp_path / "v.nii.gz"
    save_volume(path, volume_lps, (2.0, 0.5, 0.75), origin=(1.0, 2.0, 3.0))
    source = read_volume(path)
    size = (volume_lps.shape[0] - 1, volume_lps.shape[1] - 2, volume_lps.shape[2] - 3)
    crop = source.centre_crop(size)
    start = [(n - c) // 2 for n, c in zip(volume_lps.shape, size)]
    np.testing.assert_array_equal(crop.array, volume_lps[start[0]:start[0] + size[0], start[1]:start[1] + size[1],
                                                          start[2]:start[2] + size[2]])
    save_volume(tmp_path / "crop.nii.gz", crop.array, crop.spacing, crop.origin)
    cropped_affine, source_affine = nib.load(tmp_path / "crop.nii.gz").affine, nib.load(path).affine
    assert cropped_affine @ [1, 2, 3, 1] == pytest.approx(source_affine @ [1 + start[2], 2 + start[1], 3 + start[0], 1])
    assert source.centre_crop(volume_lps.shape).origin == pytest.approx(source.origin)
    for bad in ((0, 1, 1), volume_lps.shape[:2] + (volume_lps.shape[2] + 1,), (2, 2)):
        with pytest.raises(InputError, match="crop must be 3 sizes"):
            source.centre_crop(bad)


def test_save_volume_round_trip_and_viewer_orientation(tmp_path, volume_lps):
    path = tmp_path / "out.nii.gz"
    save_volume(path, volume_lps, (2.0, 0.5, 0.75), origin=(1.0, 2.0, 3.0))
    loaded = read_volume(path)
    np.testing.assert_array_equal(loaded.array, volume_lps)
    assert loaded.spacing == pytest.approx((2.0, 0.5, 0.75)) and loaded.origin == pytest.approx((1.0, 2.0, 3.0))
    image = nib.load(path)
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")  # what a viewer reads: x/y diagonal negative
    assert np.diag(image.affine)[:3] == pytest.approx([-0.75, -0.5, 2.0])
    assert image.header["sform_code"] == 1 and image.header["qform_code"] == 1
    # a voxel's RAS position is the LPS one with x and y negated
    assert image.affine @ [4, 3, 2, 1] == pytest.approx([-(1 + 4 * 0.75), -(2 + 3 * 0.5), 3 + 2 * 2.0, 1])
    save_volume(tmp_path / "plain.nii", volume_lps, (1, 1, 1))
    np.testing.assert_array_equal(load_volume(tmp_path / "plain.nii")[0], volume_lps)
    one_line_error(save_volume, tmp_path / "out.npy", volume_lps, (1, 1, 1), match="NIfTI")
    one_line_error(save_volume, tmp_path / "bad.nii", volume_lps[0], (1, 1, 1), match="3-D")
    one_line_error(save_volume, tmp_path / "bad.nii", volume_lps, (1, 0, 1), match="positive")
    assert not (tmp_path / "bad.nii").exists()


def test_nifti_refusals(tmp_path, volume_lps):
    def saved(name, data, affine=np.eye(4)):
        nib.save(nib.Nifti1Image(data, affine), tmp_path / name)
        return tmp_path / name

    one_line_error(load_volume, saved("flat.nii", volume_lps[0]), match="3-D volume is needed")
    one_line_error(load_volume, saved("series.nii", np.stack([volume_lps] * 2, -1)), match="3-D volume is needed")
    assert load_volume(saved("single_frame.nii", volume_lps[..., None]))[0].shape == (7, 6, 5)
    nan = volume_lps.copy()
    nan[1, 2, 3] = np.nan
    one_line_error(load_volume, saved("nan.nii", nan), match="NaN or Inf")
    rotated = np.eye(4)
    rotated[:2, :2] = [[np.cos(0.2), -np.sin(0.2)], [np.sin(0.2), np.cos(0.2)]]
    one_line_error(load_volume, saved("oblique.nii", volume_lps, rotated), match="oblique")
    sheared = np.eye(4)
    sheared[1, 2] = np.tan(np.radians(12))  # slices shifted in y along z: a gantry tilt
    one_line_error(load_volume, saved("tilt.nii", volume_lps, sheared), match="sheared")
    (tmp_path / "junk.nii.gz").write_bytes(b"\x1f\x8b" + os.urandom(200))
    one_line_error(load_volume, tmp_path / "junk.nii.gz", match="corrupt")
    good = saved("cut.nii.gz", volume_lps)
    good.write_bytes(good.read_bytes()[:-30])
    one_line_error(load_volume, good, match="corrupt.*cut short")
    one_line_error(load_volume, tmp_path / "absent.nii.gz", match="not found")
    zero = nib.Nifti1Image(volume_lps, None)
    zero.header.set_zooms((1.0, 0.0, 1.0))
    nib.save(zero, tmp_path / "zero.nii")
    one_line_error(load_volume, tmp_path / "zero.nii", match="voxel size is .* a size of 0")
    one_line_error(load_volume, saved("huge.nii", volume_lps, np.diag([1e9, 1e9, 1e9, 1.0])), match="is not a CT's")
    (tmp_path / "image.mha").write_bytes(b"ObjectType = Image\n")
    one_line_error(load_volume, tmp_path / "image.mha", match="unsupported volume format")
    one_line_error(load_volume, good.with_name("flat.nii"), match="carries its own", spacing=(1, 1, 1))


def test_corrupt_gzip_stream_is_refused_where_nibabel_reads_it(tmp_path):
    """nibabel reads a .nii.gz only as far as the voxels go: damage that zlib does not notice on the way (here
    the CRC-32 and the length in the stream's trailer) loads silently unless the whole stream is checked."""
    rng = np.random.default_rng(0)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(0, 500, (20, 24, 22)).astype(np.float32), np.eye(4)), path)
    intact = path.read_bytes()
    assert load_volume(path)[0].shape == (22, 24, 20)
    for offset in (8, 4):  # the CRC-32, then the length (ISIZE) of the trailer
        damaged = bytearray(intact)
        damaged[-offset] ^= 0x5A
        path.write_bytes(bytes(damaged))
        assert np.asanyarray(nib.load(path).dataobj).shape == (20, 24, 22)  # nibabel does not notice
        one_line_error(load_volume, path, match="ct.nii.gz is corrupt: its gzip stream fails its check")


# ----------------------------------------------------------------------------- .npy / .npz
def test_npy_and_npz_volumes(tmp_path, volume_lps):
    np.save(tmp_path / "v.npy", volume_lps.astype(np.int16))
    array, spacing = load_volume(tmp_path / "v.npy")
    assert array.dtype == np.float32 and spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(array, volume_lps)
    assert load_volume(tmp_path / "v.npy", spacing=(2, 1, 0.5))[1] == (2.0, 1.0, 0.5)
    centred = read_volume(tmp_path / "v.npy", spacing=(2, 1, 0.5))
    assert centred.origin == pytest.approx((-1.5, -2.5, -4.0))  # the volume centre at (0, 0, 0)

    np.savez(tmp_path / "v.npz", volume=volume_lps, spacing=np.array([3.0, 2.0, 1.0]))
    array, spacing = load_volume(tmp_path / "v.npz")
    np.testing.assert_array_equal(array, volume_lps)
    assert spacing == (3.0, 2.0, 1.0)
    assert load_volume(tmp_path / "v.npz", spacing=(3, 2, 1))[1] == (3.0, 2.0, 1.0)
    one_line_error(load_volume, tmp_path / "v.npz", match="disagrees", spacing=(1, 1, 1))
    np.savez(tmp_path / "gt.npz", ground_truth=volume_lps)
    np.testing.assert_array_equal(load_volume(tmp_path / "gt.npz")[0], volume_lps)

    for name, data, match in (("flat.npy", volume_lps[0], "3-D"), ("4d.npy", volume_lps[None], "3-D"),
                              ("text.npy", np.array([["a"]]), "real numbers")):
        np.save(tmp_path / name, data)
        one_line_error(load_volume, tmp_path / name, match=match)
    nan = volume_lps.copy()
    nan[0, 0, 0] = np.inf
    np.save(tmp_path / "inf.npy", nan)
    one_line_error(load_volume, tmp_path / "inf.npy", match="NaN or Inf")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    one_line_error(load_volume, tmp_path / "objects.npy", match="cannot read")
    np.savez(tmp_path / "other.npz", something=volume_lps)
    one_line_error(load_volume, tmp_path / "other.npz", match="no 'volume' or 'ground_truth'")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    one_line_error(load_volume, tmp_path / "junk.npz", match="cannot read")
    one_line_error(load_volume, tmp_path / "v.npy", match="positive", spacing=(0, 1, 1))


def test_scan_ground_truth_loads_as_hu(tmp_path):
    scan = make_scan()
    save_scan(tmp_path / "scan.npz", scan)
    volume = read_volume(tmp_path / "scan.npz")
    np.testing.assert_allclose(volume.array, scan.ground_truth * 4095.0 - 1024.0, rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(hu_to_unit(volume.array), scan.ground_truth, atol=1e-6)
    assert volume.spacing == scan.geometry.dVoxel
    assert volume.origin == pytest.approx((-2.0 - 2.5 * 1.5, -2.0, 1.0 - 1.5 * 2.0))  # centred on offOrigin
    scan.meta["origin"] = [10.0, 20.0, 30.0]  # the source volume's patient frame, as simulate_scan records it
    save_scan(tmp_path / "scan.npz", scan)
    assert read_volume(tmp_path / "scan.npz").origin == (10.0, 20.0, 30.0)


# ----------------------------------------------------------------------------- atomic output, JSON
def test_atomic_output_replaces_on_success_only(tmp_path):
    target = tmp_path / "result.nii.gz"
    target.write_text("old")
    with atomic_output(target) as temp:
        assert temp.parent == tmp_path and temp.name.endswith(".nii.gz") and temp != target
        temp.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as temp:
            temp.write_text("partial")
            raise RuntimeError("writer failed")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.nii.gz"]
    one_line_error(lambda: atomic_output(tmp_path / "missing" / "x.json").__enter__(), match="does not exist")
    one_line_error(lambda: atomic_output(tmp_path).__enter__(), match="is a folder")


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    """kill -9 in the middle of a write leaves its temporary; the next write of the same file removes it,
    but never the temporary of a writer that still runs."""
    import subprocess
    import sys

    target = tmp_path / "result.json"
    writer = ("import sys, time\nfrom ctrecon.core.io import atomic_output\n"
              "with atomic_output(sys.argv[1]) as temp:\n"
              "    temp.write_text('partial'); print('writing', flush=True); time.sleep(120)\n")
    process = subprocess.Popen([sys.executable, "-c", writer, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
        write_json(target, {"run": 1})  # a live writer's temporary stays
        assert len(list(tmp_path.glob(".tmp-*-result.json"))) == 1
    finally:
        process.kill()
        process.wait()
    assert len(list(tmp_path.glob(".tmp-*-result.json"))) == 1  # what SIGKILL leaves
    write_json(target, {"run": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    assert json.loads(target.read_text()) == {"run": 2}


def test_atomic_folder_replaces_as_a_whole_or_not_at_all(tmp_path):
    from ctrecon.core.io import atomic_folder

    target = tmp_path / "run"
    with atomic_folder(target, ("a.txt", "b.txt")) as folder:
        (folder / "a.txt").write_text("first a")
        (folder / "b.txt").write_text("first b")
        assert not target.exists()
    with pytest.raises(RuntimeError):
        with atomic_folder(target, ("a.txt", "b.txt")) as folder:
            (folder / "a.txt").write_text("second a")
            raise RuntimeError("writer failed half way")
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a.txt": "first a", "b.txt": "first b"}
    with atomic_folder(target, ("a.txt", "b.txt")) as folder:
        (folder / "a.txt").write_text("third a")
    assert [p.name for p in target.iterdir()] == ["a.txt"]  # replaced as a whole: no b.txt left from before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    (target / "notes.txt").write_text("the user's")
    one_line_error(lambda: atomic_folder(target, ("a.txt",)).__enter__(), match="not its output .notes.txt")
    # a crash between the two renames: the old folder waits under .old-*, the next writer puts it back
    (target / "notes.txt").unlink()
    os.replace(target, tmp_path / ".old-0000-run")
    (tmp_path / ".tmp-1111-run").mkdir()  # and a writer killed before it finished
    with pytest.raises(RuntimeError):
        with atomic_folder(target, ("a.txt",)):
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and (target / "a.txt").read_text() == "third a"
    (tmp_path / "file").write_text("x")
    one_line_error(lambda: atomic_folder(tmp_path / "file" / "run").__enter__(), match="is not a folder")


def test_write_json_handles_numpy_and_non_finite(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"psnr": np.float32(35.5), "iters": np.int64(7), "curve": np.arange(3),
                      "missing": float("nan"), "path": tmp_path, "nested": [{"inf": np.inf}]})
    assert json.loads(path.read_text()) == {"psnr": 35.5, "iters": 7, "curve": [0, 1, 2], "missing": None,
                                            "path": str(tmp_path), "nested": [{"inf": None}]}
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text())["iters"] == 7  # untouched by the failed write


# ----------------------------------------------------------------------------- scan files
def make_scan(with_truth=True, n_views=6):
    geometry = ConeBeamGeometry.covering(VolumeGeometry((4, 5, 6), (2.0, 1.0, 1.5), (1.0, 0.0, -2.0)),
                                         n_views=n_views, nDetector=(3, 7))
    rng = np.random.default_rng(1)
    truth = rng.random(geometry.nVoxel).astype(np.float32) if with_truth else None
    return Scan(rng.random(geometry.projection_shape).astype(np.float32), geometry.angles.copy(), geometry, truth,
                {"seed": np.int64(3), "source": "phantom", "dose": {"i0": 1e5}})


@pytest.mark.parametrize("with_truth, compress", [(True, False), (False, True)])
def test_scan_round_trip(tmp_path, with_truth, compress):
    scan = make_scan(with_truth)
    save_scan(tmp_path / "scan.npz", scan, compress=compress)
    loaded = load_scan(tmp_path / "scan.npz")
    np.testing.assert_array_equal(loaded.projections, scan.projections)
    np.testing.assert_array_equal(loaded.angles, scan.angles)
    assert loaded.projections.dtype == np.float32 and loaded.angles.dtype == np.float64
    assert loaded.geometry == scan.geometry
    np.testing.assert_array_equal(loaded.geometry.angles, loaded.angles)
    assert loaded.meta == {"seed": 3, "source": "phantom", "dose": {"i0": 1e5}}
    if with_truth:
        np.testing.assert_array_equal(loaded.ground_truth, scan.ground_truth)
    else:
        assert loaded.ground_truth is None
    with np.load(tmp_path / "scan.npz", allow_pickle=False) as raw:  # the documented on-disk layout
        assert "angles" not in json.loads(str(raw["geometry"]))
        assert raw["projections"].shape == (6, 3, 7)


def test_scan_refuses_values_on_another_scale():
    grid = VolumeGeometry((8, 10, 10), (2.0, 2.0, 2.0))
    geometry = ConeBeamGeometry.covering(grid, n_views=6)
    truth = np.full(grid.nVoxel, 0.25, dtype=np.float32)
    projections = np.full(geometry.projection_shape, 5.0, dtype=np.float32)
    Scan(projections, geometry.angles, geometry, truth)  # plausible: accepted
    one_line_error(Scan, projections * 1e30, geometry.angles, geometry, truth, match="not line integrals")
    hounsfield = np.full(grid.nVoxel, -1000.0, dtype=np.float32)
    hounsfield[2:6, 3:7, 3:7] = 40.0  # soft tissue in air, in HU
    one_line_error(Scan, projections, geometry.angles, geometry, hounsfield, match="looks like HU")


def test_load_scan_refusals(tmp_path):
    scan = make_scan()
    good = {"projections": scan.projections, "angles": scan.angles, "ground_truth": scan.ground_truth,
            "geometry": np.array(scan.geometry.to_json(include_angles=False)), "meta": np.array("{}")}

    def written(name, **changes):
        arrays = {k: v for k, v in {**good, **changes}.items() if v is not None}
        np.savez(tmp_path / name, **arrays)
        return tmp_path / name

    one_line_error(load_scan, tmp_path / "absent.npz", match="not found")
    one_line_error(load_scan, tmp_path, match="is a folder")
    (tmp_path / "scan.txt").write_text("x")
    one_line_error(load_scan, tmp_path / "scan.txt", match="must be an .npz")
    (tmp_path / "junk.npz").write_bytes(os.urandom(64))
    one_line_error(load_scan, tmp_path / "junk.npz", match="cannot read")
    one_line_error(load_scan, written("noproj.npz", projections=None), match="lacks projections")
    one_line_error(load_scan, written("flat.npz", projections=scan.projections[0]), match="must be 3-D")
    one_line_error(load_scan, written("shape.npz", projections=scan.projections[:, :, :5]), match=r"\(6, 3, 7\)")
    nan = scan.projections.copy()
    nan[2, 1, 1] = np.nan
    one_line_error(load_scan, written("nan.npz", projections=nan), match="projections contains NaN")
    inf = scan.ground_truth.copy()
    inf[0, 0, 0] = -np.inf
    one_line_error(load_scan, written("inf.npz", ground_truth=inf), match="ground_truth contains NaN")
    one_line_error(load_scan, written("gt.npz", ground_truth=scan.ground_truth[:3]), match="nVoxel")
    one_line_error(load_scan, written("angles.npz", angles=scan.angles[:4]), match="projections have shape")
    one_line_error(load_scan, written("json.npz", geometry=np.array("{not json")), match="not valid JSON")
    one_line_error(load_scan, written("geom.npz", geometry=np.array(json.dumps({"DSO": 1}))), match="invalid geometry")
    one_line_error(load_scan, written("meta.npz", meta=np.array("[1, 2]")), match="JSON object")
    one_line_error(load_scan, written("text.npz", projections=np.full((6, 3, 7), "a")), match="real numbers")
    np.savez(tmp_path / "pickled.npz", **{**good, "projections": np.array([None, 1], dtype=object)})
    one_line_error(load_scan, tmp_path / "pickled.npz", match="cannot read array 'projections'")
    with pytest.raises(InputError, match="angles disagree"):
        Scan(scan.projections, scan.angles + 0.1, scan.geometry)


# ----------------------------------------------------------------------------- real CT data
# name: (shape [Z, Y, X], spacing (dz, dy, dx) mm), from ../shared/data/ct/SOURCES.md
REAL = {
    "abdomen_ts_example.nii.gz": ((112, 101, 122), (3.0, 3.0, 3.0)),
    "abdomen_ts_example_small.nii.gz": ((30, 101, 122), (3.0, 3.0, 3.0)),
    "chest_cta_ts_aorta.nii.gz": ((191, 167, 233), (1.5, 1.5, 1.5)),
    "chest_pyradiomics_lung1.nii.gz": ((48, 512, 512), (5.0, 0.5703125, 0.5703125)),
    "head_vtk_headsq.nii.gz": ((93, 64, 64), (1.5, 3.2, 3.2)),
    "chest_lungdx_dicom": ((64, 512, 512), (5.0, 0.841796875, 0.841796875)),
}
needs_data = pytest.mark.skipif(not CT_DIR.is_dir(), reason=f"real CT data folder {CT_DIR} is absent")


@pytest.fixture(scope="module")
def real():
    """Every real volume, loaded once: name -> VolumeData."""
    if not CT_DIR.is_dir():
        pytest.skip(f"real CT data folder {CT_DIR} is absent")
    return {name: read_volume(CT_DIR / name) for name in REAL}


@needs_data
def test_every_real_file_is_covered():
    assert sorted(p.name for p in CT_DIR.iterdir() if p.name != "SOURCES.md") == sorted(REAL)


@needs_data
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_volume_shape_spacing_and_hu(real, name):
    volume = real[name]
    shape, spacing = REAL[name]
    assert volume.array.shape == shape and volume.array.dtype == np.float32
    assert volume.spacing == pytest.approx(spacing, rel=1e-5)
    values = volume.array[::2, ::2, ::2]
    assert -1100 <= np.percentile(values, 1) <= -950  # air
    tissue = values[(values > -200) & (values < 200)]
    counts, edges = np.histogram(tissue, bins=40, range=(-200, 200))
    assert -120 <= edges[np.argmax(counts)] <= 100  # the commonest non-air value is fat or soft tissue
    assert values.max() < 4000


def body_masks(volume):
    """Per-slice body mask (largest connected region above -400 HU, holes such as lungs filled)."""
    masks = np.zeros(volume.shape, bool)
    for k, image in enumerate(volume):
        mask = ndimage.binary_opening(image > -400, iterations=2)
        labels, count = ndimage.label(mask)
        if count:
            largest = 1 + int(np.argmax(ndimage.sum(mask, labels, range(1, count + 1))))
            masks[k] = ndimage.binary_fill_holes(labels == largest)
    return masks


def spine_offset(volume, body, slices=slice(None)):
    """Median over axial slices of the midline bone's position relative to the body centre, as a fraction
    of the body's extent along Y: positive when the spine is at higher Y than the body centre."""
    offsets = []
    for image, mask in zip(volume[slices], body[slices]):
        ys, xs = np.nonzero(mask)
        if ys.size < 100:
            continue
        band = np.abs(np.arange(image.shape[1]) - xs.mean()) < 0.05 * np.ptp(xs)
        bone_y = np.nonzero((image > 250) & mask & band[None, :])[0]
        if bone_y.size >= 3:
            offsets.append((bone_y.mean() - ys.mean()) / np.ptp(ys))
    return float(np.median(offsets))


def right_to_left_lung(volume, body):
    """Lung voxels at low X over those at high X (about the body's centre line)."""
    lung = body & (volume < -500) & (volume > -990)
    _, _, xs = np.nonzero(body)
    lung_x = np.nonzero(lung)[2]
    return (lung_x < xs.mean()).sum() / (lung_x >= xs.mean()).sum()


def bone_top_over_bottom(volume, body):
    """Bone fraction of the body in the top sixth of the slices (high Z) over the bottom sixth."""
    sixth = volume.shape[0] // 6

    def fraction(part):
        return ((volume[part] > 200) & body[part]).sum() / body[part].sum()

    return fraction(slice(-sixth, None)) / fraction(slice(None, sixth))


@needs_data
@pytest.mark.parametrize("name", [n for n in sorted(REAL) if not n.startswith("head")])
def test_real_anatomy_follows_lps(real, name):
    """Y grows posterior (the spine lies behind the body centre), X grows to the patient's left (the
    right lung is the larger), Z grows superior (shoulder girdle at the top of a chest, pelvis at the
    bottom of the abdomen). The head volume (VTK headsq) has no patient frame and is not checked.

    chest_pyradiomics_lung1.nii.gz has a defective header: the pyradiomics NRRD stores LPS with
    positive spacing directions, and the NIfTI conversion kept them as a RAS affine without
    negating x and y. The loader honours the header, so that volume comes out mirrored in X and Y.
    """
    stride = max(1, real[name].array.shape[1] // 128)  # anatomy needs no more than ~128² pixels a slice
    volume = real[name].array[:, ::stride, ::stride]
    body = body_masks(volume)
    mirrored_xy = -1 if name == "chest_pyradiomics_lung1.nii.gz" else 1
    if name == "chest_cta_ts_aorta.nii.gz":  # iodine-filled heart above 250 HU: use the slices below it
        assert spine_offset(volume, body, slice(None, volume.shape[0] // 6)) > 0.05
    else:
        assert mirrored_xy * spine_offset(volume, body) > 0.05
    if name.startswith("chest"):
        assert right_to_left_lung(volume, body) ** mirrored_xy > 1.1
        assert bone_top_over_bottom(volume, body) > 1.3
    elif name == "abdomen_ts_example.nii.gz":
        assert bone_top_over_bottom(volume, body) < 0.5


@needs_data
def test_real_dicom_slices_follow_image_position(real):
    """Slice Z-1 is the file with the most superior ImagePositionPatient, and its pixels are unflipped
    (ImageOrientationPatient is the identity), rescaled to HU."""
    folder = CT_DIR / "chest_lungdx_dicom"
    datasets = sorted((pydicom.dcmread(p) for p in folder.iterdir()), key=lambda d: float(d.ImagePositionPatient[2]))
    volume = real["chest_lungdx_dicom"]
    for k in (0, len(datasets) - 1):
        d = datasets[k]
        hu = d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
        np.testing.assert_array_equal(volume.array[k], hu)
    assert volume.origin == pytest.approx([float(v) for v in datasets[0].ImagePositionPatient])


@needs_data
def test_real_nifti_save_round_trip(real, tmp_path):
    volume = real["abdomen_ts_example_small.nii.gz"]
    save_volume(tmp_path / "copy.nii.gz", volume.array, volume.spacing, volume.origin)
    copy = read_volume(tmp_path / "copy.nii.gz")
    np.testing.assert_array_equal(copy.array, volume.array)
    assert copy.spacing == pytest.approx(volume.spacing) and copy.origin == pytest.approx(volume.origin)
    source = nib.load(CT_DIR / "abdomen_ts_example_small.nii.gz")
    # the same voxel sits at the same RAS position in the source file and in the copy
    centre = np.array(source.shape) // 2
    ras = source.affine @ [*centre, 1]
    index_zyx = np.linalg.solve(nib.load(tmp_path / "copy.nii.gz").affine, ras)[:3][::-1]
    assert source.get_fdata()[tuple(centre)] == copy.array[tuple(np.rint(index_zyx).astype(int))]


def test_cli_skip_bad_slices_names_the_files_it_left_out(tmp_path, volume_lps):
    from cli_helpers import run_cli

    folder = tmp_path / "series"
    paths = write_series(folder, volume_lps)
    paths[0].write_bytes(os.urandom(300))  # the first slice of the stack is damaged
    code, _, err = run_cli(["simulate", folder, "--views", 8, "--out", tmp_path / "refused.npz"])
    assert code == 2 and err.count("\n") == 1 and "--skip-bad-slices" in err and paths[0].name in err, err
    assert not (tmp_path / "refused.npz").exists()
    code, stdout, err = run_cli(["simulate", folder, "--views", 8, "--skip-bad-slices", "--out", tmp_path / "scan.npz"])
    assert code == 0, err
    assert err.splitlines() == [f"ctrecon: warning: {folder}: left out 1 DICOM file(s) of the series: "
                                f"{paths[0].name} cannot be read (damaged or not DICOM)"]
    assert load_scan(tmp_path / "scan.npz").ground_truth.shape[0] == volume_lps.shape[0] - 1
