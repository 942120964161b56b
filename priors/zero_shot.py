"""Zero-shot prior initialisation: an FDK volume → sliding windows → prior Gaussians → one world-mm field.

    field = infer_field(fdk_volume, volume_geometry, model, metadata)          # a GaussianField (mm)
    register_prior_initializers("my_prior.pt")   # "medgmae" / "medgmae-star" for ctrecon reconstruct

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
   fed to the prior). Windows whose values all lie below ``empty_hu`` (air) are skipped. The default
   is ``overlap=0.75`` with blending (step 6): a prior trained on crops is free to put Gaussian tails
   outside its crop, and non-overlapping windows then add those tails to their neighbours' field. The
   shipped CPU priors do this: on the window faces of the shipped sample the error is 2.7× (MedGMAE*)
   to 4.3× (MedGMAE) what it is on the same planes when the windows are shifted away; with overlap
   0.5 still up to 1.8×, with 0.75 at most 1.3× (no seam; ~3× more windows, and Gaussians). The
   3DGR-CT initialisers use ``INIT_OVERLAP`` = 0.5 instead: at 0.75 the fields are too costly to
   optimise (see its comment).
4. **Inference** in batches, every patch visible (no masking), float32, ``torch.no_grad``.
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
field is a :class:`ctrecon.gaussians.GaussianField` in world mm, intensities in unit attenuation.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ctrecon.core.errors import InputError
from ctrecon.core.geometry import VolumeGeometry
from ctrecon.core.units import HU_MAX, HU_MIN, hu_to_unit, unit_to_hu

from priors.checkpoints import load_prior
from priors.gaussian_space import block_to_world
from priors.model import CropGaussians

__all__ = ["ZeroShotConfig", "WindowLayout", "SHIPPED_PRIORS", "shipped_prior_path", "load_zero_shot_prior",
           "INIT_OVERLAP", "window_layout", "to_prior_window", "resample_to_grid", "infer_field", "prior_initializer",
           "register_prior_initializers"]

#: Names of the initialisers → file of the shipped prior in data/priors/.
SHIPPED_PRIORS = {"medgmae": "medgmae.pt", "medgmae-star": "medgmae-star.pt"}
#: Window overlap of the 3DGR-CT initialisers (``infer_field`` defaults to ``ZeroShotConfig.overlap``).
#: A cost/quality trade measured on the held-out abdomen (48×96×96 voxels, 120 views, 10 views per
#: iteration, one thread): overlap 0.75 gives 47 000 (MedGMAE) / 163 000 (MedGMAE*) faint Gaussians,
#: 134–203 M voxels of Gaussian boxes, and 3DGR-CT iterations 5–7× slower than fbp's; at 0.5 the
#: fields have 12 000 / 40 000 Gaussians (0.86 / 0.61 s per iteration against fbp's 0.49 s) and reach
#: 32.1 / 33.0 dB in 300 iterations (MedGMAE* non-overlapping: 32.1 dB); timings taken with another
#: run sharing the two cores. The price is the seams of the stitched field at 0.5 (plane errors up to
#: 1.8× on window faces, step 3), which the optimisation then has to fit away. Convergence to 35 dB
#: from these fields: data/README.md.
INIT_OVERLAP = 0.5
_LEVELS_OF_INIT = {"medgmae": "first", "medgmae-star": "all"}
_DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "priors"


@dataclasses.dataclass(frozen=True)
class ZeroShotConfig:
    """Settings of :func:`infer_field` (see the module docstring for each step)."""

    levels: str = "all"              # "all" (MedGMAE*) or "first" (level 0 only: MedGMAE)
    resample: bool = True            # resample to the prior's voxel spacing when it differs
    overlap: float = 0.75            # window overlap, a fraction of the window in [0, 1); 0: non-overlapping
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
    path = _DATA_DIR / SHIPPED_PRIORS[name]
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
def _all_visible(model: torch.nn.Module) -> torch.nn.Module:
    """A view of ``model`` (parameters shared) whose forward takes an all-False mask: every patch visible.

    The model's config fixes the visible count at training's ``1 − mask_ratio``; the view's config has
    ``mask_ratio`` 0 (set past the training-time validation, which requires a masked patch).
    """
    view = copy.copy(model)
    cfg = copy.copy(model.cfg)
    object.__setattr__(cfg, "mask_ratio", 0.0)
    view.cfg = cfg
    return view


@torch.no_grad()
def _predict(model, windows: torch.Tensor, counts: list, levels: str) -> CropGaussians:
    """Crop-unit Gaussians ``[B, N, …]`` of windows ``[B, 1, D, D, D]``, every patch visible."""
    mask = torch.zeros(windows.shape[0], model.cfg.n_patches, dtype=torch.bool, device=windows.device)
    gaussians = _all_visible(model)(windows, mask).float()
    return gaussians.level(counts, 0) if levels == "first" else gaussians


def infer_field(volume, volume_geometry: VolumeGeometry, model: torch.nn.Module, metadata: dict,
                config: ZeroShotConfig = ZeroShotConfig(), *, device=None,
                progress: Optional[Callable[[int, int], None]] = None):
    """Zero-shot Gaussian field of a unit-attenuation volume ``[Z, Y, X]`` (tensor or array) on
    ``volume_geometry``: a :class:`ctrecon.gaussians.GaussianField` in world mm on ``device`` (default:
    the volume's). ``model``/``metadata`` come from :func:`load_zero_shot_prior`.
    ``progress(windows_done, windows_total)`` is called after each batch.
    """
    from ctrecon.methods.gaussians import GaussianField, bounding_half_widths

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
def prior_initializer(prior=None, levels: str = "all", *, name: str = "medgmae-star", **options) -> Callable:
    """A ctrecon initialiser (``fn(fdk_volume, volume_geometry, n_gaussians=None, generator=None, **opts)``)
    running :func:`infer_field` with the prior file ``prior`` (default: the shipped prior of ``name``).

    The prior is loaded on first use (once per device). ``n_gaussians`` caps the count (the largest
    Gaussians are kept); ``generator`` is unused (inference is deterministic). ``options`` and the
    call's keyword options are :class:`ZeroShotConfig` fields (``overlap``, ``resample``, ...).
    """
    import inspect

    loaded = {}
    defaults = {"overlap": INIT_OVERLAP}  # where the initialisers differ from ZeroShotConfig

    def initialise(fdk_volume, volume_geometry, n_gaussians=None, generator=None, **call_options):
        fdk = torch.as_tensor(fdk_volume)
        if str(fdk.device) not in loaded:
            loaded[str(fdk.device)] = load_zero_shot_prior(prior if prior is not None else shipped_prior_path(name),
                                                           fdk.device)
        model, metadata = loaded[str(fdk.device)]
        if levels == "all" and metadata["architecture"] != "medgmae-star":
            raise InputError(f"the {name} initialisation needs a MedGMAE* prior; "
                             f"{prior} is a {metadata['architecture']} prior")
        settings = {"levels": levels, **defaults, **options, **call_options}
        if n_gaussians is not None:
            settings["max_gaussians"] = int(n_gaussians)
        return infer_field(fdk, volume_geometry, model, metadata, ZeroShotConfig(**settings))

    keyword = inspect.Parameter.KEYWORD_ONLY
    tunable = [inspect.Parameter(f.name, keyword, default=defaults.get(f.name, f.default))
               for f in dataclasses.fields(ZeroShotConfig) if f.name not in ("levels", "max_gaussians")]
    head = list(inspect.signature(initialise).parameters.values())[:4]
    initialise.__signature__ = inspect.Signature(head + tunable)  # unknown options fail before the FDK
    return initialise


def register_prior_initializers(prior=None) -> None:
    """Register "medgmae" (level 0) and "medgmae-star" (all levels) with ctrecon's initialisers.

    ``prior``: a prior file used by both; default: each name's shipped prior in data/priors/.
    Re-registering replaces the previous ones (so ``--prior`` takes effect).
    """
    from ctrecon.methods.gaussians import register_initializer

    if prior is not None and not Path(prior).is_file():
        raise InputError(f"prior not found: {prior}")
    for name, levels in _LEVELS_OF_INIT.items():
        register_initializer(name, prior_initializer(prior, levels, name=name), replace=True)


register_prior_initializers()
