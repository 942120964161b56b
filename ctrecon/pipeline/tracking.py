"""What every reconstruction run records, whatever the method (3DGR-CT's Trainer, the classical solvers):
the optimisation clock with evaluation excluded, the quality history against the ground truth, the first
crossing of each quality threshold, and the stops at a target.

    monitor = RunMonitor(truth, config.evaluation, device)
    record = monitor.evaluate(iteration, lambda: current_volume)   # appended to monitor.history
    monitor.target_reached(record, config.stopping)                # "psnr target", "thresholds reached" or None
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch

from ctrecon.pipeline.metrics import QUALITY_METRICS, ConvergenceTracker, evaluate, quality_thresholds

__all__ = ["Clock", "RunMonitor", "quality", "TIMING_PHASES"]

#: The phases of a 3DGR-CT step timed separately (a classical solver's step is one phase, "solve").
TIMING_PHASES = ("render", "project", "backward", "densify", "validate")


class Clock:
    """Optimisation wall clock with evaluation excluded, and the per-phase split (``phases``)."""

    def __init__(self, device: torch.device, sync_phases: bool = False, phases=TIMING_PHASES):
        self.cuda = device.type == "cuda"
        self.sync_phases = sync_phases and self.cuda
        self.start = time.perf_counter()
        self.excluded = 0.0
        self.phases = dict.fromkeys(phases, 0.0)
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


def quality(volume: torch.Tensor, truth: Optional[torch.Tensor]) -> dict:
    """:data:`ctrecon.pipeline.metrics.QUALITY_METRICS` of ``volume`` against ``truth`` (all None without one)."""
    if truth is None:
        return dict.fromkeys(QUALITY_METRICS)
    return evaluate(volume, truth, data_range=1.0)


class RunMonitor:
    """The clock, history and threshold tracker of one run.

    truth: the ground truth ``[Z, Y, X]`` (numpy or tensor, unit attenuation) or None. evaluation: the
    run's EvaluationSettings (thresholds and their SSIM metric). ``record_loss`` collects the losses
    averaged into the next history record.
    """

    def __init__(self, truth, evaluation, device: torch.device, phases=TIMING_PHASES):
        self.truth = None if truth is None else torch.as_tensor(np.asarray(truth, dtype=np.float32), device=device)
        self.clock = Clock(device, getattr(evaluation, "time_phases", False), phases)
        self.tracker = ConvergenceTracker(quality_thresholds(evaluation.psnr_threshold, evaluation.ssim_threshold,
                                                             evaluation.ssim_threshold_metric))
        self.history: list = []
        self.interval_losses: list = []

    def record_loss(self, value: float) -> None:
        self.interval_losses.append(float(value))

    def evaluate(self, iteration: int, volume: Callable[[], torch.Tensor], **extra) -> dict:
        """Append the history record of ``volume()`` (called with evaluation time excluded from the clock):
        quality, mean loss since the last record, and ``extra`` (e.g. n_gaussians)."""
        seconds = self.clock.seconds()
        t0 = time.perf_counter()
        with torch.no_grad():
            measured = quality(volume(), self.truth)
        record = {"iteration": iteration, "seconds": seconds,
                  "loss": float(np.mean(self.interval_losses)) if self.interval_losses else None,
                  **measured, **extra}
        self.interval_losses.clear()
        self.history.append(record)
        if self.truth is not None:
            self.tracker.update(iteration, seconds, **measured)
        self.clock.exclude_since(t0)
        return record

    def target_reached(self, record: Optional[dict], stopping) -> Optional[str]:
        """Why to stop at an evaluation ``record`` by the ground-truth targets of ``stopping`` (None: go on)."""
        if record is None or record["psnr"] is None:
            return None
        if stopping.stop_at_psnr is not None and record["psnr"] >= stopping.stop_at_psnr:
            return "psnr target"
        if stopping.stop_at_thresholds and self.tracker.all_reached:
            return "thresholds reached"
        return None

    def final_quality(self, volume: torch.Tensor, iterations: int, evaluated: bool) -> Optional[dict]:
        """Quality of the returned ``volume`` after ``iterations``: the last record's when ``evaluated`` says that
        record is of this very state, else measured now (time excluded); None without a ground truth."""
        if self.truth is None:
            return None
        if evaluated and self.history and self.history[-1]["iteration"] == iterations:
            return {key: self.history[-1][key] for key in QUALITY_METRICS}
        t0 = time.perf_counter()
        measured = quality(volume, self.truth)
        self.clock.exclude_since(t0)
        return measured
