"""Measured projection stacks from files, and the flat/dark log transform to line integrals.

``read_projection_stack`` reads a folder of .tif/.tiff/.png images (one view per file, natural order), a
single TIFF (one view per page) or PNG, a MetaImage (.mha/.mhd), a NIfTI (.nii/.nii.gz), a .npy array or a
headerless raw file, and returns the projections as float32 ``[A, V, U]`` (views, detector rows, detector
columns) with the detector pixel size ``(dv, du)`` mm and the origin ``(v0, u0)`` mm of pixel ``[0, 0]`` when
the file carries them. Stored values are kept as they are (raw intensities or line integrals);
``line_integrals`` turns intensities into ``-log`` transmissions. Every bad input is an ``InputError``
whose one-line message names the file and the problem.

Axis order of the formats that carry one (MetaImage, NIfTI): x is the detector column (u), y the detector
row (v), z the view; both store x fastest, so their (U, V, A) grid is read as ``[A, V, U]``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

from ctrecon.core.errors import InputError
from ctrecon.core.io import _verify_gzip
from ctrecon.core.limits import check_memory

__all__ = ["ProjectionStack", "read_projection_stack", "read_projection_image", "line_integrals"]

_IMAGE_SUFFIXES = (".tif", ".tiff", ".png")
_RAW_SUFFIXES = (".raw", ".bin")
_SUPPORTED = ("a folder of .tif/.tiff/.png images, a .tif/.tiff/.png file, MetaImage .mha/.mhd, NIfTI .nii/.nii.gz, "
              ".npy, or a .raw/.bin file with raw_dtype and raw_shape")
#: PIL modes of greyscale pixels: 8-bit, 16-bit (either byte order), 32-bit integer (PIL's mode for signed
#: 16-bit TIFF too) and 32-bit float.
_GREYSCALE_MODES = ("L", "I;16", "I;16L", "I;16B", "I", "F")
_MET_DTYPES = {"MET_UCHAR": "u1", "MET_CHAR": "i1", "MET_USHORT": "u2", "MET_SHORT": "i2",
               "MET_UINT": "u4", "MET_INT": "i4", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}
#: MetaImage header keys that mean the same as another (MetaIO's aliases).
_MET_ALIASES = {"Origin": "Offset", "Position": "Offset", "Rotation": "TransformMatrix",
                "Orientation": "TransformMatrix", "ElementByteOrderMSB": "BinaryDataByteOrderMSB"}
_MET_FLAGS = {"true": True, "1": True, "false": False, "0": False}
_MET_MAX_LINE = 4096  # bytes; a longer header line means the file is not a MetaImage header


@dataclasses.dataclass(frozen=True)
class ProjectionStack:
    """Projections as read from files: data float32 [A, V, U] (raw intensities or line integrals, as stored),
    pixel_size (dv, du) mm or None when the files carry no spacing, origin (v0, u0) mm = physical coordinate
    of pixel [0, 0] (row, column) or None when the files carry none, description: text for provenance."""
    data: np.ndarray
    pixel_size: tuple | None
    origin: tuple | None
    description: str


def read_projection_stack(path, *, raw_dtype=None, raw_shape=None, raw_offset=0,
                          byte_order="little") -> ProjectionStack:
    """The projections stored at ``path`` (a folder of images or one file; the kind follows the name).

    A headerless raw file (.raw/.bin, or any file when ``raw_dtype`` or ``raw_shape`` is given) needs
    ``raw_dtype`` (a numpy dtype name, e.g. "uint16") and ``raw_shape`` (A, V, U); ``raw_offset`` bytes are
    skipped at its start and ``byte_order`` is "little" or "big".
    """
    source = Path(path)
    if not source.exists():
        raise InputError(f"no such file or folder: {source}")
    try:
        return _read_by_kind(source, raw_dtype, raw_shape, raw_offset, byte_order)
    except OSError as err:  # unreadable file or folder (permissions, I/O error)
        raise InputError(f"cannot read {err.filename or source}: {err.strerror or err}") from None


def _read_by_kind(source: Path, raw_dtype, raw_shape, raw_offset, byte_order) -> ProjectionStack:
    name = source.name.lower()
    if raw_dtype is not None or raw_shape is not None or name.endswith(_RAW_SUFFIXES):
        return _read_raw(source, raw_dtype, raw_shape, raw_offset, byte_order)
    if source.is_dir():
        return _read_image_folder(source)
    if name.endswith(_IMAGE_SUFFIXES):
        return _read_image_file(source)
    if name.endswith((".mha", ".mhd")):
        return _read_metaimage(source)
    if name.endswith((".nii", ".nii.gz")):
        return _read_nifti(source)
    if name.endswith(".npy"):
        return _read_npy(source)
    raise InputError(f"{source}: unsupported kind of file; supported: {_SUPPORTED}")


def read_projection_image(path, **options) -> ProjectionStack:
    """A flat or dark field: the 2-D image at ``path``, or the mean over the views of a stack, as data
    float32 [1, V, U]. ``options`` are those of ``read_projection_stack``."""
    stack = read_projection_stack(path, **options)
    n_views = stack.data.shape[0]
    if n_views == 1:
        return stack
    mean = stack.data.mean(axis=0, dtype=np.float64, keepdims=True).astype(np.float32)
    return dataclasses.replace(stack, data=mean, description=f"{stack.description}, mean of {n_views} views")


def line_integrals(intensities, *, flat=None, dark=None, i0=None, min_transmission=1e-6) -> tuple[np.ndarray, int]:
    """Line integrals p = -log((I - dark) / (flat - dark)) of measured intensities.

    intensities: [A, V, U]; flat and dark: detector fields [V, U] or [1, V, U] (dark None = 0); i0: the
    unattenuated intensity, a number, instead of a flat field (give exactly one of flat and i0).
    Transmissions below ``min_transmission`` (including those ≤ 0) are clipped to it; transmissions above 1
    (noise) are kept and give negative p. Computed in float64. Returns (float32 [A, V, U], number of
    clipped values).
    """
    if (flat is None) == (i0 is None):
        raise InputError("give exactly one of a flat field and i0 (the unattenuated intensity), "
                         f"not {'both' if flat is not None else 'neither'}")
    if not (_is_real(min_transmission) and 0 < min_transmission <= 1):
        raise InputError(f"min_transmission must be a number in (0, 1], got {min_transmission!r}")
    counts = _real_finite(intensities, "the intensities", np.float64)
    if counts.ndim != 3:
        raise InputError(f"the intensities must be a stack [A, V, U], got shape {counts.shape}")
    detector = counts.shape[1:]
    dark_field = 0.0 if dark is None else _detector_field(dark, detector, "the dark field")
    if i0 is None:
        reference, unattenuated = "the flat field", _detector_field(flat, detector, "the flat field")
    elif _is_real(i0) and math.isfinite(i0) and i0 > 0:
        reference, unattenuated = "i0", float(i0)
    else:
        raise InputError(f"i0 must be a finite positive number, got {i0!r}")
    span = np.broadcast_to(unattenuated - dark_field, detector)
    n_not_above = int(np.count_nonzero(span <= 0))
    if n_not_above:
        raise InputError(f"{reference} is not above {'the dark field' if dark is not None else 'zero'} at "
                         f"{n_not_above} of {span.size} detector pixels")
    transmission = (counts - dark_field) / span
    n_clipped = int(np.count_nonzero(transmission < min_transmission))
    np.maximum(transmission, min_transmission, out=transmission)
    return (-np.log(transmission)).astype(np.float32), n_clipped


# ----------------------------------------------------------------------------- shared checks
def _as_stack(data, source, pixel_size=None, origin=None, *, description: str) -> ProjectionStack:
    """The ProjectionStack of a 2-D [V, U] or 3-D [A, V, U] array read from ``source``."""
    data = np.asarray(data)
    if data.ndim not in (2, 3):
        raise InputError(f"{source}: expected an image [V, U] or a stack [A, V, U], got shape {data.shape}")
    if data.size == 0:
        raise InputError(f"{source}: the array is empty (shape {data.shape})")
    projections = _real_finite(data.reshape((-1,) + data.shape[-2:]), source, np.float32)
    return ProjectionStack(projections, _floats(pixel_size), _floats(origin), description)


def _floats(pair):
    return None if pair is None else tuple(float(x) for x in pair)


def _real_finite(values, what, dtype) -> np.ndarray:
    """``values`` as a new C-contiguous array of ``dtype``, refusing complex, non-numeric, NaN and infinite values
    (``what`` names them in the message)."""
    array = np.asarray(values)
    if array.dtype.kind == "c":
        raise InputError(f"{what}: the values are complex ({array.dtype}); real numbers are needed")
    if array.dtype.kind not in "uif":
        raise InputError(f"{what}: the values are not numbers (stored as {array.dtype})")
    array = np.array(array, dtype=dtype, order="C")  # a copy: never a view of a file buffer or the input
    n_bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if n_bad:
        raise InputError(f"{what}: {n_bad} of {array.size} values are NaN or infinite")
    return array


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _detector_field(values, detector: tuple, what: str) -> np.ndarray:
    """A flat or dark field [V, U] or [1, V, U] as float64 [V, U] on the projections' detector."""
    field = _real_finite(values, what, np.float64)
    if field.shape not in (detector, (1,) + detector):
        raise InputError(f"{what} has shape {field.shape}, but the projections' detector is {detector} "
                         "(expected [V, U] or [1, V, U])")
    return field.reshape(detector)


# ----------------------------------------------------------------------------- TIFF / PNG
def _natural_key(path: Path) -> tuple:
    """Sort key putting "proj_2" before "proj_10": the runs of digits of the name compare as numbers."""
    parts = re.split(r"(\d+)", path.name)
    return [int(part) if index % 2 else part.lower() for index, part in enumerate(parts)], path.name


def _read_pages(file: Path) -> list:
    """(label, 2-D array, PIL mode) of every page of the image ``file``; a label names the page for messages."""
    with warnings.catch_warnings(record=True) as remarks:  # a file that fails: the error line says it all
        warnings.simplefilter("always")
        try:
            with Image.open(file) as image:
                pages = [(np.array(page), page.mode) for page in ImageSequence.Iterator(image)]
        except Exception as err:  # PIL raises many types for corrupt or truncated files
            raise InputError(f"cannot read image {file}: {type(err).__name__}: {err}") from None
    for remark in remarks:  # a file that reads: PIL's remarks on it still reach the user
        warnings.warn(f"{file}: {remark.message}", remark.category, stacklevel=2)
    labels = [f"page {index + 1}" for index in range(len(pages))] if len(pages) > 1 else [file.name]
    for label, (_, mode) in zip(labels, pages):
        if mode not in _GREYSCALE_MODES:
            where = f"{file} ({label})" if len(pages) > 1 else str(file)
            raise InputError(f"{where}: pixel type {mode} is not supported (greyscale 8/16-bit integer or "
                             "32-bit float images are)")
    return [(label, array, mode) for label, (array, mode) in zip(labels, pages)]


def _stack_views(views: list, source: Path) -> np.ndarray:
    """[A, V, U] from (label, 2-D array, mode) views, refusing the first whose size or pixel type differs."""
    first_label, first, first_mode = views[0]
    for label, array, mode in views[1:]:
        if array.shape != first.shape or mode != first_mode:
            raise InputError(f"{source}: {label} is {'x'.join(map(str, array.shape))} pixels of type {mode} but "
                             f"{first_label} is {'x'.join(map(str, first.shape))} of type {first_mode}; "
                             "every view must have the same size and pixel type")
    return np.stack([array for _, array, _ in views])


def _read_image_file(source: Path) -> ProjectionStack:
    views = _read_pages(source)
    data = _stack_views(views, source)
    pages = f", {len(views)} pages" if len(views) > 1 else ""
    return _as_stack(data, source, description=f"image {source.name} ({views[0][2]}{pages})")


def _read_image_folder(folder: Path) -> ProjectionStack:
    files = sorted((f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES),
                   key=_natural_key)
    if not files:
        contents = "is empty" if not any(folder.iterdir()) else "holds no .tif/.tiff/.png images"
        raise InputError(f"{folder}: the folder {contents}")
    kind = files[0].suffix.lower()
    other = next((f for f in files if f.suffix.lower() != kind), None)
    if other is not None:
        raise InputError(f"{other}: a {other.suffix} file among the {kind} images of {folder}; "
                         "keep one kind of image per folder")
    views = []
    for file in files:
        pages = _read_pages(file)
        if len(pages) > 1:
            raise InputError(f"{file} has {len(pages)} pages; a folder needs one view (one page) per file")
        views.append((file.name, *pages[0][1:]))
    data = _stack_views(views, folder)
    return _as_stack(data, folder, description=f"{len(files)} images {files[0].name} to {files[-1].name} "
                                               f"in {folder.name} ({views[0][2]})")


# ----------------------------------------------------------------------------- MetaImage
def _read_metaimage_header(source: Path) -> tuple:
    """(key → value text of the header up to ElementDataFile, aliases resolved; byte offset after it)."""
    fields = {}
    with open(source, "rb") as handle:
        for number, line in enumerate(iter(lambda: handle.readline(_MET_MAX_LINE), b""), start=1):
            text = line.decode("latin-1").strip()
            if not text:
                continue
            key, equals, value = (part.strip() for part in text.partition("="))
            if not equals or not re.fullmatch(r"\w+", key):
                raise InputError(f"{source}: header line {number} is not 'Key = Value' (not a MetaImage file?)")
            fields[_MET_ALIASES.get(key, key)] = value
            if key == "ElementDataFile":
                return fields, handle.tell()
    raise InputError(f"{source}: the header ends without an ElementDataFile line (not a MetaImage file?)")


def _met_numbers(fields: dict, key: str, count: int, source: Path, kind=float):
    """The ``count`` numbers of header field ``key``, or None when the header has no such field."""
    if key not in fields:
        return None
    try:
        values = [kind(token) for token in fields[key].split()]
    except ValueError:
        values = []
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise InputError(f"{source}: {key} = {fields[key]!r} is not {count} finite "
                         f"{'integers' if kind is int else 'numbers'}")
    return values


def _met_flag(fields: dict, key: str, default: bool, source: Path) -> bool:
    flag = _MET_FLAGS.get(fields.get(key, str(default)).lower())
    if flag is None:
        raise InputError(f"{source}: {key} = {fields[key]!r} is neither True nor False")
    return flag


def _met_payload(source: Path, fields: dict, header_end: int, n_bytes: int, compressed: bool) -> tuple:
    """(the stored data bytes, the file that holds them) of a MetaImage; ``n_bytes``: size the header
    describes, for an external file's HeaderSize = -1 (data at the file's end)."""
    location = fields["ElementDataFile"]
    if location.upper() == "LIST" or "%" in location:
        raise InputError(f"{source}: ElementDataFile = {location}: data split over a list or series of files "
                         "is not supported; store the stack in one file")
    if location.upper() == "LOCAL":
        data_file, start = source, header_end
    else:
        data_file = source.parent / location
        if not data_file.is_file():
            raise InputError(f"{source}: its data file {data_file} (ElementDataFile) does not exist")
        skip = (_met_numbers(fields, "HeaderSize", 1, source, int) or [0])[0]
        if skip < -1 or (skip == -1 and compressed):
            raise InputError(f"{source}: HeaderSize = {skip} is not supported"
                             f"{' with compressed data' if skip == -1 else ''}")
        start = data_file.stat().st_size - n_bytes if skip == -1 else skip
    with open(data_file, "rb") as handle:
        handle.seek(max(start, 0))
        return handle.read(), data_file


def _inflate(payload: bytes, n_bytes: int, data_file: Path) -> bytes:
    """The zlib stream ``payload`` decompressed, stopping past ``n_bytes`` (the size the header describes)."""
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(payload, n_bytes + 1)
    except zlib.error as err:
        raise InputError(f"{data_file}: the compressed data are corrupt ({err})") from None
    if len(data) > n_bytes:
        raise InputError(f"{data_file}: the compressed data decompress to more than the {n_bytes} bytes "
                         "that DimSize and ElementType describe")
    if not inflater.eof:
        raise InputError(f"{data_file}: the compressed data are cut short ({len(data)} of {n_bytes} bytes "
                         "recovered): the file is truncated")
    return data


def _read_metaimage(source: Path) -> ProjectionStack:
    fields, header_end = _read_metaimage_header(source)
    missing = [key for key in ("NDims", "DimSize", "ElementType") if key not in fields]
    if missing:
        raise InputError(f"{source}: the MetaImage header lacks {', '.join(missing)}")
    n_dims = _met_numbers(fields, "NDims", 1, source, int)[0]
    if n_dims not in (2, 3):
        raise InputError(f"{source}: NDims = {n_dims}; a 2-D image or a 3-D stack of projections is needed")
    size_xyz = _met_numbers(fields, "DimSize", n_dims, source, int)
    spacing = _met_numbers(fields, "ElementSpacing", n_dims, source)
    offset = _met_numbers(fields, "Offset", n_dims, source)
    matrix = _met_numbers(fields, "TransformMatrix", n_dims * n_dims, source)
    channels = _met_numbers(fields, "ElementNumberOfChannels", 1, source, int)
    element = fields["ElementType"]
    if min(size_xyz) < 1:
        raise InputError(f"{source}: DimSize = {fields['DimSize']}; every size must be positive")
    if spacing is not None and min(spacing) <= 0:
        raise InputError(f"{source}: ElementSpacing = {fields['ElementSpacing']}; spacings must be positive")
    if matrix is not None and not np.allclose(np.reshape(matrix, (n_dims, n_dims)), np.eye(n_dims), atol=1e-6):
        raise InputError(f"{source}: TransformMatrix = {fields['TransformMatrix']} is not the identity; "
                         "rotated detector axes are not supported")
    if channels not in (None, [1]):
        raise InputError(f"{source}: ElementNumberOfChannels = {channels[0]}; one value per pixel is needed")
    if element not in _MET_DTYPES:
        raise InputError(f"{source}: ElementType {element} is not supported (one of {', '.join(_MET_DTYPES)})")
    if not _met_flag(fields, "BinaryData", True, source):
        raise InputError(f"{source}: BinaryData = False (values as text) is not supported; store binary data")
    byte_order = ">" if _met_flag(fields, "BinaryDataByteOrderMSB", False, source) else "<"
    compressed = _met_flag(fields, "CompressedData", False, source)
    dtype = np.dtype(_MET_DTYPES[element]).newbyteorder(byte_order)
    n_values = math.prod(size_xyz)
    n_bytes = n_values * dtype.itemsize
    check_memory(n_bytes + 4 * n_values, f"{source.name} (its header says {'x'.join(map(str, size_xyz))} pixels)",
                 "if that is not the stack's size, the header is damaged")
    payload, data_file = _met_payload(source, fields, header_end, n_bytes, compressed)
    stored = _inflate(payload, n_bytes, data_file) if compressed else payload
    if len(stored) != n_bytes:
        raise InputError(f"{data_file}: holds {len(stored)} bytes of data, but DimSize {fields['DimSize']} of "
                         f"{element} needs {n_bytes}: the file is truncated or the header is wrong")
    data = np.frombuffer(stored, dtype).reshape(size_xyz[::-1])  # x fastest: (U, V[, A]) -> [[A,] V, U]
    return _as_stack(data, source, None if spacing is None else spacing[1::-1],
                     None if offset is None else offset[1::-1],
                     description=f"MetaImage {source.name} ({element}{', zlib' if compressed else ''})")


# ----------------------------------------------------------------------------- NIfTI, .npy, raw
def _read_nifti(source: Path) -> ProjectionStack:
    import nibabel as nib
    from nibabel.openers import ImageOpener

    if source.name.lower().endswith(".gz"):
        _verify_gzip(source)
    try:
        image = nib.load(source)
        data = np.asanyarray(image.dataobj)
        with ImageOpener(source) as handle:  # the header as stored: nibabel's checks turn a 0 into 1 mm
            stored_spacing = type(image.header).from_fileobj(handle, check=False)["pixdim"][1:3]
        affine = np.asarray(image.affine, dtype=np.float64)
        has_affine = image.header["sform_code"] > 0 or image.header["qform_code"] > 0
    except Exception as err:  # nibabel/gzip/zlib raise many types for corrupt or truncated files
        raise InputError(f"cannot read NIfTI file {source}: {type(err).__name__}: {err}") from None
    linear = affine[:3, :3]
    diagonal = np.allclose(linear - np.diag(np.diag(linear)), 0, atol=1e-6 * np.abs(linear).max())
    spacing = stored_spacing[::-1] if np.all(stored_spacing > 0) else None  # (du, dv) -> (dv, du)
    origin = (affine[1, 3], affine[0, 3]) if has_affine and diagonal else None
    return _as_stack(data.T, source, spacing, origin, description=f"NIfTI {source.name}")  # [U, V[, A]] -> [[A,] V, U]


def _read_npy(source: Path) -> ProjectionStack:
    try:
        data = np.load(source, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise InputError(f"cannot read .npy file {source}: {err}") from None
    if not isinstance(data, np.ndarray):
        raise InputError(f"{source} is not a single .npy array (an .npz archive?)")
    return _as_stack(data, source, description=f"array {source.name}")


def _read_raw(source: Path, raw_dtype, raw_shape, raw_offset, byte_order) -> ProjectionStack:
    if raw_dtype is None or raw_shape is None:
        raise InputError(f"{source}: a raw file needs raw_dtype (e.g. uint16, float32) and raw_shape (A, V, U)")
    if not source.is_file():
        raise InputError(f"{source}: a raw stack must be one file")
    try:
        dtype = np.dtype(raw_dtype)
    except TypeError:
        raise InputError(f"{source}: raw_dtype {raw_dtype!r} is not a numpy dtype name (e.g. uint16, float32)") from None
    if dtype.kind not in "uif":
        raise InputError(f"{source}: raw_dtype {raw_dtype!r} is not a real number type (e.g. uint16, float32)")
    shape = tuple(raw_shape) if np.iterable(raw_shape) else ()
    if len(shape) != 3 or not all(isinstance(n, (int, np.integer)) and n > 0 for n in shape):
        raise InputError(f"{source}: raw_shape must be three positive integers (A, V, U), got {raw_shape!r}")
    if not (isinstance(raw_offset, (int, np.integer)) and raw_offset >= 0):
        raise InputError(f"{source}: raw_offset must be a non-negative number of bytes, got {raw_offset!r}")
    if byte_order not in ("little", "big"):
        raise InputError(f"{source}: byte_order must be 'little' or 'big', got {byte_order!r}")
    dtype = dtype.newbyteorder("<" if byte_order == "little" else ">")
    needed = math.prod(shape) * dtype.itemsize
    remaining = max(source.stat().st_size - raw_offset, 0)
    if remaining != needed:
        raise InputError(f"{source}: the file holds {remaining} bytes after the {raw_offset}-byte offset, but "
                         f"raw_shape {'x'.join(map(str, shape))} of {dtype.name} needs {needed} bytes")
    check_memory(needed + 4 * math.prod(shape), f"{source.name} ({'x'.join(map(str, shape))} values)",
                 "check raw_shape")
    data = np.fromfile(source, dtype=dtype, count=math.prod(shape), offset=raw_offset).reshape(shape)
    return _as_stack(data, source, description=f"raw {source.name} ({dtype.name} {byte_order}-endian, "
                                               f"{'x'.join(map(str, shape))}, offset {raw_offset} bytes)")
