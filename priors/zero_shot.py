"""Zero-shot prior initialisation: an FDK volume → sliding windows → prior Gaussians → one world-mm field.

    field = infer_field(fdk_volume, volume_geometry, model, metadata)          # a GaussianField (mm)
    reconstruct(scan, init=PriorInit("my_prior.pt", overlap=0.75))              # a 3DGR-CT initialiser
    reconstruct(scan, init="medgmae-star")       # the registered PriorInit of the shipped MedGMAE* prior

The pipeline (MedGMAE §4.4; the prior's settings come from its checkpoint metadata):

1. **Window**: the unit-attenuation FDK volume u is mapped to the prior's HU window ``[lo, hi]``:
   ``w = (clip(4095·u − 1024, lo, hi) − lo) / (hi − lo)`` (for the unit window ``[−1024, 3071]``, w = clip(u, 0, 1)).
2. **Resampling** (``resample=True``, when the volume's spacing differs from the prior's): trilinear
   onto a grid of the prior's spacing with the same centre and ``ceil(n·d / s)`` voxels per axis, so
   the whole volume is covered (values beyond the outer voxel centres are replicated).
   With ``resample=False`` the windows are cut at the volume's own (possibly anisotropic) spacing and
   the conversion below maps crop units onto that anisotropic box exactly.
3. **Windows** of the prior's crop size D³ every ``round(D·(1 − overlap))`` voxels (``overlap`` 0:
   ``ceil(n / D)`` non-overlapping windows per axis, the paper's layout), the grid of windows centred
   on the volume, the volume padded at its border (edge values replicated, so no artificial edge is
   fed to the prior). Windows whose values all lie below ``empty_hu`` (air) are skipped. The overlap
   is :data:`priors.defaults.FIELD_OVERLAP` by default, with blending (step 6); :class:`PriorInit`,
   the 3DGR-CT initialiser, uses :data:`priors.defaults.INIT_OVERLAP`. Both values and their reasons
   are written there.
4. **Inference** in batches, every patch visible (no mask), float32, ``torch.no_grad``.
5. **Conversion** of each window's crop-unit Gaussians to world mm by
   :func:`priors.gaussian_space.block_to_world` (centres by the window's affine map; covariances
   exactly, ``Σ_world = D Σ D`` re-decomposed into σ and a quaternion for anisotropic boxes).
6. **Blending** (overlapping windows only): the intensity of a Gaussian of window k is multiplied by
   ``Π_axes t_k(c) / Σ_j t_j(c)`` at its centre c, with ``t_k`` a tent over window k (1 at its
   centre, ``1 − |c − centre| / (D/2 + ½)`` in voxels), so the weights of the windows covering a
   point sum to one.
7. **Intensities** back to unit attenuation: ``I_u = I_w · (hi − lo) / 4095``. For a window with
   ``lo > −1024`` the constant ``(lo + 1024) / 4095`` cannot be carried by a sum of Gaussians: the
   field then approximates ``clip(u, u_lo, u_hi) − u_lo`` (recorded in the metadata).
8. **Pruning**: Gaussians fainter than ``min_intensity`` and Gaussians whose ``k_sigma`` box does not
   reach the volume are dropped; with ``max_gaussians`` the largest ones by integral ``|I|·σx·σy·σz``
   are kept. MedGMAE* children are signed residuals of their parents (``I_0 + Î·σ_I``), so a
   MedGMAE* prior may output negative intensities. The default field activation is ``softplus``
   (I ≥ 0, as the ``fbp`` initialiser's fields), which drops them: with the ``identity`` activation
   (signed; "faint" then means ``|I| < min_intensity``; ``"auto"`` picks it when negatives remain)
   3DGR-CT's intensity step of 0.05 on the raw parameter moves every one of thousands of
   overlapping Gaussians by up to 0.05 per iteration, and the demo case diverged from 25 dB to 2 dB in
   four iterations; under softplus the same step is scaled by sigmoid(raw) ≈ I.

MedGMAE uses one level (``levels="first"``), MedGMAE* all levels (``levels="all"``). The stitched
field is a :class:`ctrecon.methods.gaussians.GaussianField` in world mm, intensities in unit attenuation.

ctrecon finds the registered initialisers ("medgmae", "medgmae-star") without importing this module
itself: its one hook into the priors (``ctrecon.methods.gaussians.init``) calls
:func:`register_initializers` the first time a name it does not know is looked up.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ctrecon.core.errors import InputError
from ctrecon.core.limits import check_memory
from ctrecon.core.geometry import VolumeGeometry
from ctrecon.core.paths import data_file
from ctrecon.core.units import HU_MAX, HU_MIN, hu_to_unit, unit_to_hu
from ctrecon.methods.gaussians.field import GaussianField
from ctrecon.operators.voxelize import bounding_half_widths

from priors.checkpoints import load_prior
from priors.defaults import FIELD_OVERLAP, INIT_OVERLAP
from priors.gaussian_space import block_to_world
from priors.model import CropGaussians

__all__ = ["ZeroShotConfig", "WindowLayout", "SHIPPED_PRIORS", "shipped_prior_path", "load_zero_shot_prior",
           "window_layout", "to_prior_window", "resample_to_grid", "infer_field", "PriorInit", "register_initializers"]

#: Names of the initialisers → file of the shipped prior in data/priors/.
SHIPPED_PRIORS = {"medgmae": "medgmae.pt", "medgmae-star": "medgmae-star.pt"}
_LEVELS_OF_INIT = {"medgmae": "first", "medgmae-star": "all"}


@dataclasses.dataclass(frozen=True)
class ZeroShotConfig:
    """Settings of :func:`infer_field` (see the module docstring for each step)."""

    levels: str = "all"              # "all" (MedGMAE*) or "first" (level 0 only: MedGMAE)
    resample: bool = True            # resample to the prior's voxel spacing when it differs
    overlap: float = FIELD_OVERLAP   # window overlap, a fraction of the window in [0, 1); 0: non-overlapping
    batch_size: int = 8              # windows per forward pass
    empty_hu: float = -900.0         # windows entirely below this (HU) are skipped
    min_intensity: float = 1e-3      # prune Gaussians fainter than this (|I|, unit attenuation)
    max_gaussians: Optional[int] = None
    intensity_activation: str = "softplus"  # of the field: "softplus", "identity" or "auto" (see step 8)

    def __post_init__(self):
        if self.levels not in ("all", "first"):
            raise InputError(f"levels must be 'all' or 'first', got {self.levels!r}")
        if not 0.0 <= float(self.overlap) < 1.0:
            raise InputError(f"overlap must be in [0, 1), got {self.overlap}")
        if int(self.batch_size) < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.min_intensity) and self.min_intensity >= 0):
            raise InputError(f"min_intensity must be >= 0, got {self.min_intensity}")
        if self.max_gaussians is not None and int(self.max_gaussians) < 1:
            raise InputError(f"max_gaussians must be a positive integer, got {self.max_gaussians}")
        if self.intensity_activation not in ("auto", "softplus", "identity"):
            raise InputError(f"intensity_activation must be auto, softplus or identity, got {self.intensity_activation!r}")


# --------------------------------------------------------------------------- priors on disk
def shipped_prior_path(name: str) -> Path:
    """The shipped prior of initialiser ``name`` ("medgmae" or "medgmae-star") in data/priors/."""
    if name not in SHIPPED_PRIORS:
        raise InputError(f"no shipped prior named {name!r} (shipped: {', '.join(SHIPPED_PRIORS)})")
    path = data_file("priors", SHIPPED_PRIORS[name])
    if not path.is_file():
        raise InputError(f"the shipped prior {path} is missing; pass --prior CKPT (a prior.pt from ctrecon pretrain)")
    return path


def load_zero_shot_prior(path, device="cpu"):
    """``(model in eval mode on device, metadata)`` of a MedGMAE / MedGMAE* prior file."""
    model, meta = load_prior(path, map_location=device)
    if meta.get("architecture") not in ("medgmae", "medgmae-star"):
        raise InputError(f"{path} is a {meta.get('architecture')} prior; zero-shot Gaussians need a MedGMAE or "
                         "MedGMAE* prior")
    return model, meta


# --------------------------------------------------------------------------- intensities and grids
def to_prior_window(unit: torch.Tensor, window_hu) -> torch.Tensor:
    """Unit attenuation → the prior's window values in [0, 1] (step 1)."""
    lo, hi = (float(v) for v in window_hu)
    return (unit_to_hu(unit).clamp(lo, hi) - lo) / (hi - lo)


def resample_to_grid(volume: torch.Tensor, source: VolumeGeometry, target: VolumeGeometry) -> torch.Tensor:
    """Trilinear values ``[Z', Y', X']`` of ``volume`` (on ``source``) at the voxel centres of ``target``;
    points beyond the outer voxel centres take the nearest border value."""
    axes = []
    for axis in range(3):  # continuous source index of each target centre, mapped to grid_sample's [-1, 1]
        index = (target.axis_centres(axis) - source.offOrigin[axis]) / source.dVoxel[axis] + (source.nVoxel[axis] - 1) / 2
        n = source.nVoxel[axis]
        axes.append(torch.as_tensor(2 * index / (n - 1) - 1 if n > 1 else 0 * index, dtype=volume.dtype,
                                    device=volume.device))
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack([xx, yy, zz], dim=-1)[None]
    return F.grid_sample(volume[None, None], grid, mode="bilinear", padding_mode="border", align_corners=True)[0, 0]


def _work_grid(volume: VolumeGeometry, spacing, resample: bool) -> VolumeGeometry:
    """The grid the windows are cut from: the volume's own, or one of the prior's spacing (step 2)."""
    spacing = tuple(float(s) for s in spacing)
    if not resample or all(abs(d - s) <= 1e-6 * s for d, s in zip(volume.dVoxel, spacing)):
        return volume
    counts = tuple(max(1, math.ceil(n * d / s - 1e-9)) for n, d, s in zip(volume.nVoxel, volume.dVoxel, spacing))
    return VolumeGeometry(counts, spacing, volume.offOrigin)


@dataclasses.dataclass(frozen=True)
class WindowLayout:
    """Windows of ``size`` voxels per axis over ``grid``: ``starts[axis]`` (voxel index of each window's
    first voxel, negative or past the end where the padding lies), ``stride`` and the padding."""

    grid: VolumeGeometry
    size: int
    stride: int
    starts: tuple      # per axis (z, y, x): tuple of window starts
    pad_before: tuple  # per axis
    pad_after: tuple

    def blocks(self):
        """``(k, j, i), VolumeGeometry`` of every window, z-major."""
        for k, sz in enumerate(self.starts[0]):
            for j, sy in enumerate(self.starts[1]):
                for i, sx in enumerate(self.starts[2]):
                    centre = []
                    for axis, start in enumerate((sz, sy, sx)):
                        n, d, o = self.grid.nVoxel[axis], self.grid.dVoxel[axis], self.grid.offOrigin[axis]
                        centre.append((start + (self.size - 1) / 2 - (n - 1) / 2) * d + o)
                    yield (k, j, i), VolumeGeometry((self.size,) * 3, self.grid.dVoxel, tuple(centre))

    @property
    def count(self) -> int:
        return math.prod(len(s) for s in self.starts)


def window_layout(grid: VolumeGeometry, size: int, overlap: float = 0.0) -> WindowLayout:
    """Windows covering ``grid`` (step 3): non-overlapping for ``overlap`` 0, the window grid centred."""
    stride = size if overlap == 0 else max(1, int(round(size * (1.0 - overlap))))
    starts, before, after = [], [], []
    for n in grid.nVoxel:
        count = max(1, math.ceil((n - size) / stride) + 1) if n > size else 1
        extent = (count - 1) * stride + size
        pad = (extent - n) // 2
        starts.append(tuple(c * stride - pad for c in range(count)))
        before.append(pad)
        after.append(extent - n - pad)
    return WindowLayout(grid, size, stride, tuple(starts), tuple(before), tuple(after))


def _tent_weights(layout: WindowLayout, index: tuple, centres_index: torch.Tensor) -> torch.Tensor:
    """Blending weight ``[N]`` of window ``index`` for Gaussians at continuous voxel indices ``[N, 3]``
    (x, y, z order) of the work grid (step 6)."""
    half = layout.size / 2 + 0.5
    weight = torch.ones(centres_index.shape[0], dtype=centres_index.dtype, device=centres_index.device)
    for axis in range(3):
        c = centres_index[:, 2 - axis]
        starts = torch.as_tensor(layout.starts[axis], dtype=c.dtype, device=c.device)
        tents = (1 - (c[:, None] - (starts + (layout.size - 1) / 2)).abs() / half).clamp_min(0)
        weight = weight * tents[:, index[axis]] / tents.sum(1).clamp_min(1e-12)
    return weight


# --------------------------------------------------------------------------- inference
@torch.no_grad()
def _predict(model, windows: torch.Tensor, counts: list, levels: str) -> CropGaussians:
    """Crop-unit Gaussians ``[B, N, …]`` of windows ``[B, 1, D, D, D]``, every patch visible."""
    gaussians = model(windows).float()
    return gaussians.level(counts, 0) if levels == "first" else gaussians


def infer_field(volume, volume_geometry: VolumeGeometry, model: torch.nn.Module, metadata: dict,
                config: ZeroShotConfig = ZeroShotConfig(), *, device=None,
                progress: Optional[Callable[[int, int], None]] = None):
    """Zero-shot Gaussian field of a unit-attenuation volume ``[Z, Y, X]`` (tensor or array) on
    ``volume_geometry``: a :class:`ctrecon.methods.gaussians.GaussianField` in world mm on ``device``
    (default: the volume's). ``model``/``metadata`` come from :func:`load_zero_shot_prior`.
    ``progress(windows_done, windows_total)`` is called after each batch.
    """
    if not isinstance(volume_geometry, VolumeGeometry):
        raise InputError(f"volume_geometry must be a VolumeGeometry, got {type(volume_geometry).__name__}")
    unit = torch.as_tensor(volume)
    if tuple(unit.shape) != tuple(volume_geometry.nVoxel):
        raise InputError(f"volume shape {tuple(unit.shape)} does not match the geometry {volume_geometry.nVoxel}")
    device = torch.device(device) if device is not None else unit.device
    unit = unit.detach().to(device, torch.float32)
    if not bool(torch.isfinite(unit).all()):
        raise InputError("the volume has non-finite values")
    counts = list(metadata["gaussians_per_level"])
    size = int(metadata["crop_size"][0])
    window_hu = metadata["intensity_window_hu"]
    model = model.to(device).eval()

    grid = _work_grid(volume_geometry, metadata["voxel_spacing_mm"], config.resample)
    check_memory(4 * 3 * math.prod(grid.nVoxel), f"the volume resampled to the prior's voxel spacing "
                 f"({'x'.join(map(str, grid.nVoxel))} voxels at {grid.dVoxel[0]:.3g} mm)",
                 "use a prior trained at a coarser spacing, or cut windows at the volume's own spacing "
                 "(no resampling)")
    windowed = to_prior_window(unit, window_hu)
    if grid is not volume_geometry:
        windowed = resample_to_grid(windowed, volume_geometry, grid)
    layout = window_layout(grid, size, config.overlap)
    padded = F.pad(windowed[None, None], (layout.pad_before[2], layout.pad_after[2], layout.pad_before[1],
                                          layout.pad_after[1], layout.pad_before[0], layout.pad_after[0]),
                   mode="replicate")[0, 0]
    empty_level = float(to_prior_window(hu_to_unit(torch.tensor(config.empty_hu)), window_hu))

    blocks = []
    for index, block in layout.blocks():
        k, j, i = (layout.starts[a][index[a]] + layout.pad_before[a] for a in range(3))
        window = padded[k:k + size, j:j + size, i:i + size]
        if float(window.max()) > empty_level:
            blocks.append((index, block, window))
    parts = []
    for first in range(0, len(blocks), config.batch_size):
        batch = blocks[first:first + config.batch_size]
        predicted = _predict(model, torch.stack([w for _, _, w in batch])[:, None], counts, config.levels)
        for b, (index, block, _) in enumerate(batch):
            means, scales, quats, intensities = block_to_world(*(t[b] for t in predicted), block)
            if layout.stride < size:
                centres_index = torch.as_tensor(grid.world_to_index(means.double().cpu().numpy()), device=device)
                intensities = intensities * _tent_weights(layout, index, centres_index).to(intensities.dtype)
            parts.append((means, scales, quats, intensities))
        if progress is not None:
            progress(min(first + config.batch_size, len(blocks)), len(blocks))

    if parts:
        means, scales, quats, intensities = (torch.cat(t) for t in zip(*parts))
    else:
        means, scales, quats, intensities = (torch.zeros((0,) + s, device=device) for s in ((3,), (3,), (4,), ()))
    lo, hi = (float(v) for v in window_hu)
    intensities = intensities * ((hi - lo) / (HU_MAX - HU_MIN))
    produced, negative = int(intensities.numel()), int((intensities < 0).sum())

    activation = config.intensity_activation
    if activation == "auto":
        activation = "identity" if bool((intensities <= -config.min_intensity).any()) else "softplus"
    magnitude = intensities.abs() if activation == "identity" else intensities
    bounds = torch.as_tensor(volume_geometry.bounds(), dtype=means.dtype, device=device)
    reach = bounding_half_widths(scales, quats, float(metadata.get("k_sigma", 3.0)))
    touches = ((means + reach > bounds[0]) & (means - reach < bounds[1])).all(-1)
    keep = (magnitude >= config.min_intensity) & touches
    means, scales, quats, intensities = means[keep], scales[keep], quats[keep], intensities[keep]
    if config.max_gaussians is not None and len(means) > config.max_gaussians:
        integral = intensities.abs() * scales.prod(-1)
        chosen = torch.sort(torch.topk(integral, int(config.max_gaussians)).indices).values
        means, scales, quats, intensities = means[chosen], scales[chosen], quats[chosen], intensities[chosen]
    if len(means) == 0:
        raise InputError("the prior produced no Gaussian above min_intensity inside the volume (an empty volume?)")

    meta = {"initializer": f"prior ({metadata['architecture']}, levels={config.levels})",
            "volume": volume_geometry.to_dict(), "work_grid": grid.to_dict(),
            "windows": {"size": size, "stride": layout.stride, "per_axis": [len(s) for s in layout.starts],
                        "total": layout.count, "inferred": len(blocks)},
            "zero_shot": dataclasses.asdict(config),
            "gaussians": {"produced": produced, "negative_intensity": negative, "kept": int(len(means))},
            "intensity_activation": activation,
            "intensity_window_hu": [lo, hi],
            "intensity_note": None if lo <= HU_MIN else
            f"the field approximates clip(u, {hu_to_unit(lo):.4f}, {hu_to_unit(hi):.4f}) - {hu_to_unit(lo):.4f} "
            "(a window floor above -1024 HU is not representable)",
            "prior": {key: metadata.get(key) for key in ("architecture", "config", "voxel_spacing_mm", "crop_size",
                                                         "training", "code_version", "created_utc")}}
    return GaussianField.from_values(means, scales, quats, intensities, intensity_activation=activation,
                                     metadata=meta)


# --------------------------------------------------------------------------- ctrecon initialisers
class PriorInit:
    """A ctrecon initialiser: the zero-shot field of the FDK volume (:func:`infer_field`), usable
    wherever an initialiser name is (``reconstruct(scan, init=PriorInit("prior.pt", overlap=0.75))``).

    ``name``: "medgmae" (level 0 of the prior) or "medgmae-star" (all levels, a MedGMAE* prior), also
    the label runs record. ``prior``: the prior file (default: the shipped prior of ``name``), loaded on
    first use, once per device. ``options``: :class:`ZeroShotConfig` fields; ``overlap`` defaults to
    :data:`priors.defaults.INIT_OVERLAP`. Called like every initialiser,
    ``init(fdk_volume, volume_geometry, n_gaussians=None, generator=None, **options)``, where the call's
    options override the constructor's, ``n_gaussians`` caps the count (the largest Gaussians are
    kept) and ``generator`` is unused (inference is deterministic).
    """

    def __init__(self, prior=None, *, name: str = "medgmae-star", **options):
        if name not in _LEVELS_OF_INIT:
            raise InputError(f"no prior initializer named {name!r} (choose from {', '.join(_LEVELS_OF_INIT)})")
        if prior is not None and not Path(prior).is_file():
            raise InputError(f"prior not found: {prior}")
        tunable = [f for f in dataclasses.fields(ZeroShotConfig) if f.name not in ("levels", "max_gaussians")]
        unknown = sorted(set(options) - {f.name for f in tunable})
        if unknown:
            raise InputError(f"the {name} initializer has no option {', '.join(unknown)} "
                             f"(options: {', '.join(f.name for f in tunable)})")
        self.name, self.prior = name, prior
        self.config = ZeroShotConfig(levels=_LEVELS_OF_INIT[name], **{"overlap": INIT_OVERLAP, **options})
        self._loaded = {}
        keyword = inspect.Parameter.KEYWORD_ONLY
        head = list(inspect.signature(self.__call__).parameters.values())[:5]   # ... generator, progress
        self.__signature__ = inspect.Signature(  # unknown options fail when bound, before the FDK
            head + [inspect.Parameter(f.name, keyword, default=getattr(self.config, f.name)) for f in tunable])

    @property
    def path(self):
        """The prior file: ``prior`` as given, or the shipped prior of ``name``."""
        return self.prior if self.prior is not None else shipped_prior_path(self.name)

    def __repr__(self) -> str:
        return f"PriorInit({self.prior!r}, name={self.name!r}, overlap={self.config.overlap})"

    def check(self) -> None:
        """Load the prior (on the CPU, kept) and check it suits this initialisation: InputError before any work."""
        self._model(torch.device("cpu"))

    def _model(self, device: torch.device) -> tuple:
        """(model, metadata) of the prior on ``device``, loaded once per device and checked."""
        if str(device) not in self._loaded:
            model, metadata = load_zero_shot_prior(self.path, device)
            if self.config.levels == "all" and metadata["architecture"] != "medgmae-star":
                raise InputError(f"the {self.name} initialisation needs a MedGMAE* prior; "
                                 f"{self.path} is a {metadata['architecture']} prior")
            self._loaded[str(device)] = model, metadata
        return self._loaded[str(device)]

    def __call__(self, fdk_volume, volume_geometry, n_gaussians=None, generator=None, progress=None, **options):
        fdk = torch.as_tensor(fdk_volume)
        model, metadata = self._model(fdk.device)
        if n_gaussians is not None:
            options["max_gaussians"] = int(n_gaussians)
        return infer_field(fdk, volume_geometry, model, metadata, dataclasses.replace(self.config, **options),
                           progress=progress)


def register_initializers(register: Callable) -> None:
    """Register "medgmae" (level 0) and "medgmae-star" (all levels) with their shipped priors through
    ``register(name, initializer)``; ctrecon's prior hook calls it with its registry."""
    for name in _LEVELS_OF_INIT:
        register(name, PriorInit(name=name))
