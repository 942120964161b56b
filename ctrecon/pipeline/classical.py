"""Classical iterative reconstruction as a run: SART, OS-SART, CGLS, FISTA-TV (and FDK alone), on the same
projector, evaluation, thresholds and run folder as 3DGR-CT (library; no printing).

    config = ClassicalConfig.from_dict({"solver": "os-sart", "iterations": 30})
    result = reconstruct_classical(scan, config=config, device="cpu", seed=0)
    result.to_metrics()    # the metrics.json schema of a 3DGR-CT run, with "method": "os-sart"

One iteration is one ``step()`` of the solver (:mod:`ctrecon.methods.classical`): a pass over all views
for SART / OS-SART, one CG step for CGLS, one MFISTA step for FISTA-TV; "fdk" makes none (the FDK itself,
evaluated once). The solver starts from zeros or from the FDK (``start``; the FDK's time is then the
run's ``init_seconds``, as for 3DGR-CT). Its set-up (SART's weights, FISTA's Lipschitz estimate) counts
as optimisation time. Evaluation (every ``eval_every`` iterations, default every one), thresholds and the
ground-truth stops are those of 3DGR-CT (:class:`ctrecon.pipeline.tracking.RunMonitor`). A non-finite
loss stops the run with :class:`ctrecon.pipeline.reconstruct.NonFiniteLossError` carrying the last finite
state; Ctrl-C (KeyboardInterrupt, also from the callback) returns the last completed iteration.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional

import numpy as np
import torch

from ctrecon.core.errors import InputError
from ctrecon.core.limits import check_grid_memory
from ctrecon.methods.classical import DEFAULT_TV_WEIGHT
from ctrecon.pipeline.reconstruct import (EvaluationSettings, NonFiniteLossError, Progress, ReconstructResult,
                                          StoppingSettings, finite_number, validate_evaluation)
from ctrecon.pipeline.tracking import RunMonitor

__all__ = ["METHODS", "SOLVER_OPTIONS", "DEFAULT_ITERATIONS", "SolverSettings", "ClassicalConfig",
           "classical_method", "reconstruct_classical"]

#: The classical methods; "fdk" is the filtered backprojection alone (no iterations).
METHODS = ("sart", "os-sart", "cgls", "fista-tv", "fdk")
#: The settings of :class:`SolverSettings` that each method takes (the others must keep their defaults).
SOLVER_OPTIONS = {"sart": ("relaxation", "relaxation_decay", "nonnegative", "order"),
                  "os-sart": ("subsets", "relaxation", "relaxation_decay", "nonnegative", "order"),
                  "cgls": (), "fista-tv": ("tv_weight", "tv_iterations", "nonnegative"), "fdk": ()}
#: The methods that draw random numbers (SART's block order, FISTA's power-iteration start) from the run's seed.
_SEEDED = ("sart", "os-sart", "fista-tv")
#: Iterations when none are given, chosen on the development lung1 CT (48×96×96 at 3 mm, 120 views, noiseless and
#: at dose 1e5; data/README.md): about where each one peaks on the noisy scan (SART and CGLS then fit the noise).
DEFAULT_ITERATIONS = {"sart": 10, "os-sart": 50, "cgls": 40, "fista-tv": 100, "fdk": 0}
STARTS = ("zeros", "fdk")


@dataclasses.dataclass
class SolverSettings:
    """The method and its settings (see :mod:`ctrecon.methods.classical` for what each one does)."""

    name: str = "sart"
    iterations: Optional[int] = None      # None: DEFAULT_ITERATIONS[name]
    start: str = "zeros"                  # "zeros" or "fdk"
    subsets: Optional[int] = None         # os-sart: view blocks (None: the solver's default)
    relaxation: float = 1.0
    relaxation_decay: float = 0.99        # relaxation × this after every pass
    nonnegative: bool = True
    order: str = "golden"                 # sart / os-sart block order: "golden" or "random" (seeded)
    tv_weight: float = DEFAULT_TV_WEIGHT
    tv_iterations: int = 20


@dataclasses.dataclass
class ClassicalConfig:
    """Settings of :func:`reconstruct_classical`: ``solver``, ``evaluation`` (every iteration by default) and
    ``stopping`` (only the ground-truth targets ``stop_at_psnr`` / ``stop_at_thresholds`` apply)."""

    solver: SolverSettings = dataclasses.field(default_factory=SolverSettings)
    evaluation: EvaluationSettings = dataclasses.field(default_factory=lambda: EvaluationSettings(eval_every=1))
    stopping: StoppingSettings = dataclasses.field(default_factory=StoppingSettings)

    @property
    def iteration_cap(self) -> int:
        return DEFAULT_ITERATIONS[self.solver.name] if self.solver.iterations is None else self.solver.iterations

    def solver_options(self) -> dict:
        """The keyword settings of this method's solver (``subsets`` left out when None)."""
        options = {name: getattr(self.solver, name) for name in SOLVER_OPTIONS[self.solver.name]}
        return {k: v for k, v in options.items() if v is not None}

    def validate(self) -> "ClassicalConfig":
        """InputError naming the first bad field (the solvers check their own ranges when built)."""
        solver = self.solver
        if solver.name not in METHODS:
            raise InputError(f"unknown method {solver.name!r} (use 3dgr or {', '.join(METHODS)})")
        defaults = SolverSettings()
        for name in ("subsets", "relaxation", "relaxation_decay", "nonnegative", "order", "tv_weight",
                     "tv_iterations"):
            if name not in SOLVER_OPTIONS[solver.name] and getattr(solver, name) != getattr(defaults, name):
                raise InputError(f"{name} does not apply to {solver.name} (it takes "
                                 f"{', '.join(SOLVER_OPTIONS[solver.name]) or 'no settings'})")
        for name in ("relaxation", "relaxation_decay", "tv_weight"):
            if not finite_number(getattr(solver, name)):
                raise InputError(f"{name} must be a finite number, got {getattr(solver, name)!r}")
        for name in ("subsets", "tv_iterations"):
            value = getattr(solver, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                raise InputError(f"{name} must be an integer, got {value!r}")
        if not isinstance(solver.nonnegative, bool):
            raise InputError(f"nonnegative must be true or false, got {solver.nonnegative!r}")
        iterations = solver.iterations
        if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer))
                                       or iterations < (0 if solver.name == "fdk" else 1)):
            raise InputError(f"iterations must be a positive integer, got {iterations!r}")
        if solver.name == "fdk" and iterations:
            raise InputError("fdk makes no iterations")
        if solver.start not in STARTS:
            raise InputError(f"start must be {' or '.join(STARTS)}, got {solver.start!r}")
        if solver.name == "fdk" and solver.start != "zeros":
            raise InputError("fdk has no start")
        validate_evaluation(self.evaluation, self.stopping)
        return self

    def to_dict(self) -> dict:
        """``{section: {setting: value}}`` (a run's config.json ``config``; :meth:`from_dict` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ClassicalConfig":
        """From the sections of :meth:`to_dict` or flat setting names (``{"solver": "cgls", "iterations": 30}``:
        a string ``solver`` is the method's name); unknown names are an InputError. Validated."""
        if not isinstance(data, dict):
            raise InputError(f"reconstruction settings must be an object of settings, got {data!r}")
        kinds = {"solver": SolverSettings, "evaluation": EvaluationSettings, "stopping": StoppingSettings}
        fields = {section: {f.name for f in dataclasses.fields(kind)} for section, kind in kinds.items()}
        values = {section: {} for section in kinds}
        for key, value in data.items():
            if key == "solver" and isinstance(value, str):
                values["solver"]["name"] = value
            elif key in kinds and isinstance(value, dict):
                unknown = set(value) - fields[key]
                if unknown:
                    raise InputError(f"unknown {key} setting(s): {', '.join(sorted(unknown))}")
                values[key].update(value)
            else:
                section = next((s for s, names in fields.items() if key in names), None)
                if section is None:
                    raise InputError(f"unknown classical reconstruction setting {key!r}")
                values[section][key] = value
        evaluation = {"eval_every": 1, **values["evaluation"]}
        return cls(SolverSettings(**values["solver"]), EvaluationSettings(**evaluation),
                   StoppingSettings(**values["stopping"])).validate()


def classical_method(settings: dict):
    """The classical method that settings in a form :meth:`ClassicalConfig.from_dict` reads name (``"solver"``: a
    method's name, or a section with its ``name``), or None when they name none (e.g. 3DGR-CT's settings)."""
    solver = settings.get("solver")
    if isinstance(solver, dict):
        solver = solver.get("name")
    return solver if isinstance(solver, str) else None


def reconstruct_classical(scan, *, config: ClassicalConfig | None = None, device="cpu", seed: int = 0,
                          callback: Callable[[Progress], None] | None = None) -> ReconstructResult:
    """Run the classical method of ``config`` on ``scan`` (see the module docstring); the result has
    ``field=None`` and ``n_gaussians=None``. Raises InputError on bad settings (before any work) and
    NonFiniteLossError (with the last finite state) when the solver diverges."""
    from ctrecon.methods.classical import make_solver
    from ctrecon.operators.fdk import fdk
    from ctrecon.operators.projector import Projector

    config = (config or ClassicalConfig()).validate()
    device = torch.device(device)
    method, iterations = config.solver.name, config.iteration_cap
    if method != "fdk":  # fdk() makes its own estimate
        check_grid_memory(scan.geometry.nVoxel, 6, method)
    projections = torch.as_tensor(np.asarray(scan.projections, dtype=np.float32), device=device)
    projector = Projector(scan.geometry)
    start, init_seconds = None, 0.0
    if method == "fdk" or config.solver.start == "fdk":
        t0 = time.perf_counter()
        start = fdk(projections, scan.geometry, device=device).float()
        init_seconds = time.perf_counter() - t0
    monitor = RunMonitor(scan.ground_truth, config.evaluation, device, phases=("solve",))
    seeded = {"seed": seed} if method in _SEEDED else {}
    solver = None if method == "fdk" else make_solver(method, projector, projections, start, **seeded,
                                                     **config.solver_options())
    current = (lambda: start) if solver is None else (lambda: solver.x)
    good, completed, stop, interrupted = current().clone(), 0, None, False

    def report(iteration, loss, record):
        if callback is not None:
            callback(Progress(iteration, iterations, loss, 0, monitor.clock.seconds(), record,
                              dict(monitor.clock.phases)))

    try:
        record = monitor.evaluate(0, current)
        report(0, None, record)
        stop = monitor.target_reached(record, config.stopping)
        for iteration in range(1, iterations + 1) if stop is None else ():
            monitor.clock.begin_phase()
            loss = float(solver.step())
            monitor.clock.end_phase("solve")
            if not math.isfinite(loss) or not bool(torch.isfinite(solver.x).all()):
                raise NonFiniteLossError(iteration, "loss", _result(
                    good, config, monitor, completed, f"non-finite loss at iteration {iteration}", init_seconds,
                    False))
            good, completed = solver.x.clone(), iteration
            monitor.record_loss(loss)
            due = iteration % config.evaluation.eval_every == 0 or iteration == iterations
            record = monitor.evaluate(iteration, current) if due else None
            report(iteration, loss, record)
            stop = monitor.target_reached(record, config.stopping)
            if stop is not None:
                break
    except KeyboardInterrupt:
        stop, interrupted = "interrupted", True
    if not monitor.history or monitor.history[-1]["iteration"] != completed:
        monitor.evaluate(completed, lambda: good)
    return _result(good, config, monitor, completed, stop or "completed", init_seconds, interrupted)


def _result(volume, config: ClassicalConfig, monitor: RunMonitor, iterations: int, stop_reason: str,
            init_seconds: float, interrupted: bool) -> ReconstructResult:
    wall = monitor.clock.seconds()
    final = monitor.final_quality(volume, iterations, evaluated=True)
    return ReconstructResult(
        volume=volume.detach().float().cpu(), field=None, init="none" if config.solver.name == "fdk" else
        config.solver.start, config=config, iterations=iterations, history=monitor.history,
        thresholds=monitor.tracker.summary(), final=final, wall_seconds=wall, eval_seconds=monitor.clock.excluded,
        init_seconds=init_seconds, timing=dict(monitor.clock.phases), n_gaussians=None, interrupted=interrupted,
        stop_reason=stop_reason, method=config.solver.name)
