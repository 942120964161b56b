"""Run folders: the one module that writes them (``ctrecon reconstruct``, every run of ``ctrecon benchmark``
and ``ctrecon demo``) and reads them (``ctrecon report``, the demo's summary).

    write_run("run/", result, scan, scan_file="scan.npz", source=..., case="chest", seed=0, device="cpu")
    run = load_run("run/")      # RunRecord: .init, .views, .case, .metrics; run.volume()

A run folder is written as a whole (:func:`ctrecon.core.io.atomic_folder`: into a temporary folder beside it,
renamed into place at the end, so a failure leaves an earlier run there intact, never a mix of the two; an
existing folder is replaced only when it holds nothing but run files, :func:`check_run_folder`). It holds,
written in this order:

- ``volume.nii.gz`` (:data:`VOLUME_FILE`): the reconstruction in unit attenuation (like ``ctrecon fdk``),
  in the source volume's patient frame when the simulation recorded it, else in the scan's frame;
- ``gaussians.npz`` (:data:`GAUSSIANS_FILE`): the final Gaussian field (world mm); not for a classical
  method (sart, cgls, ...), which has none;
- ``config.json`` (:data:`CONFIG_FILE`): init, scan file, source, case, units, views, seed, device,
  init_gaussians, prior, geometry (without angles) and ``config``, the ReconstructConfig settings
  (``--config`` accepts this file);
- ``curves.png`` (:data:`CURVES_FILE`): loss, PSNR and SSIM against iteration and seconds;
- ``metrics.json`` (:data:`METRICS_FILE`), last: ``ReconstructResult.to_metrics()`` plus views and case.
"""
from __future__ import annotations

import dataclasses
import json
import os

from ctrecon.core.errors import InputError

__all__ = ["VOLUME_FILE", "GAUSSIANS_FILE", "CONFIG_FILE", "CURVES_FILE", "METRICS_FILE", "RUN_FILES", "UNITS",
           "RunRecord", "write_run", "load_run", "check_run_folder"]

VOLUME_FILE = "volume.nii.gz"
GAUSSIANS_FILE = "gaussians.npz"
CONFIG_FILE = "config.json"
CURVES_FILE = "curves.png"
METRICS_FILE = "metrics.json"
#: The files of a run folder in the order they are written.
RUN_FILES = (VOLUME_FILE, GAUSSIANS_FILE, CONFIG_FILE, CURVES_FILE, METRICS_FILE)
#: The intensity scale of the volume, recorded in config.json.
UNITS = "unit attenuation (HU + 1024) / 4095"


def check_run_folder(out) -> None:
    """InputError, before any work, when ``out`` cannot become a run folder (see the module docstring)."""
    from ctrecon.core.io import writable_folder

    writable_folder(out, RUN_FILES)


def write_run(out, result, scan, **record) -> None:
    """Write the run folder ``out`` of ``result`` (a ReconstructResult) on ``scan`` as a whole (see the module
    docstring); ``record``: the keywords of :func:`_write_run_files`."""
    from ctrecon.core.io import atomic_folder

    with atomic_folder(out, RUN_FILES) as folder:
        _write_run_files(str(folder), result, scan, **record)


def _write_run_files(out, result, scan, *, scan_file: str, source, case: str, seed: int, device,
                     prior=None, init_gaussians=None) -> None:
    """The files of the run folder ``out``. scan_file, source, case, seed, device, prior (the prior file of a
    prior initialisation) and init_gaussians (the Gaussian file it started from) are recorded in config.json;
    case also in metrics.json."""
    from ctrecon.core.io import save_volume, write_json
    from ctrecon.pipeline.plots import plot_run_curves

    grid = scan.geometry.volume
    origin = scan.meta.get("origin")  # the source volume's patient frame, when the simulation recorded it
    if not (isinstance(origin, (list, tuple)) and len(origin) == 3):
        origin = tuple(grid.voxel_centres()[0, 0, 0])  # (x, y, z) of voxel [0, 0, 0] in the scan's frame
    save_volume(os.path.join(out, VOLUME_FILE), result.volume.numpy(), grid.dVoxel, origin)
    if result.field is not None:
        result.field.save(os.path.join(out, GAUSSIANS_FILE))
    views = scan.geometry.n_angles
    write_json(os.path.join(out, CONFIG_FILE),
               {"init": result.init, "scan": scan_file, "source": source, "case": case, "units": UNITS,
                "views": views, "seed": seed, "device": str(device), "init_gaussians": init_gaussians,
                "prior": prior, "geometry": scan.geometry.to_dict(include_angles=False),
                "config": result.config.to_dict()})
    metrics = {**result.to_metrics(), "views": views, "case": case}
    plot_run_curves(metrics, os.path.join(out, CURVES_FILE))
    write_json(os.path.join(out, METRICS_FILE), metrics)


@dataclasses.dataclass
class RunRecord:
    """One reconstruction run: where it lives, what it compared, and its metrics.json content."""

    path: str
    init: str
    views: int | None
    case: str
    metrics: dict
    method: str = "3dgr"

    @property
    def arm(self) -> str:
        """What the run compares: its initialisation for 3DGR-CT ("fbp", "medgmae"), else its method
        ("sart"), with a start other than zeros named ("sart from fdk")."""
        if self.method == "3dgr":
            return self.init
        return self.method if self.init in ("zeros", "none") else f"{self.method} from {self.init}"

    def threshold(self, key: str, field: str):
        """``iteration`` or ``seconds`` at which threshold ``key`` was first reached, or None."""
        entry = (self.metrics.get("thresholds") or {}).get(key)
        return None if entry is None else entry.get(field)

    def final(self, name: str):
        return (self.metrics.get("final") or {}).get(name)

    def volume(self):
        """The reconstructed volume ``[Z, Y, X]`` (float32, unit attenuation)."""
        from ctrecon.core.io import read_volume

        return read_volume(os.path.join(self.path, VOLUME_FILE)).array


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read {what} {path}: {err}") from None
    if not isinstance(data, dict):
        raise InputError(f"{what} {path} is not a JSON object")
    return data


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_metrics(metrics: dict, where: str) -> None:
    """InputError naming the first field of a metrics.json that a report could not use."""
    if not _number(metrics["iterations"]) or metrics["iterations"] < 0:
        raise InputError(f"{where}: iterations must be a number >= 0, got {metrics['iterations']!r}")
    history = metrics["history"]
    if not isinstance(history, list) or not all(isinstance(h, dict) and _number(h.get("iteration"))
                                                and _number(h.get("seconds")) for h in history):
        raise InputError(f"{where}: history must be a list of records with a number 'iteration' and 'seconds'")
    for key in ("final", "thresholds"):
        if metrics.get(key) is not None and not isinstance(metrics[key], dict):
            raise InputError(f"{where}: {key} must be an object or null, got {metrics[key]!r}")
    for name, entry in (metrics.get("thresholds") or {}).items():
        if entry is not None and not (isinstance(entry, dict) and _number(entry.get("iteration"))):
            raise InputError(f"{where}: thresholds.{name} must be null or hold a number 'iteration'")
    for key in ("wall_seconds", "psnr_threshold", "ssim_threshold"):
        if metrics.get(key) is not None and not _number(metrics[key]):
            raise InputError(f"{where}: {key} must be a number, got {metrics[key]!r}")


def load_run(run_dir: str) -> RunRecord:
    """Read ``RUN/metrics.json`` (required) and ``RUN/config.json`` (optional, for views and case)."""
    if not os.path.isdir(run_dir):
        raise InputError(f"run folder not found: {run_dir}")
    metrics = _read_json(os.path.join(run_dir, METRICS_FILE), "metrics file")
    for key in ("init", "iterations", "history"):
        if key not in metrics:
            raise InputError(f"{run_dir}/{METRICS_FILE} lacks the key {key!r}")
    _check_metrics(metrics, f"{run_dir}/{METRICS_FILE}")
    config_path = os.path.join(run_dir, CONFIG_FILE)
    config = _read_json(config_path, "config file") if os.path.exists(config_path) else {}
    views = metrics.get("views", config.get("views"))
    case = metrics.get("case", config.get("case")) or os.path.basename(os.path.normpath(run_dir))
    return RunRecord(path=run_dir, init=str(metrics["init"]), views=None if views is None else int(views),
                     case=str(case), metrics=metrics, method=str(metrics.get("method", "3dgr")))
