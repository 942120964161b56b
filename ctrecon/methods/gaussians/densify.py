"""Adaptive density control of a :class:`GaussianField` during optimisation, as swappable strategies.

A :class:`DensityStrategy` (gsplat's ``Strategy``) is what the training loop drives: it calls two
hooks at fixed points of every iteration and never knows the rules::

    loss.backward()
    strategy.step_post_backward(field, optimizer, iteration)   # statistics: this iteration's gradients
    optimizer.step(); optimizer.zero_grad()
    strategy.step_post_update(field, optimizer, iteration)     # may clone / split / prune

:class:`QuantileSplitCloneStrategy` (``"3dgr"``) is the rule of 3D Gaussian splatting, 3DGR-CT and
R²-Gaussian: Gaussians whose centres receive large gradients (mean norm of ∂loss/∂μ since the last
densification) are densified — *cloned* when small (largest σ ≤ ``percent_dense``·``scene_extent``;
both copies get half the intensity, as in 3DGR-CT and R²) or *split* when large (two samples from the
Gaussian itself, σ / 1.6, the parent removed). The split children's intensities are ``I·1.6³/2`` so
that the field's integral (the line-integral mass the projections see) is preserved; 3DGR-CT keeps
I, R² halves it, which both lose mass. Then Gaussians are pruned: intensity < ``prune_intensity``
(R²'s 1e-5), smallest σ < ``min_scale`` (3DGR-CT's 0.003 of its unit frame, i.e. 0.003·scene_extent by
default), largest σ > ``max_scale`` (R²; off by default), or non-finite parameters. The count never
exceeds ``max_gaussians``: when it would, the candidates with the largest gradients are densified first.
Children's intensities are clamped into the activation's range (sigmoid: below 1, where I·1.6³/2 of a
parent above 0.49 would have no logit).

:class:`AdditiveDensityStrategy` (``"additive"``) is density control for this field model, a *sum* of
Gaussians, where every change must keep the rendered field (its mass and covariance; gsplat's "revised
opacity" plays that part for compositing). Figures: relative L2 error of the field, or PSNR (dB) on the
development case, the chest CT ``chest_pyradiomics_lung1`` at 3 mm, centre crop 32×64×64, 120 views,
fbp init with 10 000 Gaussians, 10 views per iteration, seed 0 (never the held-out abdomen cases).

* **Score** (absolute and scale-free): ``s_i`` = the mean, over the last ``densify_every`` iterations,
  of ‖∂L/∂μ_i‖ × h × N^{4/3} (h: geometric-mean voxel side, mm; N: voxels of the grid). The loss L
  is the loop's, on projections divided by their maximum, so projection units and the object's size
  in mm cancel (tested: ×10 mm and ×1000 units give the same scores); N^{4/3} = n⁴ for n voxels a side
  undoes how the gradient of a Gaussian of given size in voxels and given relative error shrinks with
  finer grids (footprint share (σ/n)², residual and sensitivity ~1/n each; assumes the object spans the
  grid). Measured without densification, the median raw gradient grows ×9.9 (at 100 iterations) to
  ×12.7 (at 600) from 3 to 6 mm voxels, the scores' medians at 600 are 0.13 (3 mm) and 0.10 (6 mm).
  Gaussians with ``s_i > grad_threshold`` are densified, none at zero gradients or an exact fit, and no
  quantile: growth stops where the data stop asking.
* **Threshold** 0.25 (``densify_grad_threshold``): 800 iterations from 10 000 Gaussians end at 34.25 dB
  without densification, 34.25 / 34.25 / 35.05 / 35.54 dB with thresholds 2 / 1 / 0.5 / 0.25 (10 000 /
  10 030 / 26 211 / 51 648 Gaussians; growth in the last 100 iterations +0 / +0 / +705 / +1 415);
  from 50 000 Gaussians it adds 2.6 % (51 301) and ends 0.25 dB higher. With all defaults, 1 000
  iterations end at 36.26 dB, slice SSIM 0.932 (50 245 Gaussians, +123 in the last 100 iterations)
  against 34.56 dB, 0.901 without; on the 48×96×96 crop (34 000 Gaussians, 600 iterations) at 35.04 dB
  with 193 368 against 31.14 dB without (that run diverges after 300 iterations).
* **Split**, when the children stay above the σ floor: children at μ ± a·σ₁·v₁ along the major axis
  v₁, σ₁ → σ₁·√(1−a²), intensity I / (2√(1−a²)): the pair has the parent's mass, mean and covariance.
  One split changes the field of a rotated anisotropic Gaussian by 0.2 / 1.9 / 4.5 / 10.5 % for
  a = 0.3 / 0.5 / 0.6 / 0.7 (the "3dgr" rule: 134 % over 8 seeds; deleting it: 100 %). a = 0.5 (``split_offset``):
  800 iterations at threshold 0.5 end at 35.09 / 35.05 / 34.85 dB for a = 0.5 / 0.6 / 0.7 with the
  fewest Gaussians (23 403 / 26 211 / 29 735) and the smallest dip after the growth.
* **Clone**, when a split would cross the floor: two copies at half the intensity, so the field does not
  change at all; the copy starts with zero optimiser moments, so the optimiser itself moves the two
  apart along the current gradient (a displacement imposed here would change the field instead).
* **σ floor** ``min_scale_voxels`` (0.5) × the grid's largest voxel side, projected onto after every
  update (log-scales clamped; the state after the loop's last step, which never reaches the hook, may be
  one Adam step below it). A point-sampled Gaussian's voxel sum varies with its sub-voxel position by
  ±2·exp(−2π²σ²/d²) per axis: ±1.4 % at σ = 0.5 voxel, ±34 % at 0.3 (8× over three axes). The largest
  voxel side makes it hold in every orientation.
* **Schedule**: every 100 iterations in [200, 10 000): the fit has settled by 200 (score median 1.2 at
  100, 0.16 at 200, 0.13 at 600), and the threshold, not the end of the window, ends the growth.
* **Cap and pruning** as above (largest scores first; faint or non-finite Gaussians pruned). New
  intensities are computed as intensities and clamped into the activation's range before its inverse.

The score is a mean of per-iteration gradient norms of whatever gradient the loop backpropagates, so
the threshold holds for the exact gradient at 10 views per iteration, where it was measured: with more
views per iteration the views' disagreement cancels inside each gradient. Under the "preconditioned"
optimiser (40 views, filtered residual) the scores are ~4.5× lower (median 0.028 after 400 iterations
against 0.127): the default adds 1 Gaussian there, threshold 0.055 ends 400 iterations at 35.19 dB
with 13 247 Gaussians against 34.46 dB without.

The optimiser (Adam-like, per-row state tensors) must hold the field's raw Parameters in groups named
as in :data:`field.GROUP_NAMES` or at least containing those Parameter objects; a strategy that
changes the set of Gaussians replaces the Parameters in the field and in the optimiser, keeping the
moments of surviving rows and giving new rows zero moments.
"""
from __future__ import annotations

import abc
import math

import torch

from ctrecon.core.errors import InputError
from ctrecon.core.geometry import VolumeGeometry
from ctrecon.methods.gaussians.field import GROUP_NAMES, INTENSITY_ACTIVATIONS, GaussianField
from ctrecon.operators.voxelize import quaternion_to_rotation

__all__ = ["DensityStrategy", "QuantileSplitCloneStrategy", "AdditiveDensityStrategy", "ADDITIVE_GRAD_THRESHOLD",
           "ADDITIVE_SPLIT_OFFSET", "ADDITIVE_MIN_SCALE_VOXELS"]

SPLIT_SCALE_DIVISOR = 1.6  # 3DGS / 3DGR-CT / R²: σ_child = σ / (0.8·2)
ADDITIVE_SPLIT_OFFSET = 0.5  # a of the additive split (module docstring)
ADDITIVE_GRAD_THRESHOLD = 0.25  # on AdditiveDensityStrategy.scores (module docstring)
ADDITIVE_MIN_SCALE_VOXELS = 0.5  # σ floor, voxels (module docstring)
RANGE_MARGIN = 1e-4  # new intensities stay this fraction of a bounded activation's range inside it


class DensityStrategy(abc.ABC):
    """Density control as the training loop sees it: two hooks, called in this order every iteration."""

    @abc.abstractmethod
    def step_post_backward(self, field: GaussianField, optimizer: torch.optim.Optimizer | None,
                           iteration: int) -> None:
        """After ``loss.backward()`` and before the optimiser step: this iteration's gradients are on the
        field's Parameters."""

    @abc.abstractmethod
    def step_post_update(self, field: GaussianField, optimizer: torch.optim.Optimizer | None,
                         iteration: int) -> dict | None:
        """After the optimiser step (the loop evaluates first, and skips the hook after its last
        iteration): may add or remove Gaussians, in the field and in the optimiser. Returns what it
        did (counts) or None when it did nothing."""


class _CentreGradientStrategy(DensityStrategy):
    """What both strategies share: the mean centre-gradient norm per Gaussian since the last reset, the
    schedule (every ``densify_every`` iterations in [``start``, ``stop``)), the cap, and densification
    of chosen rows (clones: both copies carry half the intensity; splits: children built by the
    strategy replace their parent) in the field and in the optimiser."""

    def __init__(self, densify_every: int, start: int, stop: int, max_gaussians: int, prune_intensity: float):
        if int(densify_every) < 1:
            raise InputError(f"densify_every must be >= 1, got {densify_every}")
        if int(max_gaussians) < 1:
            raise InputError(f"max_gaussians must be >= 1, got {max_gaussians}")
        self.densify_every, self.start, self.stop = int(densify_every), int(start), int(stop)
        self.max_gaussians, self.prune_intensity = int(max_gaussians), float(prune_intensity)
        self._grad_sum: torch.Tensor | None = None
        self._grad_count = 0

    # ----------------------------------------------------------------- statistics
    def step_post_backward(self, field: GaussianField, optimizer: torch.optim.Optimizer | None,
                           iteration: int) -> None:
        """Add this iteration's position-gradient norms (whatever the iteration; the optimiser is not used)."""
        grad = field.means.grad
        if grad is None:
            return
        norms = grad.detach().norm(dim=-1)
        if self._grad_sum is None or self._grad_sum.shape != norms.shape or self._grad_sum.device != norms.device:
            self._grad_sum, self._grad_count = torch.zeros_like(norms), 0
        self._grad_sum += norms
        self._grad_count += 1

    def mean_gradients(self, field: GaussianField) -> torch.Tensor:
        """``[N]`` mean position-gradient norm since the last densification (zeros if none recorded)."""
        if self._grad_sum is None or self._grad_sum.shape[0] != len(field) or self._grad_count == 0:
            return torch.zeros(len(field), dtype=field.means.dtype, device=field.means.device)
        return self._grad_sum / self._grad_count

    def reset(self) -> None:
        self._grad_sum, self._grad_count = None, 0

    def is_due(self, iteration: int) -> bool:
        return self.start <= iteration < self.stop and iteration > 0 and iteration % self.densify_every == 0

    # ----------------------------------------------------------------- densification
    def _within_cap(self, candidates: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """``candidates`` reduced to those with the largest ``scores`` when all of them would pass the cap."""
        room = max(0, self.max_gaussians - candidates.shape[0])
        if int(candidates.sum()) <= room:
            return candidates
        ranked = torch.argsort(torch.where(candidates, scores, torch.full_like(scores, -1.0)), descending=True)
        kept = torch.zeros_like(candidates)
        kept[ranked[:room]] = True
        return kept

    @staticmethod
    def _densify(field: GaussianField, optimizer, clone_mask: torch.Tensor, split_mask: torch.Tensor,
                 split_rows: dict) -> None:
        """Clone the ``clone_mask`` rows (both copies at half the intensity) and replace the ``split_mask``
        rows by ``split_rows`` (raw rows); new rows go at the end: clones first, then children."""
        halved = field.raw_from_intensities(field.intensities.detach()[clone_mask] * 0.5)
        field.raw_intensities.data[clone_mask] = halved
        clone_rows = {"means": field.means[clone_mask], "log_scales": field.log_scales[clone_mask],
                      "quats": field.quats[clone_mask], "intensities": halved}
        new_rows = {g: torch.cat([clone_rows[g].detach(), split_rows[g]]) for g in GROUP_NAMES}
        _keep(field, optimizer, ~split_mask)
        _append(field, optimizer, new_rows)

    def _prune_mask(self, field: GaussianField) -> torch.Tensor:
        """Faint (intensity < ``prune_intensity``) or non-finite Gaussians."""
        prune = field.intensities.detach() < self.prune_intensity
        for param in field.raw_parameters().values():
            finite = torch.isfinite(param.detach())
            prune |= ~(finite.reshape(finite.shape[0], -1).all(dim=1))
        return prune


class QuantileSplitCloneStrategy(_CentreGradientStrategy):
    """Clone/split/prune every ``densify_every`` iterations in [``start``, ``stop``); see the module docstring.

    scene_extent: a length (mm) for ``percent_dense`` and the default ``min_scale``; None takes the
    largest side of the bounding box of the centres at the first densification. ``grad_threshold``: the
    absolute threshold on the mean position-gradient norm; None uses the ``grad_quantile`` of the
    current gradients instead (a scale-free default, since the gradient scale depends on the loss).
    ``min_scale``/``max_scale``: mm (``min_scale`` None → 0.003·scene_extent; ``max_scale`` None → off).
    """

    def __init__(self, densify_every: int = 100, grad_threshold: float | None = None, percent_dense: float = 0.01,
                 prune_intensity: float = 1e-5, max_scale: float | None = None, min_scale: float | None = None,
                 max_gaussians: int = 500_000, *, scene_extent: float | None = None, start: int = 500,
                 stop: int = 7_500, grad_quantile: float = 0.95, generator: torch.Generator | None = None):
        super().__init__(densify_every, start, stop, max_gaussians, prune_intensity)
        if not 0.0 < float(grad_quantile) < 1.0:
            raise InputError(f"grad_quantile must be in (0, 1), got {grad_quantile}")
        self.grad_threshold, self.grad_quantile = grad_threshold, float(grad_quantile)
        self.percent_dense = float(percent_dense)
        self.max_scale, self.min_scale = max_scale, min_scale
        self.scene_extent = scene_extent
        self.generator = generator

    @classmethod
    def for_volume(cls, volume: VolumeGeometry, **options) -> "QuantileSplitCloneStrategy":
        """A strategy whose scene extent is the largest side (mm) of ``volume``."""
        return cls(scene_extent=max(volume.sVoxel), **options)

    # ----------------------------------------------------------------- the step
    def step_post_update(self, field: GaussianField, optimizer: torch.optim.Optimizer | None,
                         iteration: int) -> dict | None:
        """Densify and prune if ``iteration`` is due; returns counts ``{cloned, split, pruned, total}`` or None."""
        if not self.is_due(iteration):
            return None
        stats = self.densify_and_prune(field, optimizer)
        self.reset()
        return stats

    @torch.no_grad()
    def densify_and_prune(self, field: GaussianField, optimizer: torch.optim.Optimizer | None) -> dict:
        """One clone/split/prune pass now, whatever the iteration (``step_post_update`` schedules it)."""
        extent = self._extent(field)
        grads = self.mean_gradients(field).nan_to_num(0.0)
        clone_mask, split_mask = self._densify_masks(field, grads, extent)
        self._densify(field, optimizer, clone_mask, split_mask, self._split_rows(field, split_mask))
        prune = self._prune_mask(field, extent)
        _keep(field, optimizer, ~prune)
        return {"cloned": int(clone_mask.sum()), "split": int(split_mask.sum()), "pruned": int(prune.sum()),
                "total": len(field)}

    def _extent(self, field: GaussianField) -> float:
        if self.scene_extent is None and len(field):
            means = field.means.detach()
            self.scene_extent = float((means.max(0).values - means.min(0).values).max())
        return float(self.scene_extent or 0.0)

    def _densify_masks(self, field, grads, extent):
        if len(field) == 0 or self._grad_count == 0:
            empty = torch.zeros(len(field), dtype=torch.bool, device=field.means.device)
            return empty, empty
        threshold = (self.grad_threshold if self.grad_threshold is not None
                     else float(torch.quantile(grads.float(), self.grad_quantile)))
        candidates = self._within_cap((grads >= threshold) & (grads > 0), grads)
        small = field.scales.detach().max(dim=1).values <= self.percent_dense * extent
        return candidates & small, candidates & ~small

    def _split_rows(self, field, split_mask) -> dict:
        count = int(split_mask.sum())
        scales = field.scales.detach()[split_mask].repeat(2, 1)
        rot = quaternion_to_rotation(field.quats.detach()[split_mask]).repeat(2, 1, 1)
        noise = torch.randn(2 * count, 3, generator=self.generator, dtype=scales.dtype).to(scales.device)
        offsets = (rot @ (noise * scales).unsqueeze(-1)).squeeze(-1)
        child_intensity = field.intensities.detach()[split_mask].repeat(2) * (SPLIT_SCALE_DIVISOR ** 3 / 2.0)
        return {"means": field.means.detach()[split_mask].repeat(2, 1) + offsets,
                "log_scales": field.log_scales.detach()[split_mask].repeat(2, 1) - math.log(SPLIT_SCALE_DIVISOR),
                "quats": field.quats.detach()[split_mask].repeat(2, 1),
                "intensities": _raw_inside_range(field, child_intensity)}

    def _prune_mask(self, field, extent) -> torch.Tensor:
        scales = field.scales.detach()
        min_scale = self.min_scale if self.min_scale is not None else 0.003 * extent
        prune = super()._prune_mask(field)
        prune |= scales.min(dim=1).values < min_scale
        if self.max_scale is not None:
            prune |= scales.max(dim=1).values > self.max_scale
        return prune


class AdditiveDensityStrategy(_CentreGradientStrategy):
    """Density control for the additive field (``"additive"``): every step keeps the rendered field; see
    the module docstring for the rules and the measurements behind the defaults.

    volume: the reconstruction grid (its voxel size sets the σ floor and the gradient unit).
    grad_threshold: on :meth:`scores` (dimensionless). split_offset: a, children at μ ± a·σ₁·v₁.
    min_scale_voxels: the σ floor, in units of the grid's largest voxel side.
    """

    def __init__(self, volume: VolumeGeometry, *, densify_every: int = 100, start: int = 200, stop: int = 10_000,
                 grad_threshold: float = ADDITIVE_GRAD_THRESHOLD, split_offset: float = ADDITIVE_SPLIT_OFFSET,
                 min_scale_voxels: float = ADDITIVE_MIN_SCALE_VOXELS, prune_intensity: float = 1e-5,
                 max_gaussians: int = 500_000):
        super().__init__(densify_every, start, stop, max_gaussians, prune_intensity)
        if not (math.isfinite(float(grad_threshold)) and float(grad_threshold) >= 0.0):
            raise InputError(f"grad_threshold must be a finite number >= 0, got {grad_threshold}")
        if not 0.0 < float(split_offset) < 1.0:
            raise InputError(f"split_offset must be in (0, 1), got {split_offset}")
        if not (math.isfinite(float(min_scale_voxels)) and float(min_scale_voxels) > 0.0):
            raise InputError(f"min_scale_voxels must be a positive number, got {min_scale_voxels}")
        self.grad_threshold, self.split_offset = float(grad_threshold), float(split_offset)
        self.min_scale = float(min_scale_voxels) * max(volume.dVoxel)
        n_voxels = math.prod(volume.nVoxel)
        self.gradient_unit = math.prod(volume.dVoxel) ** (1.0 / 3.0) * n_voxels ** (4.0 / 3.0)

    def scores(self, field: GaussianField) -> torch.Tensor:
        """``[N]`` mean centre-gradient norm since the last pass × voxel size (mm) × (voxel count)^(4/3)."""
        return self.mean_gradients(field).nan_to_num(0.0) * self.gradient_unit

    def step_post_update(self, field: GaussianField, optimizer: torch.optim.Optimizer | None,
                         iteration: int) -> dict | None:
        """Hold the σ floor; on a multiple of ``densify_every``, densify and prune if due and start a new
        statistics window. Returns counts ``{cloned, split, pruned, total}`` or None."""
        self.hold_scale_floor(field)
        if iteration % self.densify_every:
            return None
        stats = self.densify_and_prune(field, optimizer) if self.is_due(iteration) else None
        self.reset()
        return stats

    @torch.no_grad()
    def hold_scale_floor(self, field: GaussianField) -> None:
        """Project every σ onto [``min_scale``, ∞) (in place; the optimiser state is kept)."""
        field.log_scales.data.clamp_(min=math.log(self.min_scale))

    @torch.no_grad()
    def densify_and_prune(self, field: GaussianField, optimizer: torch.optim.Optimizer | None) -> dict:
        """One pass now, whatever the iteration (``step_post_update`` schedules it)."""
        scores = self.scores(field)
        candidates = self._within_cap(scores > self.grad_threshold, scores)
        child_major = field.scales.detach().max(dim=1).values * math.sqrt(1.0 - self.split_offset ** 2)
        split_mask = candidates & (child_major >= self.min_scale)
        clone_mask = candidates & ~split_mask
        self._densify(field, optimizer, clone_mask, split_mask, self._split_rows(field, split_mask))
        prune = self._prune_mask(field)
        _keep(field, optimizer, ~prune)
        return {"cloned": int(clone_mask.sum()), "split": int(split_mask.sum()), "pruned": int(prune.sum()),
                "total": len(field)}

    def _split_rows(self, field: GaussianField, split_mask: torch.Tensor) -> dict:
        """Two children per parent at μ ± a·σ₁·v₁, σ₁ → σ₁·√(1−a²), I → I / (2√(1−a²))."""
        a = self.split_offset
        shrink = math.sqrt(1.0 - a * a)
        scales, log_scales = field.scales.detach()[split_mask], field.log_scales.detach()[split_mask].clone()
        major = scales.argmax(dim=1, keepdim=True)
        axes = quaternion_to_rotation(field.quats.detach()[split_mask])  # columns: body axes in world
        v1 = axes.gather(2, major.unsqueeze(1).expand(-1, 3, 1)).squeeze(2)
        offsets = a * scales.gather(1, major) * v1
        log_scales.scatter_add_(1, major, torch.full_like(major, math.log(shrink), dtype=log_scales.dtype))
        means = field.means.detach()[split_mask]
        child_intensity = field.intensities.detach()[split_mask].repeat(2) / (2.0 * shrink)
        return {"means": torch.cat([means + offsets, means - offsets]), "log_scales": log_scales.repeat(2, 1),
                "quats": field.quats.detach()[split_mask].repeat(2, 1),
                "intensities": _raw_inside_range(field, child_intensity)}


def _raw_inside_range(field: GaussianField, intensities: torch.Tensor) -> torch.Tensor:
    """Raw parameters of ``intensities`` clamped into the range of the field's activation, less
    :data:`RANGE_MARGIN` of its width at a finite range (sigmoid: [1e-4, 1 − 1e-4], where the inverse is
    finite and the gradient still moves the raw value; softplus: ≥ 0, which the values already meet)."""
    activation = INTENSITY_ACTIVATIONS[field.intensity_activation][0]
    low, high = activation(torch.tensor([-math.inf, math.inf], dtype=torch.float64)).tolist()
    margin = RANGE_MARGIN * (high - low) if math.isfinite(high - low) else 0.0
    return field.raw_from_intensities(intensities.clamp(min=low + margin, max=high - margin))


# --------------------------------------------------------------------------- field + optimiser surgery
def _group_for(optimizer, name: str, param):
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    for group in optimizer.param_groups:
        if group.get("name") == name and len(group["params"]) == 1:
            return group
    return None


def _rebind(field: GaussianField, optimizer, old: dict, transform) -> None:
    """Point the optimiser at the field's new Parameters; per-row state goes through ``transform``."""
    if optimizer is None:
        return
    for name, old_param in old.items():
        group = _group_for(optimizer, name, old_param)
        if group is None:
            continue
        new_param = field.raw_parameters()[name]
        group["params"] = [new_param if p is old_param else p for p in group["params"]]
        if group["params"].count(new_param) == 0:  # matched by name only
            group["params"] = [new_param]
        state = optimizer.state.pop(old_param, None)
        if state is None:
            continue
        rows = old_param.shape[0]
        optimizer.state[new_param] = {key: (transform(value, new_param) if torch.is_tensor(value) and value.dim() > 0
                                            and value.shape[0] == rows else value)
                                      for key, value in state.items()}


def _keep(field: GaussianField, optimizer, mask: torch.Tensor) -> None:
    """Keep the rows where ``mask`` is True, in the field and in the optimiser state."""
    old = field.raw_parameters()
    field.select(mask)
    _rebind(field, optimizer, old, lambda value, _new: value[mask.to(value.device)])


def _append(field: GaussianField, optimizer, rows: dict) -> None:
    """Append raw rows to the field; their optimiser state is zero."""
    old = field.raw_parameters()
    field.append(rows)

    def extend(value, new_param):
        extra = new_param.shape[0] - value.shape[0]
        return torch.cat([value, value.new_zeros((extra, *value.shape[1:]))])

    _rebind(field, optimizer, old, extend)
