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
from ctrecon.methods.gaussians.field import GROUP_NAMES, GaussianField
from ctrecon.operators.voxelize import quaternion_to_rotation

__all__ = ["DensityStrategy", "QuantileSplitCloneStrategy"]

SPLIT_SCALE_DIVISOR = 1.6  # 3DGS / 3DGR-CT / R²: σ_child = σ / (0.8·2)


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


class QuantileSplitCloneStrategy(DensityStrategy):
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
                 stop: int = 15_000, grad_quantile: float = 0.95, generator: torch.Generator | None = None):
        if int(densify_every) < 1:
            raise InputError(f"densify_every must be >= 1, got {densify_every}")
        if not 0.0 < float(grad_quantile) < 1.0:
            raise InputError(f"grad_quantile must be in (0, 1), got {grad_quantile}")
        if int(max_gaussians) < 1:
            raise InputError(f"max_gaussians must be >= 1, got {max_gaussians}")
        self.densify_every, self.start, self.stop = int(densify_every), int(start), int(stop)
        self.grad_threshold, self.grad_quantile = grad_threshold, float(grad_quantile)
        self.percent_dense, self.prune_intensity = float(percent_dense), float(prune_intensity)
        self.max_scale, self.min_scale = max_scale, min_scale
        self.max_gaussians = int(max_gaussians)
        self.scene_extent = scene_extent
        self.generator = generator
        self._grad_sum: torch.Tensor | None = None
        self._grad_count = 0

    @classmethod
    def for_volume(cls, volume: VolumeGeometry, **options) -> "QuantileSplitCloneStrategy":
        """A strategy whose scene extent is the largest side (mm) of ``volume``."""
        return cls(scene_extent=max(volume.sVoxel), **options)

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
        n = len(field)
        extent = self._extent(field)
        grads = self.mean_gradients(field).nan_to_num(0.0)
        clone_mask, split_mask = self._densify_masks(field, grads, extent, n)

        intensities = field.intensities.detach()
        # Clones: both copies carry half the intensity.
        halved = field.raw_from_intensities(intensities[clone_mask] * 0.5)
        field.raw_intensities.data[clone_mask] = halved
        clone_rows = {"means": field.means[clone_mask], "log_scales": field.log_scales[clone_mask],
                      "quats": field.quats[clone_mask], "intensities": halved}
        split_rows = self._split_rows(field, split_mask, intensities)
        new_rows = {g: torch.cat([clone_rows[g].detach(), split_rows[g]]) for g in GROUP_NAMES}

        _keep(field, optimizer, ~split_mask)
        _append(field, optimizer, new_rows)
        prune = self._prune_mask(field, extent)
        _keep(field, optimizer, ~prune)
        return {"cloned": int(clone_mask.sum()), "split": int(split_mask.sum()), "pruned": int(prune.sum()),
                "total": len(field)}

    def _extent(self, field: GaussianField) -> float:
        if self.scene_extent is None and len(field):
            means = field.means.detach()
            self.scene_extent = float((means.max(0).values - means.min(0).values).max())
        return float(self.scene_extent or 0.0)

    def _densify_masks(self, field, grads, extent, n):
        if n == 0 or self._grad_count == 0:
            empty = torch.zeros(n, dtype=torch.bool, device=field.means.device)
            return empty, empty
        threshold = (self.grad_threshold if self.grad_threshold is not None
                     else float(torch.quantile(grads.float(), self.grad_quantile)))
        candidates = (grads >= threshold) & (grads > 0)
        room = max(0, self.max_gaussians - n)
        if int(candidates.sum()) > room:  # keep the largest gradients within the cap
            ranked = torch.argsort(torch.where(candidates, grads, torch.full_like(grads, -1.0)), descending=True)
            candidates = torch.zeros_like(candidates)
            candidates[ranked[:room]] = True
        small = field.scales.detach().max(dim=1).values <= self.percent_dense * extent
        return candidates & small, candidates & ~small

    def _split_rows(self, field, split_mask, intensities) -> dict:
        count = int(split_mask.sum())
        scales = field.scales.detach()[split_mask].repeat(2, 1)
        rot = quaternion_to_rotation(field.quats.detach()[split_mask]).repeat(2, 1, 1)
        noise = torch.randn(2 * count, 3, generator=self.generator, dtype=scales.dtype).to(scales.device)
        offsets = (rot @ (noise * scales).unsqueeze(-1)).squeeze(-1)
        child_intensity = intensities[split_mask].repeat(2) * (SPLIT_SCALE_DIVISOR ** 3 / 2.0)
        return {"means": field.means.detach()[split_mask].repeat(2, 1) + offsets,
                "log_scales": field.log_scales.detach()[split_mask].repeat(2, 1) - math.log(SPLIT_SCALE_DIVISOR),
                "quats": field.quats.detach()[split_mask].repeat(2, 1),
                "intensities": field.raw_from_intensities(child_intensity)}

    def _prune_mask(self, field, extent) -> torch.Tensor:
        scales = field.scales.detach()
        min_scale = self.min_scale if self.min_scale is not None else 0.003 * extent
        prune = field.intensities.detach() < self.prune_intensity
        prune |= scales.min(dim=1).values < min_scale
        if self.max_scale is not None:
            prune |= scales.max(dim=1).values > self.max_scale
        for param in field.raw_parameters().values():
            finite = torch.isfinite(param.detach())
            prune |= ~(finite.reshape(finite.shape[0], -1).all(dim=1))
        return prune


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
