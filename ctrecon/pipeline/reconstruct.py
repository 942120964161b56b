"""3DGR-CT: fit a 3-D Gaussian field to cone-beam projections (library; no printing).

    result = reconstruct(scan, init="fbp", config=ReconstructConfig(iterations=2000), device="cpu", seed=0)
    result.volume        # [Z, Y, X] unit attenuation (CPU float32)
    result.to_metrics()  # the content of a run's metrics.json

One iteration (3DGR-CT, ``train_ct_recon.py``): voxelise the Gaussians on the scan's grid → project
with the cone-beam projector → loss against the measured projections → backward → Adam step →
adaptive density control. The pieces:

* **Initialisation**: FDK of the scan, then a registered initialiser (:func:`gaussians.get_initializer`:
  "fbp" = 3DGR-CT's, "r2" = R²-Gaussian's, or a prior's), or a ready field (``init_field``).
* **Optimiser**: Adam (eps 1e-15) with 3DGR-CT's per-parameter learning rates: centres 2e-3 decaying
  log-linearly to 2e-6 over ``lr_decay_steps`` = 30 000 steps (3DGR-CT ``position_lr_*``; afterwards it
  stays at the final value), intensities 0.05, log-scales 5e-3, quaternions 1e-3, constant as in
  3DGR-CT unless a ``*_lr_final`` is set (then they decay the same way, as R²-Gaussian does). 3DGR-CT
  keeps centres in a [0, 1]³ frame; here they are in mm, so the centre rates are multiplied by the
  largest side of the volume (mm), the same step relative to the object (as R²-Gaussian does).
* **Loss**: MSE between predicted and measured projections (3DGR-CT), or L1; optional
  ``lambda_dssim``·(1 − SSIM) over the projection images (R²-Gaussian's D-SSIM) and ``lambda_tv``·TV of
  the rendered volume (3DGR-CT's anisotropic TV: mean |forward difference| summed over the three
  axes). Projections are divided by the largest measured value first, so the loss (and so the
  relative weight of the regularisers) does not depend on the object's size or units.
* **Views per iteration**: all views (3DGR-CT) or ``views_per_iter`` K views, drawn without
  replacement from a shuffled cycle through all views (each view once per epoch, as R²-Gaussian's
  view stack).
* **Coarse-to-fine** (3DGR-CT ``low_reso_stage``): for the first ``coarse_iterations`` iterations the
  field is voxelised on one of the 8 half-resolution sub-lattices of the grid (voxels (i::2, j::2,
  k::2), cycling with the iteration) and projected with a projector of that coarse grid against the
  *measured* projections (3DGR-CT compares with projections of the sub-sampled ground truth, which a
  real scan does not have). 8× fewer voxels per render. Off by default.
* **Density control** (:class:`gaussians.DensityController`): clone/split by mean centre-gradient
  norm every ``densify_every`` iterations in [``densify_from``, ``densify_until``), pruning of faint and
  degenerate Gaussians; the count never exceeds ``max_gaussians``.
* **Evaluation** every ``eval_every`` iterations (and at 0 and at the end) against
  ``scan.ground_truth`` when present: PSNR, 3-D SSIM and the 3DGR-CT slice SSIM
  (:mod:`ctrecon.metrics`), and the first iteration/seconds at which PSNR ≥ ``psnr_threshold`` and
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
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ctrecon.core.errors import InputError
from ctrecon.core.geometry import VolumeGeometry

__all__ = ["ReconstructConfig", "ReconstructResult", "Progress", "NonFiniteLossError", "reconstruct",
           "learning_rates", "coarse_lattice", "LOSSES", "TIMING_PHASES"]

LOSSES = ("mse", "l1")
SSIM_METRICS = ("ssim_slice", "ssim3d")
TIMING_PHASES = ("render", "project", "backward", "densify")


@dataclasses.dataclass
class ReconstructConfig:
    """Settings of :func:`reconstruct` (JSON-serialisable; defaults follow 3DGR-CT where it has one).

    Learning rates are Adam step sizes: ``position_lr_*`` in units of the volume's largest side,
    the others on the raw parameters (log-σ, quaternion, pre-activation intensity).
    """

    iterations: int = 15_000
    n_gaussians: int = 50_000            # initial count (given to the initialiser)
    init_options: dict = dataclasses.field(default_factory=dict)  # keyword options of the initialiser
    views_per_iter: int = 0              # 0: all views every iteration (3DGR-CT)
    loss: str = "mse"                    # data term: "mse" (3DGR-CT) or "l1" (R²-Gaussian)
    lambda_dssim: float = 0.0            # weight of 1 - SSIM over projection images
    lambda_tv: float = 0.0               # weight of 3-D TV of the rendered volume
    position_lr_init: float = 2e-3
    position_lr_final: float = 2e-6
    intensity_lr: float = 0.05
    intensity_lr_final: Optional[float] = None  # None: constant (3DGR-CT)
    scale_lr: float = 5e-3
    scale_lr_final: Optional[float] = None
    rotation_lr: float = 1e-3
    rotation_lr_final: Optional[float] = None
    lr_decay_steps: int = 30_000          # log-linear decay length of every rate that has a final value
    coarse_iterations: int = 0           # half-resolution stage length (3DGR-CT low_reso_stage)
    densify: bool = True
    densify_every: int = 100
    densify_from: int = 500
    densify_until: int = 7_500
    densify_grad_quantile: float = 0.95  # densify Gaussians above this quantile of mean centre gradients
    max_gaussians: int = 200_000
    prune_min_intensity: float = 1e-5
    k_sigma: float = 3.0
    eval_every: int = 100
    psnr_threshold: float = 35.0
    ssim_threshold: float = 0.90
    ssim_threshold_metric: str = "ssim_slice"
    stop_at_psnr: Optional[float] = None  # stop once PSNR ≥ this (off by default)
    stop_at_thresholds: bool = False      # stop once both thresholds are reached
    time_phases: bool = False             # CUDA only: synchronise around each phase for the split

    def validate(self) -> "ReconstructConfig":
        """InputError naming the first bad field."""
        positive_ints = ("iterations", "n_gaussians", "lr_decay_steps", "densify_every", "max_gaussians",
                         "eval_every")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        for name in ("views_per_iter", "coarse_iterations", "densify_from", "densify_until"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise InputError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("position_lr_init", "position_lr_final", "k_sigma"):
            if not _finite(getattr(self, name)) or getattr(self, name) <= 0:
                raise InputError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("intensity_lr", "scale_lr", "rotation_lr", "lambda_dssim", "lambda_tv", "prune_min_intensity"):
            if not _finite(getattr(self, name)) or getattr(self, name) < 0:
                raise InputError(f"{name} must be a non-negative number, got {getattr(self, name)!r}")
        for name in ("intensity_lr_final", "scale_lr_final", "rotation_lr_final"):
            value = getattr(self, name)
            if value is not None and (not _finite(value) or value <= 0 or getattr(self, name[:-6]) <= 0):
                raise InputError(f"{name} must be None or a positive number (with a positive {name[:-6]}), "
                                 f"got {value!r}")
        if not isinstance(self.init_options, dict) or not all(isinstance(k, str) for k in self.init_options):
            raise InputError(f"init_options must be a dict of keyword options, got {self.init_options!r}")
        if self.loss not in LOSSES:
            raise InputError(f"unknown loss {self.loss!r} (use {', '.join(LOSSES)})")
        if self.ssim_threshold_metric not in SSIM_METRICS:
            raise InputError(f"ssim_threshold_metric must be one of {', '.join(SSIM_METRICS)}")
        if not 0.0 < self.densify_grad_quantile < 1.0:
            raise InputError(f"densify_grad_quantile must be in (0, 1), got {self.densify_grad_quantile}")
        if self.max_gaussians < self.n_gaussians:
            raise InputError(f"max_gaussians ({self.max_gaussians}) must be >= n_gaussians ({self.n_gaussians})")
        for name in ("psnr_threshold", "ssim_threshold"):
            if not _finite(getattr(self, name)):
                raise InputError(f"{name} must be a finite number")
        if self.stop_at_psnr is not None and not _finite(self.stop_at_psnr):
            raise InputError(f"stop_at_psnr must be a finite number or None, got {self.stop_at_psnr!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ReconstructConfig":
        """Build from a dict (e.g. a config.json); unknown keys are an InputError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown reconstruction setting(s): {', '.join(unknown)}")
        return cls(**data).validate()


def _finite(value) -> bool:
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
    field: object                        # the GaussianField (on the compute device)
    init: str
    config: ReconstructConfig
    iterations: int                      # optimisation steps completed in the returned state
    history: list
    thresholds: dict                     # {"psnr35": {"iteration", "seconds"} or None if never reached, "ssim90": ...}
    final: Optional[dict]                # {"psnr", "ssim3d", "ssim_slice"} of the returned state, None without ground truth
    wall_seconds: float                  # optimisation time, evaluation excluded
    eval_seconds: float
    init_seconds: float                  # FDK + initialiser (0 with init_field)
    timing: dict                         # seconds per phase (TIMING_PHASES)
    n_gaussians: int
    interrupted: bool = False
    stop_reason: str = "completed"

    def to_metrics(self) -> dict:
        """metrics.json content: the keys of the CLI contract plus timing, init time and stop reason."""
        return {"init": self.init, "iterations": self.iterations, "wall_seconds": self.wall_seconds,
                "eval_seconds": self.eval_seconds, "n_gaussians": self.n_gaussians, "final": self.final,
                "thresholds": self.thresholds, "history": self.history,
                "init_seconds": self.init_seconds, "timing": self.timing,
                "seconds_per_iteration": self.wall_seconds / self.iterations if self.iterations else None,
                "ssim_threshold_metric": self.config.ssim_threshold_metric,
                "psnr_threshold": self.config.psnr_threshold, "ssim_threshold": self.config.ssim_threshold,
                "interrupted": self.interrupted, "stop_reason": self.stop_reason}


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
    ``lr_decay_steps`` (constant without a final value); centres in mm (× ``extent``, mm)."""
    steps = config.lr_decay_steps
    return {"means": extent * _decayed(config.position_lr_init, config.position_lr_final, step, steps),
            "intensities": _decayed(config.intensity_lr, config.intensity_lr_final, step, steps),
            "log_scales": _decayed(config.scale_lr, config.scale_lr_final, step, steps),
            "quats": _decayed(config.rotation_lr, config.rotation_lr_final, step, steps)}


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
    R²-Gaussian's D-SSIM); a training loss term, not an evaluation metric (see :mod:`ctrecon.metrics`)."""
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
class _Clock:
    """Optimisation wall clock with evaluation excluded, and the per-phase split."""

    def __init__(self, device: torch.device, sync_phases: bool):
        self.cuda = device.type == "cuda"
        self.sync_phases = sync_phases and self.cuda
        self.start = time.perf_counter()
        self.excluded = 0.0
        self.phases = dict.fromkeys(TIMING_PHASES, 0.0)
        self._mark = self.start

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def begin_phase(self):
        if self.sync_phases:
            self._sync()
        self._mark = time.perf_counter()

    def end_phase(self, name: str):
        if self.sync_phases:
            self._sync()
        now = time.perf_counter()
        self.phases[name] += now - self._mark
        self._mark = now

    def seconds(self) -> float:
        """Optimisation seconds so far (synchronises CUDA)."""
        self._sync()
        return time.perf_counter() - self.start - self.excluded

    def exclude_since(self, t0: float):
        self.excluded += time.perf_counter() - t0


def _quality(volume: torch.Tensor, truth: Optional[torch.Tensor]) -> dict:
    from ctrecon.pipeline.metrics import evaluate

    if truth is None:
        return {"psnr": None, "ssim3d": None, "ssim_slice": None}
    return evaluate(volume, truth, data_range=1.0)


def _snapshot(field) -> dict:
    return {name: param.detach().clone() for name, param in field.raw_parameters().items()}


def _field_from(field, raw: dict):
    from ctrecon.methods.gaussians import GaussianField

    return GaussianField(raw["means"], raw["log_scales"], raw["quats"], raw["intensities"],
                         intensity_activation=field.intensity_activation, metadata=field.metadata)


def _consistent(field) -> bool:
    """All parameter rows agree (an interrupt inside density control may leave them mid-update)."""
    return len({int(p.shape[0]) for p in field.raw_parameters().values()}) == 1


def _initial_field(scan, init: str, config: ReconstructConfig, device, generator, init_field):
    from ctrecon.operators.fdk import fdk
    from ctrecon.methods.gaussians import GaussianField, get_initializer

    if init_field is not None:
        if not isinstance(init_field, GaussianField):
            raise InputError(f"init_field must be a GaussianField, got {type(init_field).__name__}")
        return init_field.to(device)
    initializer = get_initializer(init)
    if config.init_options:  # check the options before the FDK
        try:
            inspect.signature(initializer).bind(None, None, None, None, **config.init_options)
        except TypeError as err:
            raise InputError(f"initializer {init!r} does not accept init_options {config.init_options}: {err}") from None
    fdk_volume = fdk(scan.projections, scan.geometry, device=device)
    return initializer(fdk_volume, scan.geometry.volume, config.n_gaussians, generator,
                       **config.init_options).to(device)


def reconstruct(scan, *, init: str = "fbp", config: ReconstructConfig | None = None, device="cpu", seed: int = 0,
                callback: Callable[[Progress], None] | None = None, init_field=None,
                regularizer: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> ReconstructResult:
    """Run 3DGR-CT on ``scan`` (a :class:`ctrecon.io.Scan`); see the module docstring.

    init: a registered initialiser name (used on the scan's FDK), or a label for ``init_field``
    (a ready :class:`GaussianField`, e.g. from a prior). callback(Progress): called after each
    iteration; it may raise KeyboardInterrupt to stop. regularizer(volume [Z, Y, X], iteration) →
    scalar tensor added to the loss (on the rendered grid, coarse or full).
    Raises InputError on bad input and NonFiniteLossError (with the last good state) on NaN/Inf.
    """
    from ctrecon.methods.gaussians import DensityController
    from ctrecon.pipeline.metrics import ConvergenceTracker
    from ctrecon.operators.projector import Projector

    config = (config or ReconstructConfig()).validate()
    device = torch.device(device)
    geometry = scan.geometry
    grid = geometry.volume
    n_views = geometry.n_angles
    if config.views_per_iter > n_views:
        raise InputError(f"views_per_iter ({config.views_per_iter}) exceeds the scan's {n_views} views")
    generator = torch.Generator().manual_seed(int(seed))
    measured = torch.as_tensor(np.asarray(scan.projections, dtype=np.float32), device=device)
    truth = None if scan.ground_truth is None else torch.as_tensor(
        np.asarray(scan.ground_truth, dtype=np.float32), device=device)
    if truth is not None and tuple(truth.shape) != tuple(grid.nVoxel):
        raise InputError(f"ground truth shape {tuple(truth.shape)} differs from the grid {grid.nVoxel}")

    t_init = time.perf_counter()
    field = _initial_field(scan, init, config, device, generator, init_field)
    init_seconds = 0.0 if init_field is not None else time.perf_counter() - t_init
    if len(field) > config.max_gaussians:
        raise InputError(f"the initial field has {len(field)} Gaussians, more than max_gaussians "
                         f"({config.max_gaussians})")

    projection_scale = float(measured.abs().max()) or 1.0
    target = measured / projection_scale
    extent = max(grid.sVoxel)
    optimizer = torch.optim.Adam(field.parameter_groups(learning_rates(0, config, extent)), eps=1e-15)
    controller = DensityController.for_volume(
        grid, densify_every=config.densify_every, start=config.densify_from, stop=config.densify_until,
        max_gaussians=config.max_gaussians, grad_quantile=config.densify_grad_quantile,
        prune_intensity=config.prune_min_intensity, generator=generator) if config.densify else None
    full_projector = Projector(geometry)
    coarse = {}  # sub-lattice offset -> (grid, projector), built on first use
    views = _ViewCycle(n_views, config.views_per_iter, generator) if 0 < config.views_per_iter < n_views else None

    clock = _Clock(device, config.time_phases)
    history: list = []
    tracker = ConvergenceTracker((("psnr35", "psnr", config.psnr_threshold),
                                  ("ssim90", config.ssim_threshold_metric, config.ssim_threshold)))
    interval_losses: list = []
    state = {"completed": 0, "stop_reason": "completed", "interrupted": False}

    def evaluate(iteration: int) -> dict:
        seconds = clock.seconds()
        t0 = time.perf_counter()
        with torch.no_grad():
            quality = _quality(field.render(grid, config.k_sigma), truth)
        record = {"iteration": iteration, "seconds": seconds,
                  "loss": float(np.mean(interval_losses)) if interval_losses else None,
                  **quality, "n_gaussians": len(field)}
        interval_losses.clear()
        history.append(record)
        if truth is not None:
            tracker.update(iteration, seconds, **quality)
        clock.exclude_since(t0)
        return record

    def should_stop(record: dict) -> Optional[str]:
        if record["psnr"] is None:
            return None
        if config.stop_at_psnr is not None and record["psnr"] >= config.stop_at_psnr:
            return "psnr target"
        if config.stop_at_thresholds and tracker.all_reached:
            return "thresholds reached"
        return None

    def result_from(current_field, iterations: int) -> ReconstructResult:
        """The result for ``current_field``; its quality is the last history record when that one
        evaluated this state, else it is evaluated now."""
        wall = clock.seconds()
        t0 = time.perf_counter()
        with torch.no_grad():
            volume = current_field.render(grid, config.k_sigma)
        if truth is None:
            final = None
        elif current_field is field and history and history[-1]["iteration"] == iterations:
            final = {key: history[-1][key] for key in ("psnr", "ssim3d", "ssim_slice")}
        else:
            final = _quality(volume, truth)
        clock.exclude_since(t0)
        return ReconstructResult(
            volume=volume.detach().float().cpu(), field=current_field, init=init, config=config,
            iterations=iterations, history=history, thresholds=tracker.summary(), final=final, wall_seconds=wall,
            eval_seconds=clock.excluded, init_seconds=init_seconds, timing=dict(clock.phases),
            n_gaussians=len(current_field), interrupted=state["interrupted"], stop_reason=state["stop_reason"])

    good = {"iteration": 0, "raw": _snapshot(field)}
    try:
        record = evaluate(0)
        if callback is not None:
            callback(Progress(0, config.iterations, None, len(field), record["seconds"], record, dict(clock.phases)))
        stop = should_stop(record)
        for iteration in range(1, config.iterations + 1) if stop is None else ():
            step = iteration - 1
            rates = learning_rates(step, config, extent)
            for group in optimizer.param_groups:
                group["lr"] = rates[group["name"]]
            if step < config.coarse_iterations:
                offset = ((step >> 2) & 1, (step >> 1) & 1, step & 1)
                if offset not in coarse:
                    sub = coarse_lattice(grid, offset)
                    coarse[offset] = (sub, Projector(geometry.with_volume(sub)))
                render_grid, projector = coarse[offset]
            else:
                render_grid, projector = grid, full_projector
            chosen = views.next() if views is not None else None
            if chosen is not None:
                projector = projector.subset(chosen)
                wanted = target[chosen.to(device)]
            else:
                wanted = target

            clock.begin_phase()
            volume = field.render(render_grid, config.k_sigma)
            clock.end_phase("render")
            predicted = projector(volume) / projection_scale
            clock.end_phase("project")
            loss = F.mse_loss(predicted, wanted) if config.loss == "mse" else F.l1_loss(predicted, wanted)
            if config.lambda_dssim > 0:
                loss = loss + config.lambda_dssim * (1.0 - projection_ssim(predicted, wanted))
            if config.lambda_tv > 0:
                loss = loss + config.lambda_tv * total_variation(volume)
            if regularizer is not None:
                loss = loss + regularizer(volume, iteration)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise _NonFinite(iteration, "loss")
            good = {"iteration": step, "raw": _snapshot(field)}
            loss.backward()
            if not all(bool(torch.isfinite(p.grad).all()) for p in field.raw_parameters().values()
                       if p.grad is not None):
                raise _NonFinite(iteration, "gradient")
            if controller is not None:
                controller.accumulate(field)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            clock.end_phase("backward")
            state["completed"] = iteration
            interval_losses.append(loss_value)

            # Evaluate and report before density control (as 3D-GS does), so that evaluations do not
            # land on the transient right after a split whenever eval_every is a multiple of densify_every.
            record = None
            if iteration % config.eval_every == 0 or iteration == config.iterations:
                record = evaluate(iteration)
            if callback is not None:
                callback(Progress(iteration, config.iterations, loss_value, len(field), clock.seconds(), record,
                                  dict(clock.phases)))
            if record is not None:
                stop = should_stop(record)
                if stop is not None:
                    break
            if controller is not None and iteration < config.iterations:
                clock.begin_phase()
                controller.step(field, optimizer, iteration)
                clock.end_phase("densify")
        if stop is not None:
            state["stop_reason"] = stop
    except KeyboardInterrupt:
        state["interrupted"], state["stop_reason"] = True, "interrupted"
        if not _consistent(field):  # interrupted inside density control: fall back to the last snapshot
            field, state["completed"] = _field_from(field, good["raw"]), good["iteration"]
    except _NonFinite as failure:
        state["stop_reason"] = f"non-finite {failure.what} at iteration {failure.iteration}"
        last_good = _field_from(field, good["raw"])
        raise NonFiniteLossError(failure.iteration, failure.what, result_from(last_good, good["iteration"])) from None
    if not history or history[-1]["iteration"] != state["completed"]:
        evaluate(state["completed"])
    return result_from(field, state["completed"])


class _NonFinite(Exception):
    def __init__(self, iteration: int, what: str):
        super().__init__(what)
        self.iteration, self.what = iteration, what
