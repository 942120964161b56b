"""Pre-training data: CT folders → preprocessed volumes → augmented 96³ crops (MedGMAE §4.2).

Folders: the AbdomenAtlas1.0Mini layout (``BDMAP_XXXXXXXX/ct.nii.gz``; the segmentations are not
used) or any folder holding NIfTI volumes (searched recursively; files inside ``segmentations``
folders are skipped). Preprocessing: trilinear resampling to ``spacing_mm`` isotropic (1.5 mm), the HU
window ``window_hu`` (the paper's [−175, 250]; the reconstruction prior uses the unit-attenuation
window [−1024, 3071] of DESIGN.md §2, where the crop values are exactly unit attenuation), scaled to
[0, 1]. Crops: ``crop_size``³, centred on a foreground voxel (HU above ``foreground_hu``, default the
window floor) with probability ``positive_fraction`` (3:1) and on a background voxel otherwise,
shifted to lie inside the volume, which is zero-padded when smaller than a crop;
``crops_per_volume`` consecutive items come from one volume (like MONAI's ``num_samples``).
Augmentation: a flip of each axis (p 0.5 each), a 90° rotation in the axial plane (p 0.3, k ∈ {1, 2,
3}), intensity scaling ``x·(1+U(−0.1, 0.1))`` (p 0.1) and shift ``x+U(−0.1, 0.1)`` (p 0.1).

Corruption (``corruption``, MDAE-style: the encoder sees a corrupted crop, the loss compares with the
clean one): ``"none"`` (MedGMAE); ``"noise"``, the variance-exploding ``x + σ·z`` with σ ~ U(0,
``noise_sigma_max``) per sample (window units); ``"fdk"``, the same crop of the FDK of a simulated
sparse-view scan of the training volume (what the prior meets at reconstruction): ``fdk_variants``
scans per volume, their view counts spread over ``fdk_views`` and, with ``fdk_dose``, their doses over that
range (photon noise of ``simulate --dose``), each FDK computed once per volume and scan and cached beside the volume.
Clean and corrupted crops share coordinates and augmentation.

Transforms are written in numpy/torch rather than taken from MONAI: they are a few lines each, keep
CPU installs light, and make every crop a pure function of ``(seed, item index)`` — which is what
makes training resumable and identical across worker and process counts.

Order: item ``g`` (a global running index) belongs to epoch ``g // (V·C)``; each epoch permutes the
``V`` volumes with a seed derived from ``(seed, epoch)`` and takes ``C = crops_per_volume`` crops of
each. :class:`StepBatches` hands out the items of optimizer step ``s`` as ``[s·B, (s+1)·B)``, split
across processes and accumulation micro-steps.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ctrecon.core.errors import InputError
from ctrecon.core.units import hu_to_unit, unit_to_hu

__all__ = ["DataConfig", "CORRUPTIONS", "find_volumes", "describe_volumes", "preprocess", "resample_isotropic",
           "VolumeStore", "sample_crop", "augment", "CropDataset", "StepBatches", "window_to_unit"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_CANDIDATE_STRIDE = 2      # foreground/background centre candidates on a 2-voxel lattice
_CACHE_VERSION = 1
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
#: Input corruptions of pre-training (see the module docstring).
CORRUPTIONS = ("none", "noise", "fdk")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Preprocessing, cropping and augmentation settings (recorded in checkpoint metadata)."""

    spacing_mm: float = 1.5
    window_hu: tuple = (-175.0, 250.0)
    foreground_hu: float | None = None
    crop_size: int = 96
    crops_per_volume: int = 4
    positive_fraction: float = 0.75
    flip_prob: float = 0.5
    rotate_prob: float = 0.3
    scale_prob: float = 0.1
    scale_range: float = 0.1
    shift_prob: float = 0.1
    shift_range: float = 0.1
    corruption: str = "none"
    noise_sigma_max: float = 0.1         # "noise": σ ~ U(0, this) per sample, in window units
    fdk_views: tuple = (60, 180)         # "fdk": view counts spread over this range ...
    fdk_variants: int = 4                # ... in this many scans per volume
    fdk_dose: tuple = ()                 # "fdk": () noiseless, or (lowest, highest) photons per pixel

    def __post_init__(self):
        lo, hi = (float(v) for v in self.window_hu)
        object.__setattr__(self, "window_hu", (lo, hi))
        if not hi > lo:
            raise InputError(f"window_hu must be (low, high) with high > low, got {self.window_hu}")
        if self.spacing_mm <= 0 or self.crop_size < 1 or self.crops_per_volume < 1:
            raise InputError("spacing_mm, crop_size and crops_per_volume must be positive")
        for name in ("positive_fraction", "flip_prob", "rotate_prob", "scale_prob", "shift_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.corruption not in CORRUPTIONS:
            raise InputError(f"corruption must be one of {', '.join(CORRUPTIONS)}, got {self.corruption!r}")
        object.__setattr__(self, "fdk_views", tuple(int(v) for v in self.fdk_views))
        if len(self.fdk_views) != 2 or not 1 <= self.fdk_views[0] <= self.fdk_views[1]:
            raise InputError(f"fdk_views must be (fewest, most) views with 1 <= fewest <= most, got {self.fdk_views}")
        object.__setattr__(self, "fdk_dose", tuple(float(d) for d in self.fdk_dose))
        if self.fdk_dose and not (len(self.fdk_dose) == 2 and 0 < self.fdk_dose[0] <= self.fdk_dose[1] < float("inf")):
            raise InputError(f"fdk_dose must be () (noiseless) or (lowest, highest) photons per pixel, got {self.fdk_dose}")
        if self.fdk_variants < 1 or not self.noise_sigma_max >= 0:
            raise InputError("fdk_variants must be >= 1 and noise_sigma_max >= 0")

    @property
    def foreground_threshold_hu(self) -> float:
        return self.window_hu[0] if self.foreground_hu is None else float(self.foreground_hu)

    def fdk_view_count(self, variant: int) -> int:
        """Views of the ``variant``-th simulated scan: ``fdk_variants`` counts evenly over ``fdk_views``."""
        fewest, most = self.fdk_views
        return fewest if self.fdk_variants == 1 else round(fewest + (most - fewest) * variant / (self.fdk_variants - 1))

    def fdk_dose_of(self, variant: int):
        """Incident photons per pixel of the ``variant``-th scan (None: noiseless): log-uniform over ``fdk_dose``
        at the fraction ``variant·0.618… mod 1`` (golden-ratio steps, so dose and view count do not move together)."""
        if not self.fdk_dose:
            return None
        lowest, highest = self.fdk_dose
        return lowest * (highest / lowest) ** ((variant * _GOLDEN) % 1.0)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["window_hu"] = list(self.window_hu)
        out["fdk_views"] = list(self.fdk_views)
        out["fdk_dose"] = list(self.fdk_dose)
        return out


# --------------------------------------------------------------------------- discovery
def find_volumes(root) -> tuple:
    """``(files, layout)``: the CT files under ``root`` (sorted) and ``"AbdomenAtlas1.0Mini"`` or ``"nifti"``.

    ``root`` may also be a single NIfTI file. No volume found is an :class:`InputError`.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"data path does not exist: {root}")
    if root.is_file():
        if not root.name.endswith(NIFTI_SUFFIXES):
            raise InputError(f"not a NIfTI file: {root}")
        return [root], "nifti"
    atlas = sorted(p for p in root.glob("BDMAP_*/ct.nii.gz") if p.is_file())
    if atlas:
        return atlas, "AbdomenAtlas1.0Mini"
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(NIFTI_SUFFIXES)
                   and "segmentations" not in p.relative_to(root).parts)
    if not files:
        raise InputError(f"no NIfTI volumes (*.nii, *.nii.gz or BDMAP_*/ct.nii.gz) under {root}")
    return files, "nifti"


def describe_volumes(root, files, layout) -> dict:
    """Training-data description for checkpoint metadata: root, layout, count and a hash of the names."""
    root = Path(root)
    names = sorted(str(Path(f).relative_to(root)) if root.is_dir() else Path(f).name for f in files)
    digest = hashlib.sha1("\n".join(names).encode()).hexdigest()[:16]
    return {"root": str(root.resolve()), "layout": layout, "n_volumes": len(files), "names_sha1": digest}


# --------------------------------------------------------------------------- preprocessing
def resample_isotropic(volume: np.ndarray, spacing, target_mm: float) -> np.ndarray:
    """Trilinear resampling of ``[Z, Y, X]`` with ``spacing`` (dz, dy, dx) mm to ``target_mm`` isotropic.

    Output voxels are exactly ``target_mm`` apart and share the input's lower outer face; the output
    has ``floor(n·d/target)`` voxels per axis; values beyond the last input centre are replicated.
    """
    factors = [float(d) / float(target_mm) for d in spacing]
    if all(abs(f - 1.0) < 1e-9 for f in factors):
        return np.asarray(volume, dtype=np.float32)
    if any(n * f < 1.0 for n, f in zip(volume.shape, factors)):
        raise InputError(f"volume of shape {volume.shape} at spacing {tuple(spacing)} mm is smaller than one "
                         f"{target_mm} mm voxel")
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    # Output centre o sits at input index (o + ½)·target/d − ½ (scale kept, not recomputed from sizes).
    out = F.interpolate(x, scale_factor=factors, mode="trilinear", align_corners=False, recompute_scale_factor=False)
    return out[0, 0].numpy()


def window_to_unit(hu: np.ndarray, window_hu) -> np.ndarray:
    """Clip to the HU window and scale linearly to [0, 1] (float32)."""
    lo, hi = window_hu
    return ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def preprocess(volume_hu: np.ndarray, spacing, config: DataConfig) -> np.ndarray:
    """HU volume ``[Z, Y, X]`` with ``spacing`` (dz, dy, dx) → isotropic, windowed, [0, 1] float32."""
    return window_to_unit(resample_isotropic(volume_hu, spacing, config.spacing_mm), config.window_hu)


class VolumeStore:
    """Preprocessed volumes by index, from an optional on-disk cache and a small in-memory LRU.

    Cached volumes are stored as uint16 (value·65535, an error ≤ 8e-6) ``.npy`` files keyed by the
    file's path, size and mtime and the preprocessing settings; entries are written atomically, so
    several workers or processes may share a cache directory.
    """

    def __init__(self, files, config: DataConfig, cache_dir=None, memory_items: int = 2):
        self.files = [Path(f) for f in files]
        self.config = config
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.memory_items = memory_items
        self._memory = collections.OrderedDict()

    def __len__(self):
        return len(self.files)

    def _cache_path(self, index: int, *extra) -> Path:
        path = self.files[index].resolve()
        stat = path.stat()
        key = json.dumps([_CACHE_VERSION, str(path), stat.st_size, stat.st_mtime_ns, self.config.spacing_mm,
                          list(self.config.window_hu), *extra])
        return self.cache_dir / f"{path.name.split('.')[0]}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy"

    def _cached(self, index: int, key: tuple, make) -> np.ndarray:
        """``make()`` (a [0, 1] float32 volume), through the on-disk cache when there is one."""
        cache = None if self.cache_dir is None else self._cache_path(index, *key)
        if cache is not None and cache.exists():
            return np.load(cache).astype(np.float32) / 65535.0
        from ctrecon.core.io import atomic_output

        unit = make()
        if cache is None:
            return unit
        stored = np.round(unit * 65535.0).astype(np.uint16)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(cache) as tmp, open(tmp, "wb") as handle:
            np.save(handle, stored)
        return stored.astype(np.float32) / 65535.0  # what a later read of the cache gives: runs stay exact

    def _load(self, index: int) -> np.ndarray:
        from ctrecon.core.io import load_volume

        return self._cached(index, (), lambda: preprocess(*load_volume(self.files[index]), self.config))

    def _fdk(self, index: int, variant: int) -> np.ndarray:
        """The FDK, in the window's [0, 1], of a circular scan (``config.fdk_view_count(variant)`` views, a
        detector covering the volume; noiseless, or with the noise of :func:`ctrecon.core.noise.add_noise` at
        ``config.fdk_dose_of(variant)``, seeded by the file and the scan) of the preprocessed grid, so it lines
        up voxel for voxel."""
        from ctrecon.core.geometry import ConeBeamGeometry, VolumeGeometry
        from ctrecon.core.io import load_volume
        from ctrecon.core.noise import add_noise
        from ctrecon.operators.fdk import fdk
        from ctrecon.operators.projector import Projector

        config = self.config
        views, dose = config.fdk_view_count(variant), config.fdk_dose_of(variant)
        key = ("fdk", views) if dose is None else ("fdk", views, round(dose, 3))

        def make():
            volume, spacing = load_volume(self.files[index])
            unit = torch.from_numpy(hu_to_unit(resample_isotropic(volume, spacing, config.spacing_mm)))
            geometry = ConeBeamGeometry.covering(VolumeGeometry(tuple(unit.shape), (config.spacing_mm,) * 3),
                                                 n_views=views)
            with torch.no_grad():
                projections = Projector(geometry)(unit)
                if dose is not None:
                    seed = int(hashlib.sha1(json.dumps([self.files[index].name, *key]).encode()).hexdigest()[:15], 16)
                    projections = torch.from_numpy(add_noise(projections.numpy(), dose, seed=seed))
                reconstruction = fdk(projections, geometry).numpy()
            return window_to_unit(unit_to_hu(reconstruction), config.window_hu)

        return self._cached(index, key, make)

    def _remembered(self, key, make, capacity: int):
        """``make()`` through the in-memory LRU (most recent last), which keeps at most ``capacity`` entries."""
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        value = self._memory[key] = make()
        while len(self._memory) > capacity:
            self._memory.popitem(last=False)
        return value

    def get_fdk(self, index: int, variant: int) -> np.ndarray:
        """The corrupted twin of volume ``index`` (see :meth:`_fdk`), kept in the same small LRU."""
        return self._remembered(("fdk", index, variant), lambda: self._fdk(index, variant), 2 * self.memory_items)

    def get(self, index: int):
        """``(volume [Z, Y, X] float32 in [0, 1], foreground centres [F, 3], background centres [G, 3])``."""
        return self._remembered(index, lambda: self._with_candidates(self._load(index)), self.memory_items)

    def _with_candidates(self, unit: np.ndarray) -> tuple:
        """``(unit, foreground centres, background centres)`` of a preprocessed volume (see :meth:`get`)."""
        lo, hi = self.config.window_hu
        threshold = (self.config.foreground_threshold_hu - lo) / (hi - lo)
        lattice = unit[::_CANDIDATE_STRIDE, ::_CANDIDATE_STRIDE, ::_CANDIDATE_STRIDE]
        foreground = lattice > threshold
        # int16 coordinates: a 300×300×200 volume keeps ~13 MB of candidates per worker
        return (unit, (np.argwhere(foreground) * _CANDIDATE_STRIDE).astype(np.int16),
                (np.argwhere(~foreground) * _CANDIDATE_STRIDE).astype(np.int16))


# --------------------------------------------------------------------------- crops and augmentation
def sample_crop(volume: np.ndarray, foreground: np.ndarray, background: np.ndarray, size: int,
                positive_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A ``size``³ crop centred on a random foreground (probability ``positive_fraction``) or background
    voxel, shifted inside the volume; a volume smaller than the crop is zero-padded (centred) first.
    ``volume`` is ``[..., Z, Y, X]``: leading axes (a clean volume and its corrupted twin) share the crop."""
    spatial = volume.shape[-3:]
    pick_foreground = rng.random() < positive_fraction
    candidates = foreground if (pick_foreground and len(foreground)) or not len(background) else background
    centre = candidates[rng.integers(len(candidates))].astype(np.int64) if len(candidates) else \
        np.array(spatial) // 2
    pads = [max(0, size - n) for n in spatial]
    if any(pads):
        volume = np.pad(volume, [(0, 0)] * (volume.ndim - 3) + [(p // 2, p - p // 2) for p in pads])
        centre = centre + np.array([p // 2 for p in pads])
    start = [int(np.clip(c - size // 2, 0, n - size)) for c, n in zip(centre, volume.shape[-3:])]
    return np.ascontiguousarray(volume[..., start[0]:start[0] + size, start[1]:start[1] + size,
                                       start[2]:start[2] + size])


def augment(crop: np.ndarray, config: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """Flips (each axis), a 90° axial rotation, intensity scale and shift, as configured; ``crop`` is
    ``[..., D, D, D]`` and leading axes get the same transform."""
    for axis in range(3):
        if rng.random() < config.flip_prob:
            crop = np.flip(crop, crop.ndim - 3 + axis)
    if rng.random() < config.rotate_prob:
        crop = np.rot90(crop, k=int(rng.integers(1, 4)), axes=(-2, -1))
    crop = np.array(crop, dtype=np.float32)
    if rng.random() < config.scale_prob:
        crop *= 1.0 + rng.uniform(-config.scale_range, config.scale_range)
    if rng.random() < config.shift_prob:
        crop += rng.uniform(-config.shift_range, config.shift_range)
    return crop


class CropDataset(torch.utils.data.Dataset):
    """Item ``g`` (any non-negative integer) → ``{"image": [1, D, D, D] float32, "seed": int64}``, and with a
    corruption also ``"input"``: the corrupted ``[1, D, D, D]`` crop the encoder sees (``image`` is the target).

    ``seed`` is the per-sample seed of the patch mask. Every item is a pure function of
    ``(seed, g)``, independent of workers, processes and what was drawn before.
    """

    def __init__(self, files, config: DataConfig, seed: int = 0, cache_dir=None):
        self.store = VolumeStore(files, config, cache_dir)
        self.config = config
        self.seed = int(seed)

    @property
    def epoch_length(self) -> int:
        return len(self.store) * self.config.crops_per_volume

    def volume_of(self, item: int) -> int:
        epoch, rest = divmod(int(item), self.epoch_length)
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.store))
        return int(order[rest // self.config.crops_per_volume])

    def __len__(self):
        return self.epoch_length

    def __getitem__(self, item: int) -> dict:
        rng = np.random.default_rng([self.seed, int(item), 2])
        index = self.volume_of(item)
        volume, foreground, background = self.store.get(index)
        corruption = self.config.corruption
        if corruption == "fdk":  # the scan's variant from a stream of its own: the clean path draws as before
            variant = int(np.random.default_rng([self.seed, int(item), 3]).integers(self.config.fdk_variants))
            volume = np.stack([volume, self.store.get_fdk(index, variant)])
        crop = sample_crop(volume, foreground, background, self.config.crop_size, self.config.positive_fraction, rng)
        crop = augment(crop, self.config, rng)
        item_out = {"seed": torch.tensor(int(rng.integers(2 ** 62)))}
        if corruption == "fdk":
            item_out.update(image=torch.from_numpy(crop[:1].copy()), input=torch.from_numpy(crop[1:].copy()))
        else:
            item_out["image"] = torch.from_numpy(crop)[None]
        if corruption == "noise":
            sigma = rng.uniform(0.0, self.config.noise_sigma_max)
            noisy = crop + np.float32(sigma) * rng.standard_normal(crop.shape, dtype=np.float32)
            item_out["input"] = torch.from_numpy(noisy)[None]
        return item_out


class StepBatches(torch.utils.data.Sampler):
    """Micro-batches of item indices for optimizer steps ``start_step .. total_steps-1``.

    Step ``s`` uses items ``[s·batch, (s+1)·batch)``; process ``rank`` of ``world`` takes its contiguous
    share and splits it into ``accum`` micro-batches. ``batch`` must be divisible by ``world·accum``.
    """

    def __init__(self, start_step: int, total_steps: int, batch: int, rank: int = 0, world: int = 1, accum: int = 1):
        if batch % (world * accum):
            raise InputError(f"batch {batch} must be divisible by processes × accumulation steps ({world}×{accum})")
        self.start_step, self.total_steps = int(start_step), int(total_steps)
        self.batch, self.rank, self.world, self.accum = batch, rank, world, accum
        self.micro = batch // (world * accum)

    def __len__(self):
        return max(0, self.total_steps - self.start_step) * self.accum

    def __iter__(self):
        share = self.batch // self.world
        for step in range(self.start_step, self.total_steps):
            first = step * self.batch + self.rank * share
            for k in range(self.accum):
                yield list(range(first + k * self.micro, first + (k + 1) * self.micro))
