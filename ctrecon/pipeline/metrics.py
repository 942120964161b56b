"""Image-quality metrics and the convergence tracker (DESIGN.md §2).

All metrics take numpy arrays or torch tensors (any device; computed where the data lives, in
float64) and return Python floats. Volumes are ``[Z, Y, X]`` on the unit-attenuation scale, so
``data_range`` defaults to 1.

Two SSIM conventions, always reported under their own names:

* ``ssim3d``: 3-D SSIM of Wang et al. 2004 with an isotropic Gaussian window (σ = 1.5 voxels,
  truncated at 3.5σ: 11 taps), K1 = 0.01, K2 = 0.03, population covariances. Equals
  ``skimage.metrics.structural_similarity(x, ref, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1)`` on the 3-D arrays.
* ``ssim_slice``: the 3DGR-CT convention: the mean over axial slices ``[k]`` of 2-D SSIM with a
  7 × 7 uniform window and sample covariances, i.e. the mean over k of
  ``structural_similarity(x[k], ref[k], win_size=7, data_range=1)``.
* ``ssim_slice_3dgr_code``: the same slice SSIM with ``data_range=2``, which is what 3DGR-CT's code
  reports: ``train_ct_recon.py`` calls ``compare_ssim(pred, gt, multichannel=True)`` on float volumes
  without a data range, and scikit-image before 0.20 then took the float dtype's range [-1, 1]. Its
  values are higher than ``ssim_slice`` (the constants C1, C2 are 4× larger), so a 3DGR-CT figure is
  comparable with this one only.

As in scikit-image, the SSIM map is averaged only where the window lies entirely inside the volume
(a border of half a window is left out), so padding never enters the result.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ctrecon.core.errors import InputError

__all__ = ["psnr", "ssim3d", "ssim_slice", "evaluate", "ConvergenceTracker", "DEFAULT_THRESHOLDS",
           "QUALITY_METRICS", "threshold_key", "threshold_label", "quality_thresholds"]

_K1, _K2 = 0.01, 0.03
_GAUSSIAN_SIGMA, _GAUSSIAN_TRUNCATE = 1.5, 3.5
_SLICE_WINDOW = 7
# Output voxels per chunk of the SSIM map: bounds the memory of the five filtered fields.
_CHUNK_VOXELS = 1 << 22

#: What :func:`evaluate` returns, in this order.
QUALITY_METRICS = ("psnr", "ssim3d", "ssim_slice", "ssim_slice_3dgr_code")
#: Data range of the slice SSIM as 3DGR-CT's code computes it (see the module docstring).
_3DGR_CODE_SSIM_RANGE = 2.0


def threshold_key(kind: str, value: float) -> str:
    """The name of a quality threshold, derived from its value: ``("psnr", 35)`` → ``"psnr35"``,
    ``("psnr", 32.5)`` → ``"psnr32.5"``, ``("ssim", 0.9)`` → ``"ssim90"`` (SSIM in hundredths)."""
    if kind == "psnr":
        return f"psnr{float(value):g}"
    if kind == "ssim":
        return f"ssim{round(float(value) * 100, 6):g}"
    raise ValueError(f"threshold kind must be 'psnr' or 'ssim', got {kind!r}")


def threshold_label(kind: str, value: float) -> str:
    """``("psnr", 35)`` → ``"PSNR 35 dB"``, ``("ssim", 0.9)`` → ``"SSIM 0.9"``."""
    return f"PSNR {float(value):g} dB" if kind == "psnr" else f"SSIM {float(value):g}"


def quality_thresholds(psnr_value: float, ssim_value: float, ssim_metric: str = "ssim_slice") -> tuple:
    """The two ``(name, metric, value)`` thresholds of a run for :class:`ConvergenceTracker`, named by value."""
    return ((threshold_key("psnr", psnr_value), "psnr", float(psnr_value)),
            (threshold_key("ssim", ssim_value), ssim_metric, float(ssim_value)))


#: PSNR 35 dB and slice SSIM 0.90, the paper's thresholds: ``(("psnr35", "psnr", 35.0), ("ssim90", "ssim_slice", 0.9))``.
DEFAULT_THRESHOLDS = quality_thresholds(35.0, 0.90)


def _as_pair(x, ref, *, ndim: int | None = None) -> tuple:
    """Both inputs as float64 tensors on a common device (that of a tensor input), validated."""
    device = next((v.device for v in (x, ref) if isinstance(v, torch.Tensor)), torch.device("cpu"))
    tensors = []
    for name, value in (("x", x), ("ref", ref)):
        if isinstance(value, torch.Tensor):
            tensor = value.detach()
        else:
            array = np.asarray(value)
            if array.dtype.kind not in "iuf":
                raise InputError(f"{name} must hold real numbers, got dtype {array.dtype}")
            tensor = torch.from_numpy(np.ascontiguousarray(array))
        if tensor.is_complex() or tensor.dtype == torch.bool:
            raise InputError(f"{name} must hold real numbers, got {tensor.dtype}")
        tensors.append(tensor.to(device=device, dtype=torch.float64))
    x, ref = tensors
    if x.shape != ref.shape:
        raise InputError(f"shape mismatch: x {tuple(x.shape)} vs ref {tuple(ref.shape)}")
    if ndim is not None and x.ndim != ndim:
        raise InputError(f"a {ndim}-D [Z, Y, X] volume is needed, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise InputError("empty input")
    for name, tensor in (("x", x), ("ref", ref)):
        if not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{name} contains NaN or Inf values")
    return x, ref


def _check_range(data_range: float) -> float:
    data_range = float(data_range)
    if not math.isfinite(data_range) or data_range <= 0:
        raise InputError(f"data_range must be a positive number, got {data_range}")
    return data_range


@torch.no_grad()
def psnr(x, ref, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio (dB) of ``x`` against ``ref``: 10·log10(range² / MSE); inf if equal."""
    data_range = _check_range(data_range)
    x, ref = _as_pair(x, ref)
    mse = float(torch.mean((x - ref) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range ** 2 / mse)


def _gaussian_taps() -> torch.Tensor:
    radius = int(_GAUSSIAN_TRUNCATE * _GAUSSIAN_SIGMA + 0.5)  # as scipy.ndimage: 5 → 11 taps
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (offsets / _GAUSSIAN_SIGMA) ** 2)
    return taps / taps.sum()


def _filter_valid(fields: torch.Tensor, taps: torch.Tensor, axis: int) -> torch.Tensor:
    """Correlate ``fields`` with 1-D ``taps`` along ``axis`` where the window fits ('valid' part)."""
    length = fields.shape[axis] - taps.numel() + 1
    out = fields.narrow(axis, 0, length) * float(taps[0])
    for offset in range(1, taps.numel()):
        out.add_(fields.narrow(axis, offset, length), alpha=float(taps[offset]))
    return out


def _mean_ssim(x: torch.Tensor, ref: torch.Tensor, data_range: float, taps: torch.Tensor, axes: Sequence[int],
               cov_norm: float) -> float:
    """Mean SSIM over the voxels whose (separable) window ``taps`` along ``axes`` lies inside the volume."""
    width = taps.numel()
    for axis in axes:
        if x.shape[axis] < width:
            raise InputError(f"SSIM with a {width}-voxel window needs at least {width} voxels along axes "
                             f"{tuple(axes)} of [Z, Y, X], got shape {tuple(x.shape)}")
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    halo = width - 1 if 0 in axes else 0
    out_depth = x.shape[0] - halo
    plane = math.prod(x.shape[1:])
    chunk = max(1, _CHUNK_VOXELS // plane)
    total, count = 0.0, 0
    for start in range(0, out_depth, chunk):
        stop = min(out_depth, start + chunk)
        a, b = x[start:stop + halo], ref[start:stop + halo]
        fields = torch.stack([a, b, a * a, b * b, a * b])
        for axis in axes:
            fields = _filter_valid(fields, taps, axis + 1)
        mu_a, mu_b, aa, bb, ab = fields
        var_a = cov_norm * (aa - mu_a * mu_a)
        var_b = cov_norm * (bb - mu_b * mu_b)
        cov = cov_norm * (ab - mu_a * mu_b)
        ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
        total += float(ssim_map.sum())
        count += ssim_map.numel()
    return total / count


@torch.no_grad()
def ssim3d(x, ref, data_range: float = 1.0) -> float:
    """3-D SSIM, Gaussian window σ = 1.5 voxels (11 taps), population covariance; see module doc."""
    data_range = _check_range(data_range)
    x, ref = _as_pair(x, ref, ndim=3)
    return _mean_ssim(x, ref, data_range, _gaussian_taps().to(x.device), (0, 1, 2), cov_norm=1.0)


@torch.no_grad()
def ssim_slice(x, ref, data_range: float = 1.0) -> float:
    """Mean over axial slices of 2-D SSIM, 7×7 uniform window, sample covariance (3DGR-CT convention)."""
    data_range = _check_range(data_range)
    x, ref = _as_pair(x, ref, ndim=3)
    taps = torch.full((_SLICE_WINDOW,), 1.0 / _SLICE_WINDOW, dtype=torch.float64, device=x.device)
    window = _SLICE_WINDOW ** 2
    # Every slice has the same number of valid pixels, so the mean of the map is the mean of slice means.
    return _mean_ssim(x, ref, data_range, taps, (1, 2), cov_norm=window / (window - 1))


def evaluate(volume, reference, data_range: float = 1.0) -> dict:
    """:data:`QUALITY_METRICS` of ``volume`` against ``reference`` (both ``[Z, Y, X]``);
    ``ssim_slice_3dgr_code`` uses twice ``data_range`` (see the module docstring)."""
    return {"psnr": psnr(volume, reference, data_range), "ssim3d": ssim3d(volume, reference, data_range),
            "ssim_slice": ssim_slice(volume, reference, data_range),
            "ssim_slice_3dgr_code": ssim_slice(volume, reference, _3DGR_CODE_SSIM_RANGE * data_range)}


class ConvergenceTracker:
    """Records evaluations during an optimisation and when each quality threshold is first met.

    thresholds: ``(name, metric, value)`` triples; a threshold is met at the first update whose
    ``metric`` is ≥ ``value``. Defaults: ``psnr35`` (PSNR ≥ 35 dB) and ``ssim90`` (``ssim_slice``
    ≥ 0.90, the 3DGR-CT SSIM convention; pass e.g. ``("ssim90", "ssim3d", 0.90)`` for 3-D SSIM).

    ``update(iteration, seconds, **metrics)`` appends a row to ``history`` and returns the names of
    the thresholds met for the first time; ``summary()`` gives ``{name: {"iteration", "seconds"}}``
    (None for thresholds not met yet).
    """

    def __init__(self, thresholds: Sequence[tuple] = DEFAULT_THRESHOLDS):
        self.thresholds = []
        for entry in thresholds:
            try:
                name, metric, value = entry
                value = float(value)
            except (TypeError, ValueError):
                raise InputError(f"a threshold is (name, metric, value), got {entry!r}") from None
            if not math.isfinite(value):
                raise InputError(f"threshold {name!r} needs a finite value, got {value}")
            self.thresholds.append((str(name), str(metric), value))
        names = [name for name, _, _ in self.thresholds]
        if len(set(names)) != len(names):
            raise InputError(f"threshold names must be unique, got {names}")
        self.history: list = []
        self._reached: dict = {name: None for name in names}

    def update(self, iteration: int, seconds: float, **metrics) -> list:
        """Record the metrics evaluated after ``iteration`` iterations and ``seconds`` of optimisation."""
        iteration, seconds = int(iteration), float(seconds)
        if self.history and (iteration < self.history[-1]["iteration"] or seconds < self.history[-1]["seconds"]):
            raise InputError(f"updates must not go back in iterations or time (got iteration {iteration}, "
                             f"{seconds} s after iteration {self.history[-1]['iteration']})")
        row = {"iteration": iteration, "seconds": seconds, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(row)
        newly = []
        for name, metric, value in self.thresholds:
            if self._reached[name] is None and metric in row and row[metric] >= value:
                self._reached[name] = {"iteration": iteration, "seconds": seconds}
                newly.append(name)
        return newly

    def reached(self, name: str):
        """``{"iteration", "seconds"}`` at which threshold ``name`` was first met, or None."""
        if name not in self._reached:
            raise KeyError(f"unknown threshold {name!r}; known: {', '.join(self._reached)}")
        return None if self._reached[name] is None else dict(self._reached[name])

    @property
    def all_reached(self) -> bool:
        return all(v is not None for v in self._reached.values())

    def summary(self) -> dict:
        """``{name: {"iteration": int, "seconds": float} or None}`` for every threshold."""
        return {name: self.reached(name) for name in self._reached}
