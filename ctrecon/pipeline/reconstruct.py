"""3DGR-CT: fit a 3-D Gaussian field to cone-beam projections (library; no printing).

    config = ReconstructConfig.from_dict({"iterations": 2000, "views_per_iter": 10})
    result = reconstruct(scan, init="fbp", config=config, device="cpu", seed=0)
    result.volume        # [Z, Y, X] unit attenuation (CPU float32)
    result.to_metrics()  # the content of a run's metrics.json

The algorithm (3DGR-CT, ``train_ct_recon.py``), as :func:`reconstruct` runs it over a :class:`Trainer`::

    field ← initialiser(FDK(scan))                    # or a ready field (a prior's)
    evaluate(0)
    for t = 1 … iterations:
        step(t):     voxelise the Gaussians on the grid → project (K views) → loss → backward
                     (→ strategy.step_post_backward) → Adam step
        evaluate(t)  every eval_every iterations and at the end; stop on a target
        control_density(t): strategy.step_post_update (clone / split / prune), except after the last step

Settings (:class:`ReconstructConfig`) come in sections: ``gaussians`` (initial count, initialiser
options, truncation radius), ``schedule`` (iterations, views per iteration, coarse stage, learning-rate
decay length), ``optimizer`` (loss terms, learning rates), ``density`` (strategy, its schedule and
rules, the cap), ``evaluation`` (when, thresholds, timing) and ``stopping``. The pieces:

* **Initialisation**: FDK of the scan, then an initialiser, by name or itself
  (:func:`gaussians.get_initializer`: "fbp" = 3DGR-CT's, "r2" = R²-Gaussian's, or a prior's), or a
  ready field (``init_field``).
* **Optimiser**: Adam (eps 1e-15) with 3DGR-CT's per-parameter learning rates: centres 2e-3 decaying
  log-linearly to 2e-6 over ``lr_decay_steps`` = 30 000 steps (3DGR-CT ``position_lr_*``; afterwards it
  stays at the final value), intensities 0.05, log-scales 5e-3, quaternions 1e-3, constant as in
  3DGR-CT unless a ``*_lr_final`` is set (then they decay the same way, as R²-Gaussian does). 3DGR-CT
  keeps centres in a [0, 1]³ frame; here they are in mm, so the centre rates are multiplied by the
  largest side of the volume (mm), the same step relative to the object (as R²-Gaussian does).
* **Optimiser methods** (``optimizer.method``, :data:`OPTIMIZER_METHODS`): "3dgr" is the above, the
  faithful 3DGR-CT. "preconditioned" (beyond 3DGR-CT) backpropagates the *ramp-filtered* residual
  instead of the residual: the parameters get ``Jᵀ Aᵀ F r`` rather than ``Jᵀ Aᵀ r``, where ``Aᵀ F``
  is a filtered backprojection, so the step in voxel space approximates the Gauss–Newton step
  ``(AᵀA)⁻¹ Aᵀ r`` (``AᵀA`` blurs by 1/|ω|, the ramp filter undoes it) and fine structure is fitted
  as fast as coarse; the filter costs one FFT per detector row, the projector's adjoint is the one
  the exact gradient uses. It also runs 40 views per iteration (``views_per_iter="auto"``), decays every rate (centres to 1 %,
  the others to 10 %) over the run's length, stops by the residual rule (``iterations="auto"``), and
  adds TV of the rendered volume at ``lambda_tv="auto"``: 1e-3 (:data:`PRECONDITIONED_TV`; it keeps the
  filtered step from fitting noise and helps noiseless scans too), 3e-4 from the MedGMAE prior's field
  (:data:`PRECONDITIONED_TV_BY_INIT`).
  Measured on development CT (data/README.md): from the same fbp field, 35 dB in ~150 iterations
  (50 with the TV term) where 3DGR-CT's optimiser at 10 views per iteration peaks near 33 dB and then
  falls; with the TV term it keeps rising on noisy scans, where without it the filtered step fits noise.
* **Loss**: MSE between predicted and measured projections (3DGR-CT), or L1; optional
  ``lambda_dssim``·(1 − SSIM) over the projection images (R²-Gaussian's D-SSIM) and ``lambda_tv``·TV of
  the rendered volume (3DGR-CT's anisotropic TV: mean |forward difference| summed over the three
  axes). Projections are divided by the largest measured value first, so the loss (and so the
  relative weight of the regularisers) does not depend on the object's size or units.
* **Views per iteration**: all views (3DGR-CT) or ``views_per_iter`` K views ("auto": 40, or all when
  the scan has fewer), drawn without
  replacement from a shuffled cycle through all views (each view once per epoch, as R²-Gaussian's
  view stack).
* **Coarse-to-fine** (3DGR-CT ``low_reso_stage``): for the first ``coarse_iterations`` iterations the
  field is voxelised on one of the 8 half-resolution sub-lattices of the grid (voxels (i::2, j::2,
  k::2), cycling with the iteration) and projected with a projector of that coarse grid against the
  *measured* projections (3DGR-CT compares with projections of the sub-sampled ground truth, which a
  real scan does not have). 8× fewer voxels per render. Off by default.
* **Density control**: a :class:`gaussians.DensityStrategy` named by ``density.strategy``, which the
  loop only drives through its two hooks. "3dgr" (:class:`gaussians.QuantileSplitCloneStrategy`, the
  default): clone/split by mean centre-gradient norm every ``densify_every`` iterations in
  [``densify_from``, ``densify_until``), pruning of faint and degenerate Gaussians; the count never
  exceeds ``max_gaussians``. "additive" (:class:`gaussians.AdditiveDensityStrategy`): splits and clones
  that keep the rendered field, an absolute scale-free threshold (``densify_grad_threshold``) in place
  of the quantile, and a σ floor (``min_scale_voxels``). None or "none": the count stays fixed.
* **Stopping**: after ``iterations`` steps, or with ``iterations="auto"`` when the mean data loss of
  the last ``residual_window`` steps is less than ``residual_tolerance`` below the window before (no
  ground truth needed; capped by ``max_iterations``); optionally at a PSNR target or once both
  thresholds are reached (with a ground truth). With ``validation_views`` = H > 0, H views spread over
  the scan are left out of the FDK, the initialiser and the fit; every ``validation_every`` steps their
  loss is computed (counted as optimisation time, phase "validate"), and once ``validation_patience``
  checks in a row bring no new lowest value the run stops and returns the field of the lowest (a
  ground-truth-free guard against fitting noise, which the residual rule cannot see).
* **Evaluation** every ``eval_every`` iterations (and at 0 and at the end) against
  ``scan.ground_truth`` when present: PSNR, 3-D SSIM and the 3DGR-CT slice SSIM
  (:mod:`ctrecon.pipeline.metrics`), and the first iteration/seconds at which PSNR ≥ ``psnr_threshold`` and
  SSIM (``ssim_threshold_metric``) ≥ ``ssim_threshold``. Seconds are optimisation wall-clock time with
  evaluation excluded (evaluation time is summed separately in ``eval_seconds``).
* **Timing split** per phase (render, project, backward = loss + backward + Adam step, densify),
  accumulated with ``time.perf_counter``. On CUDA the phases are synchronised only when
  ``time_phases`` is set (otherwise the split is not meaningful there; totals always are).
* **Guards**: a non-finite loss or gradient stops the run with :class:`NonFiniteLossError`, which
  carries a :class:`ReconstructResult` of the last parameters that gave a finite loss. Ctrl-C
  (``KeyboardInterrupt``, also raised from a callback) returns the state reached so far with
  ``interrupted=True``.

Deterministic on CPU for a given seed: one ``torch.Generator`` (seeded) drives the initialiser, the
view order and the split samples.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import time
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from ctrecon.core.errors import InputError
from ctrecon.core.geometry import VolumeGeometry
from ctrecon.core.io import Scan
from ctrecon.core.limits import check_grid_memory
from ctrecon.methods.gaussians.densify import ADDITIVE_GRAD_THRESHOLD, ADDITIVE_MIN_SCALE_VOXELS, ADDITIVE_SPLIT_OFFSET
from ctrecon.operators.projector import Projector
from ctrecon.operators.fdk import FILTERS, check_circular, filter_projections, filter_response, isocentre_column_spacing
from ctrecon.pipeline.tracking import TIMING_PHASES, RunMonitor

__all__ = ["ReconstructConfig", "GaussianSettings", "ScheduleSettings", "OptimizerSettings", "DensitySettings",
           "EvaluationSettings", "StoppingSettings", "SECTIONS", "Trainer", "ReconstructResult", "Progress",
           "NonFiniteLossError", "reconstruct", "learning_rates", "residual_converged", "coarse_lattice", "LOSSES",
           "DENSITY_STRATEGIES", "TIMING_PHASES", "validate_evaluation", "finite_number", "validation_split", "ramp_weighted_error",
           "VALIDATION_STOP"]

LOSSES = ("mse", "l1")
DENSITY_STRATEGIES = ("3dgr", "additive")  # gaussians.QuantileSplitCloneStrategy, AdditiveDensityStrategy
SSIM_METRICS = ("ssim_slice", "ssim3d")


@dataclasses.dataclass
class GaussianSettings:
    """The Gaussian field: its initial count, the initialiser's options and the truncation radius."""

    n_gaussians: int | str = 50_000      # initial count (given to the initialiser); "auto": by grid size
    #                                      (ReconstructConfig.gaussian_budget)
    init_options: dict = dataclasses.field(default_factory=dict)  # keyword options of the initialiser
    k_sigma: float = 3.0                 # truncation radius of every render, σ of the largest axis


@dataclasses.dataclass
class ScheduleSettings:
    """How long, how many views per step, the coarse stage and the learning-rate decay length."""

    iterations: Union[int, str] = 15_000  # or "auto": until the data residual stops improving (see stopping)
    views_per_iter: Union[int, str] = 0  # 0: all views every iteration (3DGR-CT); "auto": AUTO_VIEWS_PER_ITER
    #                                        or all the scan's views when it has fewer
    coarse_iterations: int = 0           # half-resolution stage length (3DGR-CT low_reso_stage)
    lr_decay_steps: Optional[int] = 30_000  # log-linear decay length of every rate with a final value;
    #                                        None: the run's length (iterations, or max_iterations with "auto")


@dataclasses.dataclass
class OptimizerSettings:
    """The optimiser method (:data:`OPTIMIZER_METHODS`), the loss and Adam's step sizes: ``position_lr_*``
    in units of the volume's largest side, the others on the raw parameters (log-σ, quaternion,
    pre-activation intensity)."""

    method: str = "3dgr"                 # "3dgr": Adam on the exact gradient; "preconditioned": see the module doc
    precondition_filter: str = "ram-lak"  # "preconditioned": the residual's filter (operators.fdk.FILTERS)
    loss: str = "mse"                    # data term: "mse" (3DGR-CT) or "l1" (R²-Gaussian)
    lambda_dssim: float = 0.0            # weight of 1 - SSIM over projection images
    lambda_tv: float | str = 0.0         # weight of 3-D TV of the rendered volume; "auto": by initialiser
    #                                      (PRECONDITIONED_TV_BY_INIT, else PRECONDITIONED_TV)
    position_lr_init: float = 2e-3
    position_lr_final: float = 2e-6
    intensity_lr: float = 0.05
    intensity_lr_final: Optional[float] = None  # None: constant (3DGR-CT)
    scale_lr: float = 5e-3
    scale_lr_final: Optional[float] = None
    rotation_lr: float = 1e-3
    rotation_lr_final: Optional[float] = None


@dataclasses.dataclass
class DensitySettings:
    """Density control: the strategy (:data:`DENSITY_STRATEGIES`; None or "none": a fixed count), its
    schedule and rules, and the cap on the count. A schedule setting left at None takes the strategy's
    own: "3dgr" every 100 in [500, 7 500) (3DGR-CT's, for runs of ~15 000 iterations), "additive" every
    100 in [200, 10 000) (runs of ~300–3 000 iterations; its absolute threshold ends growth earlier)."""

    strategy: Optional[str] = "3dgr"
    densify_every: Optional[int] = None
    densify_from: Optional[int] = None
    densify_until: Optional[int] = None
    densify_grad_quantile: float = 0.95  # "3dgr": densify above this quantile of mean centre gradients
    densify_grad_threshold: float = ADDITIVE_GRAD_THRESHOLD  # "additive": on its scale-free centre gradient
    split_offset: float = ADDITIVE_SPLIT_OFFSET  # "additive": split children at μ ± a·σ₁·v₁ (major axis)
    min_scale_voxels: float = ADDITIVE_MIN_SCALE_VOXELS  # "additive": σ floor, in the largest voxel side
    max_gaussians: int = 200_000
    prune_min_intensity: float = 1e-5

    def build(self, volume: VolumeGeometry, generator: torch.Generator):
        """The :class:`gaussians.DensityStrategy` these settings name for ``volume`` (None: no density control);
        ``generator`` draws its random samples."""
        from ctrecon.methods.gaussians import AdditiveDensityStrategy, QuantileSplitCloneStrategy

        if self.strategy in (None, "none"):
            return None
        schedule = {"densify_every": self.densify_every, "start": self.densify_from, "stop": self.densify_until}
        common = {"max_gaussians": self.max_gaussians, "prune_intensity": self.prune_min_intensity,
                  **{key: value for key, value in schedule.items() if value is not None}}
        if self.strategy == "additive":
            return AdditiveDensityStrategy(volume, grad_threshold=self.densify_grad_threshold,
                                           split_offset=self.split_offset, min_scale_voxels=self.min_scale_voxels,
                                           **common)
        return QuantileSplitCloneStrategy.for_volume(volume, grad_quantile=self.densify_grad_quantile,
                                                     generator=generator, **common)


@dataclasses.dataclass
class EvaluationSettings:
    """When the volume is evaluated, the convergence thresholds, and the per-phase timing."""

    eval_every: int = 100
    psnr_threshold: float = 35.0
    ssim_threshold: float = 0.90
    ssim_threshold_metric: str = "ssim_slice"
    time_phases: bool = False            # CUDA only: synchronise around each phase for the split


@dataclasses.dataclass
class StoppingSettings:
    """Early stops: against the ground truth (off by default), and two that need none. The rule of
    ``iterations="auto"``: stop once the mean data loss of the last ``residual_window`` iterations is less
    than ``residual_tolerance`` (relative) below that of the window before, or at ``max_iterations``.
    Held-out views (``validation_views`` > 0): those views are left out of the fit and their loss is
    checked every ``validation_every`` iterations; once ``validation_patience`` checks in a row bring no
    new lowest value, the run stops and returns the field of the lowest (it stops the fit of noise, which
    the residual rule cannot see: the training loss keeps falling while the field fits noise)."""

    stop_at_psnr: Optional[float] = None  # stop once PSNR ≥ this
    stop_at_thresholds: bool = False      # stop once both thresholds are reached
    max_iterations: int = 3_000           # the cap of iterations="auto"
    residual_window: int = 100            # iterations per window (with 10 of 120 views: 8 passes over the views)
    residual_tolerance: float = 0.01      # relative improvement between consecutive windows below which to stop
    validation_views: int = 0             # views held out of the fit (spread over the scan); 0: none
    validation_every: int = 25            # iterations between checks of the held-out views' loss
    validation_patience: int = 4          # checks without a new best after which to stop (returning the best)


#: The stop reason of the held-out views' rule (StoppingSettings.validation_views).
VALIDATION_STOP = "held-out views' loss stopped falling"

#: Views per iteration of ``views_per_iter="auto"`` (a third of a 120-view scan).
AUTO_VIEWS_PER_ITER = 40

#: TV weight of the preconditioned method, chosen on development CT (data/README.md): 1e-3 against 0, 1e-4
#: and 3e-3 on lung1 noiseless and at dose 2e4, and the chest CTA at dose 1e5.
PRECONDITIONED_TV = 1e-3

#: The initialisers whose fields want another TV weight than :data:`PRECONDITIONED_TV` (``lambda_tv="auto"``).
#: MedGMAE's field (~12 000 large Gaussians) loses 0.3-0.4 dB to TV 1e-3 on each development case, and 3e-4
#: recovers it (600-800 iterations; lung1 noiseless 35.27 -> 35.58 dB, at dose 2e4 35.96 -> 36.30, the chest
#: CTA 30.68 -> 31.04; TV 0: 35.57, -, 31.08), keeping TV's protection on the noisy scan.
PRECONDITIONED_TV_BY_INIT = {"medgmae": 3e-4}

#: The "additive" density threshold of the preconditioned method (used when a run turns density control on):
#: its filtered gradients are ~4.5× smaller than the exact ones the default threshold was set on (development
#: lung1: 0.055 → 38.59 dB and 106k Gaussians at 600 iterations; 0.025 → 38.85 at the 200k cap; off: 37.73).
PRECONDITIONED_GRAD_THRESHOLD = 0.055

#: ``n_gaussians="auto"`` (the preconditioned method's): one Gaussian per this many voxels, at least
#: :data:`AUTO_MIN_GAUSSIANS` (every 48×96×96 figure in data/README.md used 50 000), at most ``max_gaussians``.
#: A scaling rule, not a tuned value: at 128×256×256 (development lung1) it gives 83 887, where MedGMAE*'s
#: uncapped field of 72 899 reached 35 dB in 100 iterations and the fixed 50 000 cut that field down.
AUTO_VOXELS_PER_GAUSSIAN = 100
AUTO_MIN_GAUSSIANS = 50_000

#: The optimiser methods and the settings each one changes from the defaults above (3DGR-CT's); settings
#: given explicitly win. "preconditioned" was chosen by measurement on development volumes (data/README.md).
OPTIMIZER_METHODS = {
    "3dgr": {},
    "preconditioned": {"iterations": "auto", "views_per_iter": "auto", "lr_decay_steps": None,
                       "position_lr_final": 2e-5, "intensity_lr_final": 5e-3, "scale_lr_final": 5e-4,
                       "rotation_lr_final": 1e-4, "strategy": None, "lambda_tv": "auto", "n_gaussians": "auto",
                       "densify_grad_threshold": PRECONDITIONED_GRAD_THRESHOLD},
}

SECTIONS = {"gaussians": GaussianSettings, "schedule": ScheduleSettings, "optimizer": OptimizerSettings,
            "density": DensitySettings, "evaluation": EvaluationSettings, "stopping": StoppingSettings}
_SECTION_OF = {f.name: section for section, kind in SECTIONS.items() for f in dataclasses.fields(kind)}


@dataclasses.dataclass
class ReconstructConfig:
    """Settings of :func:`reconstruct` in the sections of :data:`SECTIONS` (JSON-serialisable; defaults
    follow 3DGR-CT where it has one). Every setting has a name unique over the sections, so
    ``from_dict`` also reads it flat: ``ReconstructConfig.from_dict({"iterations": 200, "views_per_iter": 10})``.
    """

    gaussians: GaussianSettings = dataclasses.field(default_factory=GaussianSettings)
    schedule: ScheduleSettings = dataclasses.field(default_factory=ScheduleSettings)
    optimizer: OptimizerSettings = dataclasses.field(default_factory=OptimizerSettings)
    density: DensitySettings = dataclasses.field(default_factory=DensitySettings)
    evaluation: EvaluationSettings = dataclasses.field(default_factory=EvaluationSettings)
    stopping: StoppingSettings = dataclasses.field(default_factory=StoppingSettings)

    def validate(self) -> "ReconstructConfig":
        """InputError naming the first bad field."""
        values = {name: getattr(getattr(self, section), name) for name, section in _SECTION_OF.items()}
        validate_evaluation(self.evaluation, self.stopping)
        positive_ints = ("iterations", "n_gaussians", "lr_decay_steps", "densify_every", "max_gaussians",
                         "max_iterations", "residual_window", "validation_every", "validation_patience")
        for name in positive_ints:
            value = values[name]
            if (name, value) in (("iterations", "auto"), ("lr_decay_steps", None), ("densify_every", None),
                                 ("n_gaussians", "auto")):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                also = {"iterations": ' or "auto"', "n_gaussians": ' or "auto"', "lr_decay_steps": " or None",
                        "densify_every": " or None"}.get(
                    name, "")
                raise InputError(f"{name} must be a positive integer{also}, got {value!r}")
        for name in ("views_per_iter", "coarse_iterations", "densify_from", "densify_until", "validation_views"):
            value = values[name]
            if (name, value) == ("views_per_iter", "auto"):
                continue
            if value is None and name.startswith("densify"):  # the strategy's own schedule
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise InputError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("position_lr_init", "position_lr_final", "k_sigma", "min_scale_voxels"):
            if not finite_number(values[name]) or values[name] <= 0:
                raise InputError(f"{name} must be a positive number, got {values[name]!r}")
        for name in ("intensity_lr", "scale_lr", "rotation_lr", "lambda_dssim", "lambda_tv", "prune_min_intensity",
                     "densify_grad_threshold"):
            if (name, values[name]) == ("lambda_tv", "auto"):
                continue
            if not finite_number(values[name]) or values[name] < 0:
                raise InputError(f"{name} must be a non-negative number, got {values[name]!r}")
        for name in ("intensity_lr_final", "scale_lr_final", "rotation_lr_final"):
            value = values[name]
            if value is not None and (not finite_number(value) or value <= 0 or values[name[:-6]] <= 0):
                raise InputError(f"{name} must be None or a positive number (with a positive {name[:-6]}), "
                                 f"got {value!r}")
        init_options = values["init_options"]
        if not isinstance(init_options, dict) or not all(isinstance(k, str) for k in init_options):
            raise InputError(f"init_options must be a dict of keyword options, got {init_options!r}")
        if values["loss"] not in LOSSES:
            raise InputError(f"unknown loss {values['loss']!r} (use {', '.join(LOSSES)})")
        if values["method"] not in OPTIMIZER_METHODS:
            raise InputError(f"unknown optimizer method {values['method']!r} (use {', '.join(OPTIMIZER_METHODS)})")
        if values["precondition_filter"] not in FILTERS:
            raise InputError(f"unknown precondition_filter {values['precondition_filter']!r} "
                             f"(use {', '.join(FILTERS)})")
        if values["method"] == "preconditioned" and values["loss"] != "mse":
            raise InputError("the preconditioned optimizer filters the residual of the mse loss; use loss mse")
        if values["strategy"] not in (None, "none", *DENSITY_STRATEGIES):
            raise InputError(f"unknown density strategy {values['strategy']!r} "
                             f"(use {', '.join(DENSITY_STRATEGIES)} or none)")
        if not finite_number(values["densify_grad_quantile"]) or not 0.0 < values["densify_grad_quantile"] < 1.0:
            raise InputError(f"densify_grad_quantile must be in (0, 1), got {values['densify_grad_quantile']}")
        if not finite_number(values["split_offset"]) or not 0.0 < values["split_offset"] < 1.0:
            raise InputError(f"split_offset must be in (0, 1), got {values['split_offset']!r}")
        if values["n_gaussians"] != "auto" and values["max_gaussians"] < values["n_gaussians"]:
            raise InputError(f"max_gaussians ({values['max_gaussians']}) must be >= n_gaussians "
                             f"({values['n_gaussians']})")
        if not finite_number(values["residual_tolerance"]) or not 0 <= values["residual_tolerance"] < 1:
            raise InputError(f"residual_tolerance must be a number in [0, 1), got {values['residual_tolerance']!r}")
        return self

    def gaussian_budget(self, n_voxels: int) -> int:
        """The initial field's count on a grid of ``n_voxels``: ``n_gaussians``, or with "auto" one per
        :data:`AUTO_VOXELS_PER_GAUSSIAN` voxels within [:data:`AUTO_MIN_GAUSSIANS`, ``max_gaussians``]."""
        if self.gaussians.n_gaussians != "auto":
            return self.gaussians.n_gaussians
        wanted = max(AUTO_MIN_GAUSSIANS, math.ceil(n_voxels / AUTO_VOXELS_PER_GAUSSIAN))
        return min(self.density.max_gaussians, wanted)

    def for_initializer(self, init_name: str) -> "ReconstructConfig":
        """This config with ``lambda_tv="auto"`` resolved for the initialiser ``init_name``
        (:data:`PRECONDITIONED_TV_BY_INIT`, else :data:`PRECONDITIONED_TV`); unchanged otherwise."""
        if self.optimizer.lambda_tv != "auto":
            return self
        weight = PRECONDITIONED_TV_BY_INIT.get(init_name, PRECONDITIONED_TV)
        return dataclasses.replace(self, optimizer=dataclasses.replace(self.optimizer, lambda_tv=weight))

    @property
    def iteration_cap(self) -> int:
        """The most iterations the run makes: ``iterations``, or ``max_iterations`` with ``"auto"``."""
        iterations = self.schedule.iterations
        return self.stopping.max_iterations if iterations == "auto" else iterations

    def views_per_step(self, n_views: int) -> int:
        """Views per iteration for a scan of ``n_views`` (0: all): ``views_per_iter``, with "auto" resolved."""
        k = self.schedule.views_per_iter
        return (AUTO_VIEWS_PER_ITER if n_views > AUTO_VIEWS_PER_ITER else 0) if k == "auto" else k

    @property
    def decay_steps(self) -> int:
        """The length of the learning-rate decays: ``lr_decay_steps``, or the run's :attr:`iteration_cap`."""
        return self.schedule.lr_decay_steps or self.iteration_cap

    def to_dict(self) -> dict:
        """``{section: {setting: value}}``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ReconstructConfig":
        """Build from a dict (e.g. a config.json) in any form :meth:`flat_settings` reads, and validate.
        The settings of ``method`` (:data:`OPTIMIZER_METHODS`) fill in what ``data`` leaves out."""
        sections = {section: {} for section in SECTIONS}
        given = cls.flat_settings(data)
        method = given.get("method", OptimizerSettings.method)
        if method not in OPTIMIZER_METHODS:
            raise InputError(f"unknown optimizer method {method!r} (use {', '.join(OPTIMIZER_METHODS)})")
        for name, value in {**OPTIMIZER_METHODS[method], **given}.items():
            sections[_SECTION_OF[name]][name] = value
        return cls(**{section: SECTIONS[section](**values) for section, values in sections.items()}).validate()

    @staticmethod
    def flat_settings(data: dict) -> dict:
        """``{setting: value}`` of ``data``: the sections of :meth:`to_dict`, or the flat setting names
        (the form of config files before the sections, and of ``densify`` true/false, now
        ``density.strategy``), or a mix. Unknown keys, and a setting given twice, are an InputError."""
        if not isinstance(data, dict):
            raise InputError(f"reconstruction settings must be an object of settings, got {data!r}")
        pairs, unknown = [], []
        for key, value in data.items():
            if key in SECTIONS:
                if not isinstance(value, dict):
                    raise InputError(f"reconstruction settings {key!r} must be an object of settings, got {value!r}")
                pairs += [(name, item) for name, item in value.items() if _SECTION_OF.get(name) == key]
                unknown += [f"{key}.{name}" for name in value if _SECTION_OF.get(name) != key]
            elif key in _SECTION_OF:
                pairs.append((key, value))
            elif key == "densify":  # before density strategies: on (the default strategy) or off
                pairs.append(("strategy", DensitySettings.strategy if value else None))
            else:
                unknown.append(key)
        if unknown:
            raise InputError(f"unknown reconstruction setting(s): {', '.join(sorted(unknown))}")
        flat = {}
        for name, value in pairs:
            if name in flat:
                raise InputError(f"reconstruction setting {name} is given twice")
            flat[name] = value
        return flat


def validate_evaluation(evaluation: EvaluationSettings, stopping: StoppingSettings) -> None:
    """InputError naming the first bad field of the evaluation settings and the ground-truth stops (shared by
    3DGR-CT's and the classical methods' settings)."""
    every = evaluation.eval_every
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise InputError(f"eval_every must be a positive integer, got {every!r}")
    if evaluation.ssim_threshold_metric not in SSIM_METRICS:
        raise InputError(f"ssim_threshold_metric must be one of {', '.join(SSIM_METRICS)}")
    for name in ("psnr_threshold", "ssim_threshold"):
        if not finite_number(getattr(evaluation, name)):
            raise InputError(f"{name} must be a finite number")
    if stopping.stop_at_psnr is not None and not finite_number(stopping.stop_at_psnr):
        raise InputError(f"stop_at_psnr must be a finite number or None, got {stopping.stop_at_psnr!r}")
    if not isinstance(stopping.stop_at_thresholds, bool):
        raise InputError(f"stop_at_thresholds must be true or false, got {stopping.stop_at_thresholds!r}")


def finite_number(value) -> bool:
    """A finite int or float (not a bool, not a string)."""
    return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool) \
        and math.isfinite(float(value))


@dataclasses.dataclass
class Progress:
    """What the callback receives after every iteration (and once for the initial evaluation, iteration 0).

    ``loss`` is None at iteration 0; ``evaluation`` is the history record when this iteration was
    evaluated, else None. ``seconds``: optimisation time so far (evaluation excluded). The report
    comes after the Adam step and before this iteration's density control (``n_gaussians`` too).
    """

    iteration: int
    iterations: int
    loss: Optional[float]
    n_gaussians: int
    seconds: float
    evaluation: Optional[dict]
    timing: dict


@dataclasses.dataclass
class ReconstructResult:
    """Outcome of :func:`reconstruct`; ``to_metrics()`` gives the metrics.json content."""

    volume: torch.Tensor                 # [Z, Y, X] unit attenuation, CPU float32
    field: object                        # the GaussianField (on the compute device); None for a classical method
    init: str
    config: ReconstructConfig
    iterations: int                      # optimisation steps completed in the returned state
    history: list
    thresholds: dict                     # {"psnr35": {"iteration", "seconds"} or None if never reached, "ssim90": ...},
                                         # named by the thresholds' values (metrics.threshold_key)
    final: Optional[dict]                # metrics.QUALITY_METRICS of the returned state, None without ground truth
    wall_seconds: float                  # optimisation time, evaluation excluded
    eval_seconds: float
    init_seconds: float                  # FDK + initialiser (0 with init_field)
    timing: dict                         # seconds per phase (TIMING_PHASES)
    n_gaussians: Optional[int]           # None for a classical method
    interrupted: bool = False
    stop_reason: str = "completed"
    method: str = "3dgr"                 # "3dgr" or a classical method (ctrecon.pipeline.classical.METHODS)
    iterations_run: Optional[int] = None  # steps made, when more than ``iterations`` (a held-out-views stop
    #                                       returns an earlier state); None: ``iterations``
    validation: Optional[list] = None     # [[iteration, held-out views' loss], ...] with held-out views

    def to_metrics(self) -> dict:
        """metrics.json content: the keys of the CLI contract plus timing, init time and stop reason."""
        steps = self.iterations if self.iterations_run is None else self.iterations_run
        return {"method": self.method, "init": self.init, "iterations": self.iterations, "wall_seconds": self.wall_seconds,
                "eval_seconds": self.eval_seconds, "n_gaussians": self.n_gaussians, "final": self.final,
                "thresholds": self.thresholds, "history": self.history,
                "init_seconds": self.init_seconds, "timing": self.timing,
                "seconds_per_iteration": self.wall_seconds / steps if steps else None,
                "ssim_threshold_metric": self.config.evaluation.ssim_threshold_metric,
                "psnr_threshold": self.config.evaluation.psnr_threshold,
                "ssim_threshold": self.config.evaluation.ssim_threshold,
                "interrupted": self.interrupted, "stop_reason": self.stop_reason,
                "iterations_run": steps,
                "validation": self.validation}


class NonFiniteLossError(RuntimeError):
    """The loss or a gradient became NaN/Inf; ``result`` holds the last state that gave a finite loss."""

    def __init__(self, iteration: int, what: str, result: ReconstructResult):
        super().__init__(f"non-finite {what} at iteration {iteration}; the last good state (after "
                         f"{result.iterations} iterations) was kept. Try smaller learning rates.")
        self.iteration = iteration
        self.result = result


# ----------------------------------------------------------------------------- pieces
def _decayed(start: float, final: Optional[float], step: int, steps: int) -> float:
    if final is None:
        return start
    t = min(max(step / steps, 0.0), 1.0)
    return math.exp((1 - t) * math.log(start) + t * math.log(final))


def learning_rates(step: int, config: ReconstructConfig, extent: float) -> dict:
    """Adam rate per parameter group at ``step``: log-linear from the initial to the final value over
    :attr:`ReconstructConfig.decay_steps` (constant without a final value); centres in mm (× ``extent``, mm)."""
    steps, rates = config.decay_steps, config.optimizer
    return {"means": extent * _decayed(rates.position_lr_init, rates.position_lr_final, step, steps),
            "intensities": _decayed(rates.intensity_lr, rates.intensity_lr_final, step, steps),
            "log_scales": _decayed(rates.scale_lr, rates.scale_lr_final, step, steps),
            "quats": _decayed(rates.rotation_lr, rates.rotation_lr_final, step, steps)}


def coarse_lattice(volume: VolumeGeometry, offset: tuple) -> VolumeGeometry:
    """The half-resolution sub-lattice ``[k0::2, j0::2, i0::2]`` of ``volume``; ``offset`` = (k0, j0, i0) ∈ {0,1}³.

    Its voxel centres are exactly those voxel centres of ``volume`` (spacing doubled, origin shifted).
    """
    counts, origin = [], []
    for n, d, o, a in zip(volume.nVoxel, volume.dVoxel, volume.offOrigin, offset):
        m = len(range(a, n, 2))
        if m == 0:  # an axis of one voxel: the odd sub-lattice is empty, reuse the even one
            a, m = 0, 1
        counts.append(m)
        origin.append(o + (a + m - 1 - (n - 1) / 2.0) * d)
    return VolumeGeometry(tuple(counts), tuple(2.0 * d for d in volume.dVoxel), tuple(origin))


def residual_converged(losses: list, window: int, tolerance: float) -> bool:
    """True when the mean of the last ``window`` losses is less than ``tolerance`` (relative) below the
    mean of the ``window`` before (checked at whole windows only, so each verdict compares new data)."""
    if len(losses) < 2 * window or len(losses) % window:
        return False
    previous, last = np.mean(losses[-2 * window:-window]), np.mean(losses[-window:])
    return bool(last > previous * (1.0 - tolerance))


def validation_split(n_views: int, n_held: int) -> tuple:
    """(fitted, held-out) view indices (sorted int64 arrays): ``n_held`` views spread evenly over the
    scan's ``n_views`` (view ``floor((i + 0.5)·n_views / n_held)`` for i < n_held), the rest for the fit."""
    held = np.array(sorted({int((i + 0.5) * n_views / n_held) for i in range(n_held)}), dtype=np.int64)
    return np.setdiff1d(np.arange(n_views), held), held


def filter_gain(geometry, filter: str = "ram-lak") -> float:
    """RMS over frequencies of the response of the FDK ``filter`` on ``geometry``'s detector rows."""
    response, _ = filter_response(geometry.nDetector[1], isocentre_column_spacing(geometry), filter)
    return float(np.sqrt(np.mean(response ** 2)))


def ramp_weighted_error(residual: torch.Tensor, geometry, filter: str = "ram-lak") -> float:
    """``mean(r · F r) / g`` of projection residuals ``r`` [A, V, U] of ``geometry`` (F: the FDK ramp
    filter along u, g its RMS gain). By the Fourier slice theorem ``Σ_θ ∫ |ω| |r̂_θ(ω)|² dω`` is
    proportional to the squared error of the volume behind ``r`` (plus the noise's own share), whatever
    its frequencies; the plain mean squared residual weights the low ones (1/|ω|), so it goes on falling
    while a field fits noise (measured, data/README.md) and cannot serve as the held-out views' stop."""
    return float((residual * filter_projections(residual, geometry, filter)).mean()) / filter_gain(geometry, filter)


def _split_scan(scan, n_held: int) -> tuple:
    """(the scan of the fitted views, (held-out projections [H, V, U], their geometry) or None)."""
    if not n_held:
        return scan, None
    fitted, held = validation_split(scan.geometry.n_angles, n_held)
    fit = Scan(scan.projections[fitted], scan.angles[fitted], scan.geometry[fitted], scan.ground_truth, scan.meta)
    return fit, (scan.projections[held], scan.geometry[held])


class _ViewCycle:
    """K views per call, without replacement within a shuffled pass through all views."""

    def __init__(self, n_views: int, k: int, generator: torch.Generator):
        self.n, self.k, self.generator = n_views, k, generator
        self.order = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        taken = []
        need = self.k
        while need:
            if self.order.numel() == 0:
                self.order = torch.randperm(self.n, generator=self.generator)
            part, self.order = self.order[:need], self.order[need:]
            taken.append(part)
            need -= part.numel()
        return torch.sort(torch.cat(taken)).values


def _gaussian_window(size: int, sigma: float, dtype, device) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    w = torch.exp(-(x * x) / (2 * sigma * sigma))
    return w / w.sum()


def projection_ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Differentiable mean SSIM of projection images ``[A, V, U]`` (11×11 Gaussian window, σ 1.5, as
    R²-Gaussian's D-SSIM); a training loss term, not an evaluation metric (see :mod:`ctrecon.pipeline.metrics`)."""
    size = min(11, pred.shape[-1], pred.shape[-2])
    size -= 1 - size % 2  # odd
    w = _gaussian_window(size, 1.5, pred.dtype, pred.device)
    kernel = (w[:, None] * w[None, :])[None, None]
    x, y = pred.unsqueeze(1), target.unsqueeze(1)
    blur = lambda t: F.conv2d(t, kernel)  # noqa: E731 (valid part only)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return ssim.mean()


def total_variation(volume: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV of ``[Z, Y, X]``: Σ over axes of the mean |forward difference| (3DGR-CT)."""
    return sum(volume.diff(dim=axis).abs().mean() for axis in range(volume.dim()) if volume.shape[axis] > 1)


# ----------------------------------------------------------------------------- the loop
def _snapshot(field) -> dict:
    return {name: param.detach().clone() for name, param in field.raw_parameters().items()}


def _field_from(field, raw: dict):
    from ctrecon.methods.gaussians import GaussianField

    return GaussianField(raw["means"], raw["log_scales"], raw["quats"], raw["intensities"],
                         intensity_activation=field.intensity_activation, metadata=field.metadata)


def _consistent(field) -> bool:
    """All parameter rows agree (an interrupt inside density control may leave them mid-update)."""
    return len({int(p.shape[0]) for p in field.raw_parameters().values()}) == 1


def _check_inputs(scan, config: ReconstructConfig) -> None:
    """InputError for a scan the settings cannot run on (before the FDK)."""
    check_circular(scan.geometry)  # every initialiser starts from the FDK
    n_views, held = scan.geometry.n_angles, config.stopping.validation_views
    if held and held > n_views // 2:
        raise InputError(f"validation_views ({held}) must leave at least half of the scan's {n_views} views to the fit")
    fitted = n_views - held
    if config.schedule.views_per_iter != "auto" and config.schedule.views_per_iter > fitted:
        raise InputError(f"views_per_iter ({config.schedule.views_per_iter}) exceeds the scan's {fitted} views"
                         + (f" left after holding out {held}" if held else ""))
    grid = scan.geometry.volume
    check_grid_memory(grid.nVoxel, 4, "3DGR-CT (render, gradient, TV)")
    if scan.ground_truth is not None and tuple(np.shape(scan.ground_truth)) != tuple(grid.nVoxel):
        raise InputError(f"ground truth shape {tuple(np.shape(scan.ground_truth))} differs from the grid {grid.nVoxel}")


def _initial_field(scan, init: str, config: ReconstructConfig, device, generator, init_field, stage_progress=None):
    """The initial GaussianField: ``init_field``, or the initialiser on the scan's FDK. stage_progress(stage,
    done, total) hears the FDK's views and, from initialisers that report it (the priors), their windows."""
    from ctrecon.operators.fdk import fdk
    from ctrecon.methods.gaussians import GaussianField, get_initializer, initializer_name

    if init_field is not None:
        if not isinstance(init_field, GaussianField):
            raise InputError(f"init_field must be a GaussianField, got {type(init_field).__name__}")
        return init_field.to(device)
    initializer = get_initializer(init)
    options = config.gaussians.init_options
    if options:  # check the options before the FDK
        try:
            inspect.signature(initializer).bind(None, None, None, None, **options)
        except TypeError as err:
            raise InputError(f"initializer {init!r} does not accept init_options {options}: {err}") from None
    reporter = (lambda stage: None) if stage_progress is None else \
        (lambda stage: lambda done, total: stage_progress(stage, done, total))
    fdk_volume = fdk(scan.projections, scan.geometry, device=device, progress=reporter("FDK"))
    if stage_progress is not None and "progress" in inspect.signature(initializer).parameters:
        options = {**options, "progress": reporter(f"{initializer_name(init)} windows")}
    budget = config.gaussian_budget(math.prod(scan.geometry.nVoxel))
    return initializer(fdk_volume, scan.geometry.volume, budget, generator, **options).to(device)


class Trainer:
    """One 3DGR-CT optimisation of ``field`` against ``scan``: its state, and the steps of the algorithm
    box that :func:`reconstruct` runs in order (``step``, ``evaluate``, ``stop_reason``, ``control_density``).

    init, init_seconds: the initialisation's label and time, carried into the result. ``generator``
    draws the view order and the density strategy's samples. held_out: (projections [H, V, U], their
    ConeBeamGeometry) of views left out of ``scan`` for the held-out views' stop, or None.
    """

    def __init__(self, scan, field, config: ReconstructConfig, *, device: torch.device, generator: torch.Generator,
                 regularizer: Callable[[torch.Tensor, int], torch.Tensor] | None, init: str, init_seconds: float,
                 held_out: tuple | None = None):
        config = config.for_initializer(init)  # lambda_tv "auto" -> this initialiser's weight
        self.config, self.device, self.regularizer = config, device, regularizer
        self.init, self.init_seconds = init, init_seconds
        self.geometry = scan.geometry
        self.grid = self.geometry.volume
        measured = torch.as_tensor(np.asarray(scan.projections, dtype=np.float32), device=device)
        self.projection_scale = float(measured.abs().max()) or 1.0
        self.target = measured / self.projection_scale
        self.extent = max(self.grid.sVoxel)
        self.filter_gain = filter_gain(self.geometry, config.optimizer.precondition_filter)

        self.field = field
        self.optimizer = torch.optim.Adam(field.parameter_groups(learning_rates(0, config, self.extent)), eps=1e-15)
        self.strategy = config.density.build(self.grid, generator)
        self.full_projector = Projector(self.geometry)
        self.coarse = {}  # sub-lattice offset -> (grid, projector), built on first use
        n_views, k = self.geometry.n_angles, config.views_per_step(self.geometry.n_angles)
        self.views = _ViewCycle(n_views, k, generator) if 0 < k < n_views else None
        self.held_projector = self.held_target = None  # the held-out views' projector and measurements
        if held_out is not None:
            projections, held_geometry = held_out
            self.held_projector = Projector(held_geometry)
            self.held_target = torch.as_tensor(np.asarray(projections, dtype=np.float32),
                                               device=device) / self.projection_scale
        self.best_validation = None  # (loss, iteration, raw parameters) of the lowest held-out loss so far
        self.checks_since_best = 0
        self.validation_losses: list = []  # (iteration, held-out loss) of every check

        self.monitor = RunMonitor(scan.ground_truth, config.evaluation, device)
        self.clock, self.history = self.monitor.clock, self.monitor.history
        self.losses: list = []  # every step's loss, for the residual rule
        self.completed = 0  # optimisation steps in the current field
        self.good_iteration, self.good_raw = 0, _snapshot(field)  # the last state that gave a finite loss

    # ----------------------------------------------------------------- one iteration
    def step(self, iteration: int) -> float:
        """Render → project → loss → backward → Adam step (at this step's learning rates, on this step's
        grid and views); returns the loss. Raises _NonFinite on a NaN/Inf loss or gradient."""
        step = iteration - 1
        rates = learning_rates(step, self.config, self.extent)
        for group in self.optimizer.param_groups:
            group["lr"] = rates[group["name"]]
        render_grid, projector = self._grid_and_projector(step)
        chosen = self.views.next() if self.views is not None else None
        if chosen is not None:
            projector = projector.subset(chosen)
            wanted = self.target[chosen.to(self.device)]
        else:
            wanted = self.target

        clock = self.clock
        clock.begin_phase()
        volume = self.field.render(render_grid, self.config.gaussians.k_sigma)
        clock.end_phase("render")
        predicted = projector(volume) / self.projection_scale
        clock.end_phase("project")
        data, extras = self._loss_terms(predicted, wanted, volume, iteration)
        loss = data
        for term in extras:
            loss = loss + term
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise _NonFinite(iteration, "loss")
        self.good_iteration, self.good_raw = step, _snapshot(self.field)
        if self.config.optimizer.method == "preconditioned":
            self._preconditioned_backward(predicted, wanted, extras)
        else:
            loss.backward()
        # A float64 sum is finite exactly when every entry of a float32 gradient is (it cannot overflow, and NaN
        # and ±Inf propagate); one reduction per parameter and one synchronisation.
        sums = [p.grad.sum(dtype=torch.float64) for p in self.field.raw_parameters().values() if p.grad is not None]
        if sums and not bool(torch.stack(sums).isfinite().all()):
            raise _NonFinite(iteration, "gradient")
        if self.strategy is not None:
            self.strategy.step_post_backward(self.field, self.optimizer, iteration)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        clock.end_phase("backward")
        self.completed = iteration
        self.monitor.record_loss(loss_value)
        self.losses.append(loss_value)
        return loss_value

    def _preconditioned_backward(self, predicted, wanted, extras: list) -> None:
        """Backward with the data term's gradient ``2 r / M`` (r = predicted − measured, M values) replaced by
        the ramp-filtered residual ``2 F(r) / (M·g)``: the parameters then get ``Jᵀ Aᵀ F r``, and
        ``Aᵀ F`` (filtered backprojection) undoes most of the 1/|ω| blur of ``AᵀA``, so the high
        frequencies that plain gradients fit slowly get steps of their own size. ``g`` (the filter's RMS
        gain over frequencies) keeps the step of a white residual as large as the exact one. The other loss
        terms (D-SSIM, TV, a regulariser) keep their exact gradients."""
        residual = (predicted - wanted).detach()
        filtered = filter_projections(residual, self.geometry, self.config.optimizer.precondition_filter) * (
            2.0 / (residual.numel() * self.filter_gain))
        others = [term for term in extras if term.requires_grad]
        torch.autograd.backward([predicted, *others], [filtered, *([None] * len(others))])

    def _grid_and_projector(self, step: int):
        """The render grid and its projector: a half-resolution sub-lattice in the coarse stage, else the grid."""
        if step >= self.config.schedule.coarse_iterations:
            return self.grid, self.full_projector
        offset = ((step >> 2) & 1, (step >> 1) & 1, step & 1)
        if offset not in self.coarse:
            sub = coarse_lattice(self.grid, offset)
            self.coarse[offset] = (sub, Projector(self.geometry.with_volume(sub)))
        return self.coarse[offset]

    def _loss_terms(self, predicted, wanted, volume, iteration: int) -> tuple:
        """The data term and the list of the other terms (D-SSIM, TV, the regulariser), summed in this order."""
        terms = self.config.optimizer
        data = F.mse_loss(predicted, wanted) if terms.loss == "mse" else F.l1_loss(predicted, wanted)
        extras = []
        if terms.lambda_dssim > 0:
            extras.append(terms.lambda_dssim * (1.0 - projection_ssim(predicted, wanted)))
        if terms.lambda_tv > 0:
            extras.append(terms.lambda_tv * total_variation(volume))
        if self.regularizer is not None:
            extras.append(self.regularizer(volume, iteration))
        return data, extras

    def control_density(self, iteration: int) -> None:
        """The density strategy's turn after the optimiser step (and this iteration's evaluation)."""
        if self.strategy is not None:
            self.clock.begin_phase()
            self.strategy.step_post_update(self.field, self.optimizer, iteration)
            self.clock.end_phase("densify")

    # ----------------------------------------------------------------- evaluation and stopping
    def check_validation(self, iteration: int) -> Optional[str]:
        """Every ``validation_every`` iterations (with held-out views): the held-out views' loss (part of
        the optimisation time), remembering the state of the lowest; the stop reason once
        ``validation_patience`` checks in a row found none lower, else None."""
        stopping = self.config.stopping
        if self.held_projector is None or iteration % stopping.validation_every:
            return None
        self.clock.begin_phase()
        with torch.no_grad():
            volume = self.field.render(self.grid, self.config.gaussians.k_sigma)
            loss = self.held_out_error(volume)
        self.validation_losses.append((iteration, loss))
        if self.best_validation is None or loss < self.best_validation[0]:
            self.best_validation = (loss, iteration, _snapshot(self.field))
            self.checks_since_best = 0
        else:
            self.checks_since_best += 1
        self.clock.end_phase("validate")
        if self.checks_since_best >= stopping.validation_patience:
            return VALIDATION_STOP
        return None

    def held_out_error(self, volume: torch.Tensor) -> float:
        """:func:`ramp_weighted_error` of the held-out views' residual (normalised like the loss)."""
        residual = self.held_projector(volume) / self.projection_scale - self.held_target
        return ramp_weighted_error(residual, self.held_projector.geometry, self.config.optimizer.precondition_filter)

    def best_validated(self) -> tuple:
        """(field, iterations) of the lowest held-out loss checked so far."""
        _, iteration, raw = self.best_validation
        return _field_from(self.field, raw), iteration

    def evaluation_due(self, iteration: int) -> bool:
        return iteration % self.config.evaluation.eval_every == 0 or iteration == self.config.iteration_cap

    def evaluate(self, iteration: int) -> dict:
        """Append the history record of the current field (quality against the ground truth, mean loss
        since the last record); its time is excluded from the optimisation clock."""
        return self.monitor.evaluate(iteration, lambda: self.field.render(self.grid, self.config.gaussians.k_sigma),
                                     n_gaussians=len(self.field))

    def stop_reason(self, record: Optional[dict]) -> Optional[str]:
        """Why to stop after this iteration (None: go on): the residual rule of ``iterations="auto"``
        (checked every iteration, no ground truth needed), then the targets on an evaluation ``record``."""
        stopping = self.config.stopping
        if self.config.schedule.iterations == "auto" and residual_converged(
                self.losses, stopping.residual_window, stopping.residual_tolerance):
            return "data residual converged"
        return self.monitor.target_reached(record, stopping)

    # ----------------------------------------------------------------- the outcome
    def good_field(self):
        """A field of the last parameters that gave a finite loss (``good_iteration`` steps)."""
        return _field_from(self.field, self.good_raw)

    def result(self, field, iterations: int, stop_reason: str, interrupted: bool = False) -> ReconstructResult:
        """The result for ``field``; its quality is the last history record when that one evaluated this
        state, else it is evaluated now."""
        wall = self.clock.seconds()
        t0 = time.perf_counter()
        with torch.no_grad():
            volume = field.render(self.grid, self.config.gaussians.k_sigma)
        self.clock.exclude_since(t0)
        final = self.monitor.final_quality(volume, iterations, evaluated=field is self.field)
        return ReconstructResult(
            volume=volume.detach().float().cpu(), field=field, init=self.init, config=self.config,
            iterations=iterations, history=self.history, thresholds=self.monitor.tracker.summary(), final=final,
            wall_seconds=wall, eval_seconds=self.clock.excluded, init_seconds=self.init_seconds,
            timing=dict(self.clock.phases), n_gaussians=len(field), interrupted=interrupted, stop_reason=stop_reason,
            iterations_run=self.completed, validation=[list(check) for check in self.validation_losses] or None)


def reconstruct(scan, *, init="fbp", config: ReconstructConfig | None = None, device="cpu", seed: int = 0,
                callback: Callable[[Progress], None] | None = None, init_field=None,
                regularizer: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
                stage_progress: Callable[[str, int, int], None] | None = None) -> ReconstructResult:
    """Run 3DGR-CT on ``scan`` (a :class:`ctrecon.core.io.Scan`); see the module docstring.

    init: an initialiser used on the scan's FDK, by its registered name ("fbp", "medgmae", ...) or
    itself (e.g. ``priors.zero_shot.PriorInit(checkpoint)``), or a label for ``init_field`` (a ready
    :class:`GaussianField`, e.g. from a prior). callback(Progress): called after each
    iteration; it may raise KeyboardInterrupt to stop. regularizer(volume [Z, Y, X], iteration) →
    scalar tensor added to the loss (on the rendered grid, coarse or full). stage_progress(stage, done,
    total): progress of the stages before the first iteration ("FDK" views, a prior's windows).
    Raises InputError on bad input and NonFiniteLossError (with the last good state) on NaN/Inf.
    """
    from ctrecon.methods.gaussians import initializer_name

    config = (config or ReconstructConfig()).validate()
    device = torch.device(device)
    _check_inputs(scan, config)
    generator = torch.Generator().manual_seed(int(seed))
    scan, held_out = _split_scan(scan, config.stopping.validation_views)  # the held-out views see no fit
    t_init = time.perf_counter()
    field = _initial_field(scan, init, config, device, generator, init_field, stage_progress)
    init_seconds = 0.0 if init_field is not None else time.perf_counter() - t_init
    if len(field) > config.density.max_gaussians:
        raise InputError(f"the initial field has {len(field)} Gaussians, more than max_gaussians "
                         f"({config.density.max_gaussians})")
    trainer = Trainer(scan, field, config, device=device, generator=generator, regularizer=regularizer,
                      init=initializer_name(init), init_seconds=init_seconds, held_out=held_out)

    iterations = config.iteration_cap
    stop, interrupted = None, False
    try:
        record = trainer.evaluate(0)
        if callback is not None:
            callback(Progress(0, iterations, None, len(trainer.field), record["seconds"], record,
                              dict(trainer.clock.phases)))
        stop = trainer.stop_reason(record)
        for iteration in range(1, iterations + 1) if stop is None else ():
            loss = trainer.step(iteration)
            # Evaluate and report before density control (as 3D-GS does), so that evaluations do not
            # land on the transient right after a split whenever eval_every is a multiple of densify_every.
            record = trainer.evaluate(iteration) if trainer.evaluation_due(iteration) else None
            if callback is not None:
                callback(Progress(iteration, iterations, loss, len(trainer.field), trainer.clock.seconds(), record,
                                  dict(trainer.clock.phases)))
            stop = trainer.check_validation(iteration) or trainer.stop_reason(record)
            if stop is not None:
                break
            if iteration < iterations:
                trainer.control_density(iteration)
    except KeyboardInterrupt:
        stop, interrupted = "interrupted", True
        if not _consistent(trainer.field):  # interrupted inside density control: fall back to the last snapshot
            trainer.field, trainer.completed = trainer.good_field(), trainer.good_iteration
    except _NonFinite as failure:
        reason = f"non-finite {failure.what} at iteration {failure.iteration}"
        raise NonFiniteLossError(failure.iteration, failure.what,
                                 trainer.result(trainer.good_field(), trainer.good_iteration, reason)) from None
    if not trainer.history or trainer.history[-1]["iteration"] != trainer.completed:
        trainer.evaluate(trainer.completed)
    if stop == VALIDATION_STOP:
        return trainer.result(*trainer.best_validated(), stop)
    return trainer.result(trainer.field, trainer.completed, stop or "completed", interrupted)


class _NonFinite(Exception):
    def __init__(self, iteration: int, what: str):
        super().__init__(what)
        self.iteration, self.what = iteration, what
