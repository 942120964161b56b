"""Reading measured projection stacks from real files (ctrecon.core.projection_files) and the flat/dark log
transform. The files are written by the formats' own libraries (PIL, nibabel, numpy, and ITK where it is
installed) or by hand following the format's specification; nothing is mocked."""
import os
import warnings
import zlib

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from ctrecon.core.errors import InputError
from ctrecon.core.projection_files import line_integrals, read_projection_image, read_projection_stack

A, V, U = 11, 3, 5  # 11 views: "proj_10" sorts before "proj_2" lexicographically
MET_DTYPES = {"MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}


@pytest.fixture
def counts():
    """A uint16 stack [A, V, U] whose every value is distinct, so any reordering shows."""
    return np.random.default_rng(0).permutation(60000)[: A * V * U].reshape(A, V, U).astype(np.uint16)


def write_views(folder, stack, suffix):
    folder.mkdir(exist_ok=True)
    for index, view in enumerate(stack):
        Image.fromarray(view).save(folder / f"proj_{index + 1}{suffix}")
    return folder


def write_metaimage(path, array, *, element="MET_FLOAT", msb=False, compressed=False, data_file="LOCAL",
                    spacing=None, offset=None, extra=()):
    """A MetaImage header (``extra`` lines before ElementDataFile) and its data, LOCAL or in ``data_file``."""
    payload = np.ascontiguousarray(array, dtype=np.dtype(MET_DTYPES[element]).newbyteorder(">" if msb else "<"))
    payload = zlib.compress(payload.tobytes()) if compressed else payload.tobytes()
    lines = ["ObjectType = Image", f"NDims = {array.ndim}", "BinaryData = True", f"BinaryDataByteOrderMSB = {msb}",
             f"CompressedData = {compressed}", f"DimSize = {' '.join(map(str, array.shape[::-1]))}",
             f"ElementType = {element}", *extra]
    lines += [f"ElementSpacing = {' '.join(map(str, spacing))}"] if spacing else []
    lines += [f"Offset = {' '.join(map(str, offset))}"] if offset else []
    header = ("\n".join(lines + [f"ElementDataFile = {data_file}"]) + "\n").encode()
    if data_file == "LOCAL":
        path.write_bytes(header + payload)
    else:
        path.write_bytes(header)
        (path.parent / data_file).write_bytes(payload)
    return path


def check_stack(stack, expected, pixel_size=None, origin=None):
    assert stack.data.dtype == np.float32 and stack.data.flags.c_contiguous
    expected = np.asarray(expected, dtype=np.float32)
    np.testing.assert_array_equal(stack.data, expected.reshape((-1,) + expected.shape[-2:]))
    assert stack.pixel_size == (None if pixel_size is None else pytest.approx(pixel_size))
    assert stack.origin == (None if origin is None else pytest.approx(origin))
    assert stack.description


# ----------------------------------------------------------------------------- TIFF / PNG
@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_folder_of_16_bit_images_in_natural_order(tmp_path, counts, suffix):
    folder = write_views(tmp_path / "scan", counts, suffix)
    (folder / "notes.txt").write_text("ignored: not an image")
    check_stack(read_projection_stack(folder), counts)


def test_folder_of_float32_tiffs(tmp_path):
    values = np.random.default_rng(1).normal(size=(A, V, U)).astype(np.float32)
    check_stack(read_projection_stack(write_views(tmp_path / "scan", values, ".tiff")), values)


def test_multi_page_tiff_and_single_png(tmp_path, counts):
    pages = [Image.fromarray(view) for view in counts]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    check_stack(read_projection_stack(tmp_path / "stack.tif"), counts)
    view = (counts[0] // 256).astype(np.uint8)
    Image.fromarray(view).save(tmp_path / "view.png")
    check_stack(read_projection_stack(tmp_path / "view.png"), view[None])


# ----------------------------------------------------------------------------- MetaImage
@pytest.mark.parametrize("compressed", [False, True])
def test_metaimage_local(tmp_path, counts, compressed):
    path = write_metaimage(tmp_path / "scan.mha", counts, element="MET_USHORT", compressed=compressed,
                           spacing=(0.4, 0.6, 1.0), offset=(-12.5, -3.5, 7.0))
    check_stack(read_projection_stack(path), counts, pixel_size=(0.6, 0.4), origin=(-3.5, -12.5))


def test_metaimage_header_and_big_endian_raw(tmp_path, counts):
    values = counts.astype(np.int16) - 30000
    path = write_metaimage(tmp_path / "scan.mhd", values, element="MET_SHORT", msb=True, data_file="scan.raw",
                           spacing=(0.25, 0.5, 2.0), extra=["Position = 1 2 3", "TransformMatrix = 1 0 0 0 1 0 0 0 1"])
    check_stack(read_projection_stack(path), values, pixel_size=(0.5, 0.25), origin=(2.0, 1.0))


def test_metaimage_2d(tmp_path, counts):
    path = write_metaimage(tmp_path / "flat.mha", counts[0], element="MET_DOUBLE", spacing=(0.4, 0.6))
    check_stack(read_projection_stack(path), counts[0][None], pixel_size=(0.6, 0.4))


@pytest.mark.slow  # loading ITK's IO wrappers takes 10-20 s; our reader takes milliseconds
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ITK's SWIG types under Python 3.11+
def test_metaimage_matches_itk(tmp_path):
    """The independent check: MetaImage files written by ITK read back with ITK's array, spacing and origin."""
    itk = pytest.importorskip("itk")
    values = np.random.default_rng(2).normal(size=(A, V, U)).astype(np.float32)
    image = itk.GetImageFromArray(values)  # [A, V, U] -> ITK size (U, V, A)
    image.SetSpacing((0.4, 0.6, 1.5))
    image.SetOrigin((-10.0, 5.0, 2.0))
    for name, compressed in [("itk.mha", False), ("itk_zlib.mha", True), ("itk.mhd", False)]:
        itk.imwrite(image, str(tmp_path / name), compression=compressed)
        check_stack(read_projection_stack(tmp_path / name), values, pixel_size=(0.6, 0.4), origin=(5.0, -10.0))


# ----------------------------------------------------------------------------- NIfTI, .npy, raw
def test_nifti_3d_and_2d(tmp_path, counts):
    affine = np.array([[0.4, 0, 0, -12.0], [0, 0.6, 0, 3.0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(counts.transpose(2, 1, 0), affine), tmp_path / "scan.nii.gz")  # [x, y, z] = [U, V, A]
    check_stack(read_projection_stack(tmp_path / "scan.nii.gz"), counts, pixel_size=(0.6, 0.4), origin=(3.0, -12.0))
    rotated = affine.copy()
    rotated[:2, :2] = [[0, -0.6], [0.4, 0]]
    nib.save(nib.Nifti1Image(counts[0].T.astype(np.float32), rotated), tmp_path / "view.nii")
    check_stack(read_projection_stack(tmp_path / "view.nii"), counts[0][None], pixel_size=(0.6, 0.4))


def test_nifti_without_spacing_or_affine(tmp_path, counts):
    """A header with pixdim 0 (nibabel would report 1 mm) and no sform/qform carries neither spacing nor origin."""
    path = tmp_path / "scan.nii"
    nib.save(nib.Nifti1Image(counts.T, None), path)
    raw = bytearray(path.read_bytes())
    raw[80:88] = np.zeros(2, "<f4").tobytes()  # pixdim[1], pixdim[2] (the header starts at pixdim[0], byte 76)
    path.write_bytes(bytes(raw))
    check_stack(read_projection_stack(path), counts)


def test_npy_stack_and_image(tmp_path, counts):
    np.save(tmp_path / "scan.npy", counts)
    np.save(tmp_path / "view.npy", counts[0].astype(np.float64))
    check_stack(read_projection_stack(tmp_path / "scan.npy"), counts)
    check_stack(read_projection_stack(tmp_path / "view.npy"), counts[0][None])


@pytest.mark.parametrize("byte_order", ["little", "big"])
def test_raw_byte_orders_and_offset(tmp_path, counts, byte_order):
    stored = counts.astype(np.dtype("uint16").newbyteorder("<" if byte_order == "little" else ">"))
    (tmp_path / "scan.bin").write_bytes(b"HEADER" * 4 + stored.tobytes())
    stack = read_projection_stack(tmp_path / "scan.bin", raw_dtype="uint16", raw_shape=(A, V, U), raw_offset=24,
                                  byte_order=byte_order)
    check_stack(stack, counts)


def test_projection_image_averages_a_stack(tmp_path, counts):
    np.save(tmp_path / "flats.npy", counts)
    flat = read_projection_image(tmp_path / "flats.npy")
    np.testing.assert_allclose(flat.data, counts.mean(axis=0, keepdims=True), rtol=1e-6)
    assert flat.data.shape == (1, V, U) and "mean of 11 views" in flat.description
    (tmp_path / "dark.raw").write_bytes(counts[:1].tobytes())
    check_stack(read_projection_image(tmp_path / "dark.raw", raw_dtype="uint16", raw_shape=(1, V, U)), counts[:1])


# ----------------------------------------------------------------------------- line integrals
def test_line_integrals_match_the_formula():
    rng = np.random.default_rng(3)
    dark = rng.uniform(90, 110, size=(V, U))
    flat = rng.uniform(9000, 11000, size=(1, V, U))
    intensities = rng.uniform(200, 10500, size=(A, V, U))  # some above the flat: negative p, kept
    p, n_clipped = line_integrals(intensities, flat=flat, dark=dark)
    expected = -np.log((intensities - dark) / (flat - dark))
    assert p.dtype == np.float32 and n_clipped == 0 and (expected < 0).any()
    np.testing.assert_allclose(p, expected, rtol=1e-6)
    p, n_clipped = line_integrals(intensities, i0=1e4)
    np.testing.assert_allclose(p, -np.log(intensities / 1e4), rtol=1e-6)


def test_line_integrals_clip_low_transmissions():
    intensities = np.full((2, V, U), 500.0)
    intensities[0, 0, :3] = [100.0, 99.0, 100.5]  # transmission 0, below 0, 0.5/400 (kept)
    intensities[1, 2, 4] = 100.04  # transmission 1e-4, clipped by min_transmission 1e-3
    p, n_clipped = line_integrals(intensities, flat=np.full((V, U), 500.0), dark=np.full((1, V, U), 100.0),
                                  min_transmission=1e-3)
    assert n_clipped == 3
    np.testing.assert_allclose(p[0, 0, :3], [-np.log(1e-3), -np.log(1e-3), -np.log(0.5 / 400)], rtol=1e-6)
    assert p[1, 2, 4] == pytest.approx(-np.log(1e-3)) and p[1, 0, 0] == 0


@pytest.mark.parametrize("options, message", [
    (dict(flat=np.full((V, U), 1000.0), i0=1000.0), "exactly one of a flat field and i0.*not both"),
    (dict(), "exactly one of a flat field and i0.*not neither"),
    (dict(i0=-5.0), "i0 must be a finite positive number"),
    (dict(flat=np.full((4, U), 1000.0)), r"the flat field has shape \(4, 5\).*detector is \(3, 5\)"),
    (dict(flat=np.full((V, U), 1000.0), dark=np.full((2, V, U), 10.0)), r"the dark field has shape \(2, 3, 5\)"),
    (dict(flat=np.where(np.arange(V * U).reshape(V, U) < 2, 5.0, 1000.0), dark=np.full((V, U), 10.0)),
     "the flat field is not above the dark field at 2 of 15 detector pixels"),
    (dict(i0=1000.0, min_transmission=0.0), r"min_transmission must be a number in \(0, 1\]"),
])
def test_line_integrals_refusals(options, message):
    with pytest.raises(InputError, match=message):
        line_integrals(np.full((A, V, U), 500.0), **options)


def test_line_integrals_refuse_non_finite_intensities():
    intensities = np.full((A, V, U), 500.0)
    intensities[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="the intensities: 1 of 165 values are NaN or infinite"):
        line_integrals(intensities, i0=1000.0)


# ----------------------------------------------------------------------------- bad files
def _folder(tmp_path, *files):
    """A folder holding (name, 2-D array) images, or (name, bytes) other files."""
    folder = tmp_path / "scan"
    folder.mkdir()
    for name, content in files:
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            Image.fromarray(content).save(folder / name)
    return folder, {}


def _file(tmp_path, name, content, **options):
    (tmp_path / name).write_bytes(content)
    return tmp_path / name, options


def _npy(tmp_path, array):
    np.save(tmp_path / "scan.npy", array)
    return tmp_path / "scan.npy", {}


def _mha(tmp_path, **options):
    return write_metaimage(tmp_path / "scan.mha", np.ones((2, V, U)), **options), {}


def _cut(path_and_options, n_bytes):
    """The file cut ``n_bytes`` short."""
    path, options = path_and_options
    path.write_bytes(path.read_bytes()[:-n_bytes])
    return path, options


def _nifti_gz(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((U, V, 2), np.float32), np.eye(4)), tmp_path / "scan.nii.gz")
    return tmp_path / "scan.nii.gz", {}


def _multi_page(tmp_path, first, second):
    Image.fromarray(first).save(tmp_path / "stack.tif", save_all=True, append_images=[Image.fromarray(second)])
    return tmp_path / "stack.tif", {}


_U16 = np.zeros((V, U), np.uint16)
_NOISE = np.random.default_rng(4).integers(0, 256, 512, dtype=np.uint8).tobytes()
BAD_INPUTS = {
    "image sizes differ": (lambda t: _folder(t, ("proj_1.tif", _U16), ("proj_2.tif", np.zeros((4, U), np.uint16))),
                           r"scan: proj_2.tif is 4x5 pixels of type I;16 but proj_1.tif is 3x5"),
    "pixel types differ": (lambda t: _folder(t, ("a1.tif", _U16), ("a2.tif", np.zeros((V, U), np.float32))),
                           r"a2.tif is 3x5 pixels of type F but a1.tif is 3x5 of type I;16"),
    "extensions mixed": (lambda t: _folder(t, ("proj_1.tif", _U16), ("proj_2.png", _U16)),
                         r"proj_2.png: a .png file among the .tif images"),
    "empty folder": (lambda t: _folder(t), r"scan: the folder is empty"),
    "no images": (lambda t: _folder(t, ("notes.txt", b"x")),
                  r"scan: the folder holds no .tif/.tiff/.png images"),
    "colour image": (lambda t: _folder(t, ("rgb.png", np.zeros((V, U, 3), np.uint8))),
                     r"scan/rgb.png: pixel type RGB is not supported"),
    "multi-page pages differ": (lambda t: _multi_page(t, _U16, np.zeros((4, U), np.uint16)),
                                r"stack.tif: page 2 is 4x5 pixels"),
    "corrupt TIFF": (lambda t: _file(t, "scan.tif", b"II*\x00" + _NOISE), r"cannot read image .*scan.tif"),
    "truncated raw": (lambda t: _file(t, "scan.raw", bytes(20), raw_dtype="uint16", raw_shape=(2, V, U)),
                      r"scan.raw: the file holds 20 bytes after the 0-byte offset, but raw_shape 2x3x5 of uint16 "
                      "needs 60 bytes"),
    "raw too long": (lambda t: _file(t, "scan.raw", bytes(70), raw_dtype="uint16", raw_shape=(2, V, U), raw_offset=4),
                     r"holds 66 bytes after the 4-byte offset, but raw_shape 2x3x5 of uint16 needs 60"),
    "raw without options": (lambda t: _file(t, "scan.raw", bytes(60)),
                            r"scan.raw: a raw file needs raw_dtype .* and raw_shape \(A, V, U\)"),
    "raw without shape": (lambda t: _file(t, "scan.dat", bytes(60), raw_dtype="uint16"), r"scan.dat: a raw file needs"),
    "raw bad dtype": (lambda t: _file(t, "scan.raw", bytes(60), raw_dtype="uint12", raw_shape=(2, V, U)),
                      r"scan.raw: raw_dtype 'uint12' is not a numpy dtype name"),
    "raw bad shape": (lambda t: _file(t, "scan.raw", bytes(60), raw_dtype="uint16", raw_shape=(V, U)),
                      r"scan.raw: raw_shape must be three positive integers \(A, V, U\), got \(3, 5\)"),
    "NaN in npy": (lambda t: _npy(t, np.where(np.arange(30).reshape(2, V, U) % 7 == 1, np.nan, 1.0)),
                   r"scan.npy: 5 of 30 values are NaN or infinite"),
    "complex npy": (lambda t: _npy(t, np.ones((2, V, U), np.complex64)), r"scan.npy: the values are complex"),
    "text npy": (lambda t: _npy(t, np.full((V, U), "a")), r"scan.npy: the values are not numbers"),
    "4-D npy": (lambda t: _npy(t, np.ones((1, 2, V, U))), r"scan.npy: expected an image \[V, U\] or a stack"),
    "empty npy": (lambda t: _npy(t, np.ones((0, V, U))), r"scan.npy: the array is empty"),
    "truncated npy": (lambda t: _cut(_npy(t, np.ones((2, V, U))), 8), r"cannot read .npy file .*scan.npy"),
    "unknown extension": (lambda t: _file(t, "scan.xyz", bytes(8)), r"scan.xyz: unsupported kind of file; supported"),
    "missing path": (lambda t: (t / "absent.tif", {}), r"no such file or folder: .*absent.tif"),
    "truncated MetaImage": (lambda t: _cut(_mha(t), 4), r"scan.mha: holds 116 bytes of data, but DimSize 5 3 2 of "
                                                         "MET_FLOAT needs 120"),
    "truncated zlib MetaImage": (lambda t: _cut(_mha(t, compressed=True), 4), r"scan.mha: the compressed data are cut"),
    "rotated MetaImage": (lambda t: _mha(t, extra=["TransformMatrix = 0 1 0 -1 0 0 0 0 1"]),
                          r"scan.mha: TransformMatrix = 0 1 0 -1 0 0 0 0 1 is not the identity"),
    "MetaImage list": (lambda t: _mha(t, data_file="LIST"), r"scan.mha: ElementDataFile = LIST"),
    "MetaImage type": (lambda t: _mha(t, extra=["ElementType = MET_LONG"]), r"ElementType MET_LONG is not supported"),
    "MetaImage channels": (lambda t: _mha(t, extra=["ElementNumberOfChannels = 3"]),
                           r"scan.mha: ElementNumberOfChannels = 3"),
    "MetaImage data file": (lambda t: _file(t, "scan.mhd", b"NDims = 2\nDimSize = 5 3\nElementType = MET_FLOAT\n"
                                                             b"ElementDataFile = gone.raw\n"),
                            r"scan.mhd: its data file .*gone.raw \(ElementDataFile\) does not exist"),
    "not a MetaImage": (lambda t: _file(t, "scan.mha", _NOISE), r"scan.mha: header line 1 is not 'Key = Value'"),
    "truncated NIfTI": (lambda t: _cut(_nifti_gz(t), 30), r"scan.nii.gz"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_are_refused_in_one_line(tmp_path, case):
    build, message = BAD_INPUTS[case]
    path, options = build(tmp_path)
    with pytest.raises(InputError, match=message) as refusal, warnings.catch_warnings(record=True) as remarks:
        warnings.simplefilter("always")
        read_projection_stack(path, **options)
    assert "\n" not in str(refusal.value) and not remarks  # nothing but the one line reaches the user


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_refused(tmp_path):
    path, _ = _mha(tmp_path)
    path.chmod(0)
    with pytest.raises(InputError, match=r"cannot read .*scan.mha: Permission denied"):
        read_projection_stack(path)
