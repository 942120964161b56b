"""Volumes (NIfTI, DICOM series, .npy/.npz), scan files (.npz) and atomic output.

Orientation convention (every format): a volume is returned as ``[Z, Y, X]`` in the DICOM patient
frame LPS: array index X increases towards the patient's Left, Y towards Posterior, Z towards
Superior. An axial slice ``volume[k]`` shown with row 0 at the top is therefore in radiological
convention (patient's right on the viewer's left, anterior at the top). NIfTI volumes are
reoriented from their affine, DICOM series from ImageOrientationPatient/ImagePositionPatient, by
flips and axis permutations only (no interpolation); oblique or sheared (gantry-tilted) grids
are refused. ``.npy``/``.npz`` arrays carry no patient frame and are taken as already ``[Z, Y, X]``.

Values are returned as stored after the file's rescaling (NIfTI scl_slope/scl_inter, DICOM
RescaleSlope/RescaleIntercept), i.e. Hounsfield units for CT; the ground truth of a scan file,
stored in unit attenuation, is converted back to HU.

Spacing is ``(dz, dy, dx)`` in mm, ordered like the array. An origin is the (x, y, z) LPS position
in mm of the centre of voxel ``[0, 0, 0]`` (DICOM ImagePositionPatient / ITK origin convention).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import math
import os
import secrets
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from ctrecon.core.errors import InputError
from ctrecon.core.limits import check_memory
from ctrecon.core.geometry import ScanGeometry, geometry_from_dict

__all__ = ["VolumeData", "read_volume", "load_volume", "save_volume", "Scan", "load_scan", "save_scan",
           "atomic_output", "atomic_outputs", "atomic_folder", "writable_folder", "write_json", "SkippedSlicesWarning"]

# Array axis 0 -> world z, 1 -> world y, 2 -> world x, each increasing along +LPS (nibabel ornt form).
_ZYX_LPS_ORNT = np.array([[2, 1], [1, 1], [0, 1]])
_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Largest off-axis direction-cosine component accepted as "axis-aligned" (about 0.06 degrees).
_AXIS_TOLERANCE = 1e-3
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_DICOM_SUFFIXES = (".dcm", ".ima", ".dicom")
_SCAN_REQUIRED = ("projections", "angles", "geometry")


# ----------------------------------------------------------------------------- atomic output
@contextlib.contextmanager
def atomic_output(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (ending in the same name, so writers that dispatch on
    the extension, e.g. ``.nii.gz``, behave the same); on success it replaces ``path``, on an
    exception it is removed and an existing ``path`` is left untouched. The temporary's name holds the
    writer's process id, so one left by a killed writer (SIGKILL, power loss) is removed by the next write
    of the same ``path`` on this machine.
    """
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise InputError(f"output path is a folder, expected a file name: {target}")
    if not folder.is_dir():
        raise InputError(f"output folder does not exist: {folder}")
    _remove_dead_writers_temporaries(folder, target.name)
    while True:  # O_EXCL guarantees a fresh file; the mode follows the umask like a normal write
        temp = folder / f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{target.name}"
        try:
            os.close(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
        except OSError as err:
            raise InputError(f"cannot write in {folder}: {err.strerror}") from None
    try:
        yield temp
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def _remove_dead_writers_temporaries(folder: Path, name: str) -> None:
    """Remove ``.tmp-<pid>-<token>-<name>`` files in ``folder`` whose writing process no longer runs."""
    for stale in folder.glob(f".tmp-*-*-{name}"):
        pid = stale.name[len(".tmp-"):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _process_alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            stale.unlink()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def atomic_outputs(*paths) -> Iterator[tuple]:
    """:func:`atomic_output` for several files written as one result: temporaries for every path; none
    replaces its target unless all writers finished (then they are renamed in, one after the other)."""
    with contextlib.ExitStack() as stack:
        yield tuple(stack.enter_context(atomic_output(path)) for path in paths)


def writable_folder(path, replaceable=None) -> Path:
    """Check, before any work, that the folder ``path`` can be written as a whole: it does not exist or is a
    folder, the nearest existing folder above it can be written in, and an existing one holds only names in
    ``replaceable`` (a folder with other files is never replaced). InputError otherwise; returns the path."""
    target = Path(path)
    if target.exists():
        if not target.is_dir():
            raise InputError(f"--out {target} exists and is not a folder")
        if replaceable is not None:
            foreign = sorted(p.name for p in target.iterdir() if p.name not in replaceable)
            if foreign:
                raise InputError(f"--out {target} holds files that are not its output ({', '.join(foreign[:3])}"
                                 f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty folder")
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"cannot create --out {target}: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"cannot create --out {target}: {ancestor} is not writable")
    return target


@contextlib.contextmanager
def atomic_folder(path, replaceable=None) -> Iterator[Path]:
    """Yield a fresh temporary folder beside the folder ``path`` (parents created); on success it takes the
    place of ``path`` as a whole, on an exception it is removed and an existing ``path`` is left as it was.

    An existing ``path`` must pass :func:`writable_folder` with ``replaceable``; it is renamed aside just before
    the new one is renamed in and removed after, so a crash between the two renames leaves it complete under
    ``.old-*``: the next call for the same path puts it back (and removes temporaries left by a killed writer).
    """
    import shutil

    target = writable_folder(path, replaceable)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".old-*-{target.name}"):  # a crash between the two renames
        if target.exists():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(stale, target)
    for stale in target.parent.glob(f".tmp-*-{target.name}"):  # a writer killed before it finished
        shutil.rmtree(stale, ignore_errors=True)
    temp = target.parent / f".tmp-{secrets.token_hex(4)}-{target.name}"
    temp.mkdir()
    try:
        yield temp
        old = None
        if target.exists():
            old = target.parent / f".old-{secrets.token_hex(4)}-{target.name}"
            os.replace(target, old)
        os.replace(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _jsonable(obj: Any) -> Any:
    """Plain-JSON form of ``obj``: numpy scalars/arrays to Python, paths to str, NaN/±Inf to None."""
    if isinstance(obj, Mapping):
        return {str(key): _jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(value) for value in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(path, obj) -> None:
    """Write ``obj`` as indented, strict JSON atomically. Numpy scalars and arrays become numbers and
    lists, paths strings; non-finite floats become ``null`` (strict JSON has no NaN/Infinity)."""
    text = json.dumps(_jsonable(obj), indent=2, allow_nan=False)
    with atomic_output(path) as temp:
        temp.write_text(text + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- volumes
@dataclasses.dataclass(frozen=True)
class VolumeData:
    """A volume in the LPS convention of this module.

    array: float32 ``[Z, Y, X]`` (HU for CT). spacing: (dz, dy, dx) mm. origin: (x, y, z) LPS mm of
    the centre of voxel ``[0, 0, 0]``. description: where it came from, one line.
    """

    array: np.ndarray
    spacing: tuple
    origin: tuple
    description: str

    def centre_crop(self, size) -> "VolumeData":
        """The central ``size`` (Z, Y, X) voxels (an odd margin leaves the extra voxel at the end), with
        the origin of its own voxel ``[0, 0, 0]``. InputError unless 1 ≤ size ≤ shape on every axis."""
        size = tuple(int(n) for n in size)
        if len(size) != 3 or any(not 1 <= c <= n for c, n in zip(size, self.array.shape)):
            raise InputError(f"a crop must be 3 sizes (Z, Y, X) within the volume's {self.array.shape} voxels, "
                             f"got {tuple(size)}")
        start = [(n - c) // 2 for n, c in zip(self.array.shape, size)]
        array = self.array[tuple(slice(s, s + c) for s, c in zip(start, size))]
        origin = np.asarray(self.origin, dtype=np.float64) + np.array(start[::-1]) * np.array(self.spacing[::-1])
        return VolumeData(np.ascontiguousarray(array), self.spacing, tuple(float(o) for o in origin),
                          f"{self.description}, centre crop {'x'.join(map(str, size))}")


def load_volume(path, *, allow_resample: bool = False, spacing=None) -> tuple:
    """Load a CT volume: ``(float32 array [Z, Y, X] in HU, spacing (dz, dy, dx) mm)``, LPS-oriented.

    ``path``: a NIfTI file (.nii/.nii.gz), a DICOM series folder (or one file of the series), a
    ``.npy`` array or a ``.npz`` with key ``volume`` (HU) or ``ground_truth``, optional ``spacing``.
    ``spacing`` (dz, dy, dx) mm is for .npy/.npz arrays that lack one (default 1 mm).
    ``allow_resample``: resample a DICOM series with non-uniform or missing slices to uniform
    spacing by linear interpolation along z instead of refusing it. See :func:`read_volume`.
    """
    volume = read_volume(path, allow_resample=allow_resample, spacing=spacing)
    return volume.array, volume.spacing


def read_volume(path, *, allow_resample: bool = False, spacing=None, skip_bad_slices: bool = False) -> VolumeData:
    """Like :func:`load_volume`, returning :class:`VolumeData` (array, spacing, origin, description).

    skip_bad_slices (DICOM): leave out the files of the series that cannot be read or hold no pixel data,
    with a :class:`SkippedSlicesWarning` naming them (else each is an InputError); a skipped slice inside
    the stack still fails as a gap unless ``allow_resample``."""
    source = Path(path)
    name = source.name.lower()
    if not source.exists():
        raise InputError(f"volume not found: {source}")
    if source.is_dir() or name.endswith(_DICOM_SUFFIXES) or (source.is_file() and _has_dicom_magic(source)):
        _refuse_spacing(spacing, source)
        volume = _read_dicom(source, allow_resample, skip_bad_slices)
    elif name.endswith(_NIFTI_SUFFIXES):
        _refuse_spacing(spacing, source)
        volume = _read_nifti(source)
    elif name.endswith(".npy"):
        volume = _read_npy(source, spacing)
    elif name.endswith(".npz"):
        volume = _read_npz_volume(source, spacing)
    else:
        raise InputError(f"unsupported volume format: {source} (expected NIfTI .nii/.nii.gz, a DICOM series folder, "
                         ".npy or .npz)")
    low, high = _PLAUSIBLE_VOXEL_MM
    if not all(low <= d <= high for d in volume.spacing):
        raise InputError(f"{source}: voxel size {tuple(f'{d:.6g}' for d in volume.spacing)} mm (z, y, x) is not a "
                         f"CT's (expected {low:g} to {high:g} mm); check the file's header")
    return volume


def save_volume(path, array, spacing, origin=(0.0, 0.0, 0.0)) -> None:
    """Write a ``[Z, Y, X]`` LPS volume as NIfTI (float32, atomically).

    spacing (dz, dy, dx) mm; origin (x, y, z) LPS mm of voxel ``[0, 0, 0]``. The stored affine is the
    usual RAS+ one (negative x and y columns), so viewers show the correct orientation and
    :func:`load_volume` returns the same array and spacing.
    """
    import nibabel as nib

    name = Path(path).name.lower()
    if not name.endswith(_NIFTI_SUFFIXES):
        raise InputError(f"save_volume writes NIfTI: the file name must end in .nii or .nii.gz, got {path}")
    data = _as_volume_array(array, "volume")
    dz, dy, dx = _spacing_triple(spacing, "spacing")
    origin_lps = _finite_triple(origin, "origin")
    index_to_lps = np.eye(4)
    index_to_lps[:3, :3] = np.diag([dx, dy, dz])
    index_to_lps[:3, 3] = origin_lps
    image = nib.Nifti1Image(data.transpose(2, 1, 0), _RAS_FROM_LPS @ index_to_lps)
    image.header.set_xyzt_units("mm")
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    with atomic_output(path) as temp:
        nib.save(image, temp)


def _refuse_spacing(spacing, source: Path) -> None:
    if spacing is not None:
        raise InputError(f"a spacing was given but {source} carries its own voxel spacing")


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _finite_triple(value, name: str) -> tuple:
    try:
        items = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be 3 numbers, got {value!r}") from None
    if items.size != 3 or not np.all(np.isfinite(items)):
        raise InputError(f"{name} must be 3 finite numbers, got {value!r}")
    return tuple(float(v) for v in items)


def _spacing_triple(value, name: str) -> tuple:
    items = _finite_triple(value, name)
    if min(items) <= 0:
        raise InputError(f"{name} must be positive (dz, dy, dx) mm, got {items}")
    return items


def _as_volume_array(array, what: str) -> np.ndarray:
    """Validate a 3-D real array and return it as C-contiguous float32."""
    data = np.asarray(array)
    if data.dtype.kind not in "iuf":
        raise InputError(f"{what} must hold real numbers, got dtype {data.dtype}")
    if data.ndim != 3:
        raise InputError(f"{what} must be a 3-D [Z, Y, X] array, got {data.ndim}-D shape {data.shape}")
    if 0 in data.shape:
        raise InputError(f"{what} is empty (shape {data.shape})")
    data = np.ascontiguousarray(data, dtype=np.float32)
    if not np.all(np.isfinite(data)):
        raise InputError(f"{what} contains NaN or Inf values")
    return data


def _centred_origin(shape, spacing) -> tuple:
    """Origin that puts the volume centre at (0, 0, 0) (for arrays without a patient frame)."""
    return tuple(-(n - 1) / 2.0 * d for n, d in zip(shape[::-1], spacing[::-1]))


def _to_lps(data: np.ndarray, index_to_lps: np.ndarray, source: str) -> tuple:
    """Reorient ``data`` (3-D, any axis order) whose index→LPS-mm affine is ``index_to_lps`` to
    ``[Z, Y, X]`` LPS by flips/permutations. Returns (array, spacing (dz,dy,dx), origin (x,y,z))."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    columns = index_to_lps[:3, :3]
    norms = np.linalg.norm(columns, axis=0)
    if not np.all(np.isfinite(columns)) or np.any(norms <= 0):
        raise InputError(f"{source}: the voxel-to-world affine is degenerate")
    unit = columns / norms
    off_axis = 1.0 - np.max(np.abs(unit), axis=0)
    if np.max(off_axis) > _AXIS_TOLERANCE ** 2 / 2:  # cos(angle) ≈ 1 - angle²/2
        cosines = np.abs(unit.T @ unit - np.eye(3))
        angle = math.degrees(math.acos(float(np.min(np.max(np.abs(unit), axis=0)))))
        if np.max(cosines) > _AXIS_TOLERANCE:
            raise InputError(f"{source}: the voxel grid is sheared (gantry tilt, about {angle:.2f} degrees); "
                             "resample it to an orthogonal grid first (e.g. dcm2niix, ITK)")
        raise InputError(f"{source}: oblique orientation ({angle:.2f} degrees from the patient axes) cannot be "
                         "reoriented by flips and permutations; resample it to an axis-aligned grid first")
    transform = ornt_transform(io_orientation(index_to_lps), _ZYX_LPS_ORNT)
    array = np.ascontiguousarray(apply_orientation(data, transform))
    affine = index_to_lps @ inv_ornt_aff(transform, data.shape)
    # Rounded to 1e-6 mm: affines stored in float32 would otherwise report 3.200000047683716.
    spacing = tuple(round(float(v), 6) for v in np.linalg.norm(affine[:3, :3], axis=0))
    origin = tuple(round(float(v), 6) for v in affine[:3, 3])
    return array, spacing, origin


# ----------------------------------------------------------------------------- NIfTI
#: Voxel sizes (mm) a CT volume can have; outside, the header is wrong (a 0 that a reader turned into 1 mm is
#: caught where the header is read).
_PLAUSIBLE_VOXEL_MM = (0.01, 100.0)
_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_CHUNK = 1 << 22


def _verify_gzip(source: Path) -> int:
    """Decompress the whole gzip stream of ``source`` (every member) so that its CRC-32 and length are checked,
    and return its length (bytes):
    nibabel reads only the bytes of the voxels, and the stream's trailer, where corruption is detected, is
    never reached. InputError naming the file on a corrupt or truncated stream."""
    length = 0
    try:
        with gzip.open(source, "rb") as stream:
            while chunk := stream.read(_GZIP_CHUNK):
                length += len(chunk)
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise InputError(f"{source} is corrupt: its gzip stream fails its check ({err or type(err).__name__}); "
                         "the file was damaged or cut short") from None
    return length


def _read_nifti(source: Path) -> VolumeData:
    import nibabel as nib
    from nibabel.openers import ImageOpener

    if not source.is_file():
        raise InputError(f"not a file: {source}")
    with open(source, "rb") as handle:
        compressed = handle.read(2) == _GZIP_MAGIC
    stored_bytes = _verify_gzip(source) if compressed else source.stat().st_size
    try:
        image = nib.load(source)
        shape = image.shape
        if len(shape) < 3 or any(n != 1 for n in shape[3:]):
            raise InputError(f"{source}: a 3-D volume is needed, the image has shape {shape}")
        with ImageOpener(source) as handle:  # the header as stored: nibabel's checks turn a 0 into 1 mm
            zooms = type(image.header).from_fileobj(handle, check=False)["pixdim"][1:4]
        if any(not abs(z) > 0 for z in zooms):
            raise InputError(f"{source}: the header's voxel size is {tuple(float(z) for z in zooms)} mm; a size of 0 "
                             "has no meaning (readers silently take 1 mm): fix the header")
        needed = int(image.header.get_data_offset()) + math.prod(shape) * image.get_data_dtype().itemsize
        if stored_bytes < needed:  # before allocating what the header claims
            raise InputError(f"{source}: the header describes {'x'.join(map(str, shape))} voxels of "
                             f"{image.get_data_dtype()} ({needed} bytes) but the file holds {stored_bytes}: it is "
                             "truncated or its header is damaged")
        check_memory(8 * math.prod(shape[:3]), f"{source.name} (its header says {'x'.join(map(str, shape[:3]))} voxels)",
                     "if that is not the volume's size, the header is damaged")  # stored data + float32 copy
        data = np.asanyarray(image.dataobj).reshape(shape[:3])  # scl_slope/scl_inter applied
        affine = np.asarray(image.affine, dtype=np.float64)
    except InputError:
        raise
    except Exception as err:  # nibabel/gzip/zlib raise many types for corrupt or truncated files
        raise InputError(f"cannot read NIfTI file {source}: {type(err).__name__}: {err}") from None
    data = _as_volume_array(data, f"NIfTI file {source}")
    array, spacing, origin = _to_lps(data, _RAS_FROM_LPS @ affine, f"NIfTI file {source}")
    codes = "".join(nib.aff2axcodes(affine))
    return VolumeData(array, spacing, origin, f"NIfTI {source.name} (stored {codes}, reoriented to LPS)")


# ----------------------------------------------------------------------------- .npy / .npz
def _read_npy(source: Path, spacing) -> VolumeData:
    try:
        data = np.load(source, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise InputError(f"cannot read .npy file {source}: {err}") from None
    array = _as_volume_array(data, f"array in {source}")
    spacing = (1.0, 1.0, 1.0) if spacing is None else _spacing_triple(spacing, "spacing")
    return VolumeData(array, spacing, _centred_origin(array.shape, spacing), f"array {source.name}")


def _open_npz(source: Path):
    if not source.is_file():
        raise InputError(f"not a file: {source}")
    try:
        archive = np.load(source, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(f"cannot read {source} as an .npz file: {err}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InputError(f"{source} holds one .npy array, not an .npz archive: rename it to .npy")
    return archive


def _npz_member(archive, key: str, source: Path) -> np.ndarray:
    try:
        return archive[key]
    except Exception as err:  # zipfile/zlib/format errors of a corrupt member, or pickled objects
        raise InputError(f"cannot read array '{key}' of {source}: {type(err).__name__}: {err}") from None


def _npz_text(archive, key: str, source: Path) -> str:
    value = _npz_member(archive, key, source)
    if value.ndim != 0 or value.dtype.kind not in "US":
        raise InputError(f"'{key}' in {source} must be a JSON string")
    return str(value.item().decode() if value.dtype.kind == "S" else value.item())


def _read_npz_volume(source: Path, spacing) -> VolumeData:
    with _open_npz(source) as archive:
        keys = set(archive.files)
        key = "volume" if "volume" in keys else "ground_truth" if "ground_truth" in keys else None
        if key is None:
            raise InputError(f"{source} holds no 'volume' or 'ground_truth' array (found: {', '.join(sorted(keys))})")
        array = _as_volume_array(_npz_member(archive, key, source), f"'{key}' in {source}")
        if key == "ground_truth" and "geometry" in keys:  # a scan file: unit attenuation, grid from geometry
            from ctrecon.core.units import unit_to_hu

            _refuse_spacing(spacing, source)
            geometry = _geometry_from_json(_npz_text(archive, "geometry", source), None, source)
            if array.shape != geometry.nVoxel:
                raise InputError(f"ground_truth in {source} has shape {array.shape}, geometry nVoxel {geometry.nVoxel}")
            array = np.asarray(unit_to_hu(array), dtype=np.float32)
            meta = json.loads(_npz_text(archive, "meta", source)) if "meta" in keys else {}
            if isinstance(meta, dict) and "origin" in meta:  # the source volume's patient frame
                origin = _finite_triple(meta["origin"], f"meta origin in {source}")
            else:
                origin = tuple(c - (n - 1) / 2.0 * d for c, n, d in
                               zip(geometry.offOrigin[::-1], geometry.nVoxel[::-1], geometry.dVoxel[::-1]))
            return VolumeData(array, geometry.dVoxel, origin, f"ground truth of scan {source.name} (unit → HU)")
        if "spacing" in keys:
            stored = _spacing_triple(_npz_member(archive, "spacing", source), f"'spacing' in {source}")
            if spacing is not None and not np.allclose(stored, _spacing_triple(spacing, "spacing")):
                raise InputError(f"spacing {tuple(spacing)} disagrees with the one stored in {source}: {stored}")
            spacing = stored
    spacing = (1.0, 1.0, 1.0) if spacing is None else _spacing_triple(spacing, "spacing")
    return VolumeData(array, spacing, _centred_origin(array.shape, spacing), f"array '{key}' of {source.name}")


# ----------------------------------------------------------------------------- DICOM
_SKIP_ADVICE = "remove or replace it, or skip such files (--skip-bad-slices)"
class SkippedSlicesWarning(UserWarning):
    """Files of a DICOM series left out by ``read_volume(..., skip_bad_slices=True)``."""


def _read_dicom(source: Path, allow_resample: bool, skip_bad: bool = False) -> VolumeData:
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder, wanted_series = source, None
    if not source.is_dir():  # one file of a series: load the series it belongs to
        folder = source.parent
        try:
            wanted_series = pydicom.dcmread(source, stop_before_pixels=True).get("SeriesInstanceUID")
        except (InvalidDicomError, OSError, EOFError, ValueError) as err:
            raise InputError(f"cannot read DICOM file {source}: {err}") from None
    slices, skipped = [], []

    def bad_slice(path: Path, what: str, advice: str) -> None:
        if not skip_bad:
            raise InputError(f"DICOM file {path} {what}; the series would lose a slice: {advice}")
        skipped.append(f"{path.name} {what}")

    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            dataset = pydicom.dcmread(path)
        except InvalidDicomError:
            try:  # files written without the 128-byte preamble; probing non-DICOM files warns
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    dataset = pydicom.dcmread(path, force=True)
            except Exception:  # noqa: BLE001 - anything unreadable as DICOM is not part of the series...
                dataset = None
            if dataset is None or "ImagePositionPatient" not in dataset:
                if path.suffix.lower() in _DICOM_SUFFIXES:  # ...unless it is named as a slice of it
                    bad_slice(path, "cannot be read (damaged or not DICOM)", _SKIP_ADVICE)
                continue
        except (OSError, EOFError, ValueError, KeyError) as err:
            raise InputError(f"cannot read DICOM file {path}: {err}") from None
        if "PixelData" not in dataset:
            if "ImagePositionPatient" in dataset and (wanted_series is None
                                                      or dataset.get("SeriesInstanceUID") == wanted_series):
                bad_slice(path, "is a slice of the series without pixel data", _SKIP_ADVICE)
            continue  # DICOMDIR, reports, ...
        if wanted_series is None or dataset.get("SeriesInstanceUID") == wanted_series:
            slices.append((path, dataset))
    if not slices:
        raise InputError(f"no DICOM images found in {folder}")
    if skipped:
        warnings.warn(SkippedSlicesWarning(f"{folder}: left out {len(skipped)} DICOM file(s) of the series: "
                                           + "; ".join(skipped)), stacklevel=3)
    return _stack_dicom(slices, folder, allow_resample)


def _dicom_header(path: Path, dataset) -> dict:
    """The geometry and rescaling of one slice, validated."""
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
        if tag not in dataset:
            raise InputError(f"DICOM file {path.name} lacks {tag}; cannot place it in a volume")
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        raise InputError(f"DICOM file {path.name} is multi-frame (enhanced) DICOM, which is not supported; "
                         "convert it to NIfTI (e.g. with dcm2niix)")
    if int(dataset.get("SamplesPerPixel", 1)) != 1:
        raise InputError(f"DICOM file {path.name} is not a grayscale image")
    try:
        position = np.array([float(v) for v in dataset.ImagePositionPatient])
        orientation = np.array([float(v) for v in dataset.ImageOrientationPatient])
        pixel_spacing = np.array([float(v) for v in dataset.PixelSpacing])
        slope = float(dataset.get("RescaleSlope", 1.0))
        intercept = float(dataset.get("RescaleIntercept", 0.0))
    except (TypeError, ValueError) as err:
        raise InputError(f"DICOM file {path.name} has a malformed geometry/rescale tag: {err}") from None
    if position.size != 3 or orientation.size != 6 or pixel_spacing.size != 2:
        raise InputError(f"DICOM file {path.name} has malformed ImagePositionPatient/ImageOrientationPatient/"
                         "PixelSpacing")
    values = np.concatenate([position, orientation, pixel_spacing, [slope, intercept]])
    if not np.all(np.isfinite(values)) or np.any(pixel_spacing <= 0):
        raise InputError(f"DICOM file {path.name} has non-finite or non-positive geometry values")
    return {"series": dataset.get("SeriesInstanceUID"), "shape": (int(dataset.Rows), int(dataset.Columns)),
            "position": position, "orientation": orientation, "pixel_spacing": pixel_spacing,
            "slope": slope, "intercept": intercept}


def _stack_dicom(slices: list, folder: Path, allow_resample: bool) -> VolumeData:
    headers = [_dicom_header(path, dataset) for path, dataset in slices]
    first = headers[0]
    series = {h["series"] for h in headers}
    if len(series) > 1:
        raise InputError(f"{folder} mixes {len(series)} DICOM series; pass one file of the wanted series "
                         "instead of the folder")
    for (path, _), header in zip(slices, headers):
        if header["shape"] != first["shape"]:
            raise InputError(f"{folder}: slices differ in size ({path.name} is {header['shape']}, "
                             f"{slices[0][0].name} is {first['shape']})")
        if not np.allclose(header["orientation"], first["orientation"], atol=1e-4):
            raise InputError(f"{folder}: slices differ in ImageOrientationPatient ({path.name})")
        if not np.allclose(header["pixel_spacing"], first["pixel_spacing"], rtol=1e-4):
            raise InputError(f"{folder}: slices differ in PixelSpacing ({path.name})")
    if len(slices) < 2:
        raise InputError(f"{folder} holds a single DICOM image; a volume needs a series of slices")
    row_dir, col_dir = first["orientation"][:3], first["orientation"][3:]
    if abs(np.linalg.norm(row_dir) - 1) > 1e-3 or abs(np.linalg.norm(col_dir) - 1) > 1e-3 \
            or abs(row_dir @ col_dir) > 1e-3:
        raise InputError(f"{folder}: ImageOrientationPatient is not two orthonormal directions")
    normal = np.cross(row_dir, col_dir)
    positions = np.array([h["position"] for h in headers])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    names = [slices[i][0].name for i in order]
    steps = np.diff(along)
    pixel = float(min(first["pixel_spacing"]))
    duplicate = np.flatnonzero(steps < 1e-3 * max(float(np.median(steps)), 1e-6))
    if duplicate.size:
        i = int(duplicate[0])
        raise InputError(f"{folder}: duplicate slice position {along[i]:.3f} mm ({names[i]}, {names[i + 1]})")
    lateral = positions - positions[:1] - np.outer(along - along[0], normal)
    drift = np.linalg.norm(lateral, axis=1)
    if np.max(drift) > 0.05 * pixel:
        tilt = math.degrees(math.atan2(float(drift[-1]), float(along[-1] - along[0])))
        raise InputError(f"{folder}: slices are offset sideways along the stack (gantry tilt, about {tilt:.2f} "
                         "degrees); tilted series are not supported, even with allow_resample; resample them "
                         "with a tilt-correcting converter (e.g. dcm2niix) first")
    step = float(along[-1] - along[0]) / (len(along) - 1)  # the mean: robust to rounded positions
    deviation = float(np.max(np.abs(along - along[0] - step * np.arange(len(along)))))
    resample = deviation > max(0.1 * step, 0.01)
    if resample and not allow_resample:
        gap, typical = int(np.argmax(steps)), float(np.median(steps))
        if steps[gap] > 1.5 * typical:
            raise InputError(f"{folder}: missing slice(s) between {along[gap]:.2f} and {along[gap + 1]:.2f} mm "
                             f"(spacing {typical:.3f} mm, {names[gap]} → {names[gap + 1]}); pass allow_resample=True "
                             "to interpolate")
        raise InputError(f"{folder}: non-uniform slice spacing ({steps.min():.3f} to {steps.max():.3f} mm); pass "
                         "allow_resample=True to resample to uniform spacing")
    stack = np.empty((len(order),) + first["shape"], dtype=np.float32)
    for k, index in enumerate(order):
        path, dataset = slices[index]
        try:
            pixels = dataset.pixel_array
        except Exception as err:  # noqa: BLE001 - missing codec, truncated data: pydicom raises many types
            raise InputError(f"cannot decode pixel data of DICOM file {path.name} (transfer syntax "
                             f"{getattr(dataset.file_meta, 'TransferSyntaxUID', '?')}): {err}") from None
        if pixels.shape != first["shape"]:
            raise InputError(f"DICOM file {path.name}: pixel data shape {pixels.shape} disagrees with Rows/Columns")
        header = headers[index]
        stack[k] = pixels.astype(np.float32) * np.float32(header["slope"]) + np.float32(header["intercept"])
    if resample:
        stack, step = _resample_uniform(stack, along)
    index_to_lps = np.eye(4)
    index_to_lps[:3, 0] = normal * step
    index_to_lps[:3, 1] = col_dir * first["pixel_spacing"][0]  # down the rows: PixelSpacing[0]
    index_to_lps[:3, 2] = row_dir * first["pixel_spacing"][1]  # along a row: PixelSpacing[1]
    index_to_lps[:3, 3] = positions[0]
    array, spacing, origin = _to_lps(_as_volume_array(stack, f"DICOM series in {folder}"), index_to_lps,
                                     f"DICOM series in {folder}")
    description = slices[0][1].get("SeriesDescription", "") or ""
    note = f", resampled from {len(along)} non-uniform slices" if resample else ""
    return VolumeData(array, spacing, origin,
                      f"DICOM series {folder.name} {description!s}".rstrip() + f" ({array.shape[0]} slices{note})")


def _resample_uniform(stack: np.ndarray, along: np.ndarray) -> tuple:
    """Linear interpolation of slices at sorted positions ``along`` onto a uniform grid spanning them,
    with about the median spacing. Returns (stack, spacing)."""
    median = float(np.median(np.diff(along)))
    count = int(round((along[-1] - along[0]) / median)) + 1
    step = float(along[-1] - along[0]) / (count - 1)
    out = np.empty((count,) + stack.shape[1:], dtype=np.float32)
    for k, target in enumerate(along[0] + step * np.arange(count)):
        below = min(int(np.searchsorted(along, target, side="right")) - 1, len(along) - 2)
        weight = np.float32((target - along[below]) / (along[below + 1] - along[below]))
        out[k] = (1 - weight) * stack[below] + weight * stack[below + 1]
    return out, step


# ----------------------------------------------------------------------------- scan files
#: Unit attenuation is (clip(HU) + 1024) / 4095 ∈ [0, 1]; values beyond ±this (noise, interpolation overshoot
#: allowed) mean another scale, e.g. HU or μ in 1/cm.
_PLAUSIBLE_UNIT_MAX = 2.0


@dataclasses.dataclass
class Scan:
    """A (simulated or measured) scan, as stored in a scan ``.npz`` file (DESIGN.md §2).

    projections: float32 ``[A, V, U]`` line integrals (unit attenuation × mm). angles: float64
    ``[A]`` radians, equal to ``geometry.angles``. ground_truth: float32 ``[Z, Y, X]`` in unit
    attenuation on the geometry's voxel grid, or None. meta: JSON-able provenance (source volume,
    dose/noise model, seed, version). Validated on construction (InputError).
    """

    projections: np.ndarray
    angles: np.ndarray
    geometry: ScanGeometry
    ground_truth: np.ndarray | None = None
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.geometry, ScanGeometry):
            raise InputError(f"geometry must be a ScanGeometry, got {type(self.geometry).__name__}")
        self.projections = _finite_array(self.projections, np.float32, "projections")
        self.angles = _finite_array(self.angles, np.float64, "angles")
        if self.projections.shape != self.geometry.projection_shape:
            raise InputError(f"projections have shape {self.projections.shape}, the geometry expects "
                             f"{self.geometry.projection_shape} (A, V, U)")
        if self.angles.shape != self.geometry.angles.shape or not np.array_equal(self.angles, self.geometry.angles):
            raise InputError("angles disagree with geometry.angles")
        longest = float(np.linalg.norm(self.geometry.sVoxel))  # mm: no ray is longer inside the volume
        largest = float(np.abs(self.projections).max()) if self.projections.size else 0.0
        if largest > _PLAUSIBLE_UNIT_MAX * longest:
            raise InputError(f"projections reach {largest:.4g} unit·mm, but a ray through this volume (at most "
                             f"{longest:.4g} mm long, unit attenuation ≤ 1) cannot exceed {longest:.4g}: they are "
                             "not line integrals of unit attenuation (other units, or not log-converted?)")
        if self.ground_truth is not None:
            self.ground_truth = _finite_array(self.ground_truth, np.float32, "ground_truth")
            if self.ground_truth.shape != self.geometry.nVoxel:
                raise InputError(f"ground_truth has shape {self.ground_truth.shape}, the geometry's nVoxel is "
                                 f"{self.geometry.nVoxel}")
            low, high = float(self.ground_truth.min()), float(self.ground_truth.max())
            if low < -_PLAUSIBLE_UNIT_MAX or high > _PLAUSIBLE_UNIT_MAX:
                raise InputError(f"ground_truth spans [{low:.4g}, {high:.4g}], outside unit attenuation [0, 1]"
                                 f"{' (it looks like HU: convert with ctrecon.core.units.hu_to_unit)' if max(high, -low) > 100 else ''}")
        if not isinstance(self.meta, Mapping):
            raise InputError(f"meta must be a dict, got {type(self.meta).__name__}")
        self.meta = dict(self.meta)


def _finite_array(value, dtype, name: str) -> np.ndarray:
    data = np.asarray(value)
    if data.dtype.kind not in "iuf":
        raise InputError(f"{name} must hold real numbers, got dtype {data.dtype}")
    data = np.ascontiguousarray(data, dtype=dtype)
    if not np.all(np.isfinite(data)):
        raise InputError(f"{name} contains NaN or Inf values")
    return data


def _geometry_from_json(text: str, angles, source: Path) -> ScanGeometry:
    """Geometry from its JSON with the given ``angles``; None: those in the JSON, else one dummy angle."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"'geometry' in {source} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise InputError(f"'geometry' in {source} must be a JSON object")
    listed = data.pop("angles", None)
    if angles is None:
        angles = [0.0] if listed is None else listed
    elif listed is not None and not (np.shape(listed) == angles.shape and np.allclose(listed, angles)):
        raise InputError(f"'geometry' in {source} lists angles that disagree with the 'angles' array")
    try:
        return geometry_from_dict(data, angles=angles)
    except (TypeError, ValueError) as err:
        raise InputError(f"invalid geometry in {source}: {err}") from None


def load_scan(path) -> Scan:
    """Read and validate a scan ``.npz`` (never unpickles): required ``projections``, ``angles``,
    ``geometry`` (JSON); optional ``ground_truth``, ``meta`` (JSON). Any problem is an InputError."""
    source = Path(path)
    if not source.exists():
        raise InputError(f"scan file not found: {source}")
    if source.is_dir():
        raise InputError(f"{source} is a folder, expected a scan .npz file")
    if source.suffix.lower() != ".npz":
        raise InputError(f"a scan file must be an .npz, got {source}")
    with _open_npz(source) as archive:
        missing = [key for key in _SCAN_REQUIRED if key not in archive.files]
        if missing:
            raise InputError(f"{source} is not a scan file: it lacks {', '.join(missing)}")
        projections = _npz_member(archive, "projections", source)
        angles = _npz_member(archive, "angles", source)
        for name, value, ndim in (("projections", projections, 3), ("angles", angles, 1)):
            if value.ndim != ndim:
                raise InputError(f"'{name}' in {source} must be {ndim}-D, got shape {value.shape}")
        angles = _finite_array(angles, np.float64, f"'angles' in {source}")
        geometry = _geometry_from_json(_npz_text(archive, "geometry", source), angles, source)
        ground_truth = _npz_member(archive, "ground_truth", source) if "ground_truth" in archive.files else None
        meta = {}
        if "meta" in archive.files:
            try:
                meta = json.loads(_npz_text(archive, "meta", source))
            except json.JSONDecodeError as err:
                raise InputError(f"'meta' in {source} is not valid JSON: {err}") from None
        if not isinstance(meta, dict):
            raise InputError(f"'meta' in {source} must be a JSON object")
    try:
        return Scan(projections, angles, geometry, ground_truth, meta)
    except InputError as err:
        raise InputError(f"{source}: {err}") from None


def save_scan(path, scan: Scan, *, compress: bool = False) -> None:
    """Write ``scan`` as an ``.npz`` atomically. Uncompressed by default: loading is then as fast as
    the disk, and noisy float32 projections compress poorly; ``compress=True`` uses zip deflate."""
    if Path(path).suffix.lower() != ".npz":
        raise InputError(f"a scan file must be an .npz, got {path}")
    arrays = {"projections": scan.projections, "angles": scan.angles,
              "geometry": np.array(scan.geometry.to_json(include_angles=False)),
              "meta": np.array(json.dumps(_jsonable(scan.meta), allow_nan=False))}
    if scan.ground_truth is not None:
        arrays["ground_truth"] = scan.ground_truth
    writer = np.savez_compressed if compress else np.savez
    with atomic_output(path) as temp, open(temp, "wb") as handle:
        writer(handle, **arrays)
