"""The paper's Table 4 on CT volumes: simulate every case at every view count, reconstruct each scan with
every initialisation (3DGR-CT) and every classical method asked for, and compare the runs with the
convergence report (library; no printing).

    summary = run_benchmark(["ct.nii.gz"], views=(80, 120, 160), inits=("fbp", "medgmae", "medgmae-star"),
                            config=ReconstructConfig.from_dict({"iterations": 3000}), out="bench/",
                            methods=("3dgr", "os-sart", "cgls"))

``inits`` are initialisers by name ("fbp", "medgmae", ...) or themselves (e.g.
``priors.zero_shot.PriorInit(checkpoint, name="medgmae-star")``), each recorded under its
:func:`ctrecon.methods.gaussians.initializer_name`.

Output folder ``out``: ``scans/<case>_v<views>.npz`` (the simulated scans), ``runs/<case>_v<views>_<init>/``
(run folders as ``ctrecon reconstruct`` writes them; ``<case>_v<views>_<method>/`` for a classical method),
``report/`` (as ``ctrecon report`` writes it) and
``benchmark.json`` (settings, run folders, failures, the report's table).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

from ctrecon.core.errors import InputError

__all__ = ["BenchmarkEvent", "case_name", "classical_configs", "run_benchmark"]


@dataclasses.dataclass
class BenchmarkEvent:
    """What ``events`` receives: ``kind`` is "scan" (a case simulated at ``views``), "run_start",
    "iteration" (``progress``: a :class:`ctrecon.pipeline.reconstruct.Progress`), "run_end" (``result``) or
    "report" (``path``: the report folder)."""

    kind: str
    case: str = ""
    views: int = 0
    init: str = ""
    progress: object = None
    result: object = None
    path: str = ""


def case_name(path) -> str:
    """A file-system friendly case name from a volume path (``.../chest_ct.nii.gz`` → ``chest_ct``)."""
    name = Path(str(path).rstrip("/\\")).name
    for suffix in (".nii.gz", ".nii", ".npz", ".npy"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "case"


def classical_configs(methods: Sequence[str], config, iterations: Optional[int] = None) -> dict:
    """{method: ClassicalConfig} of the classical ``methods`` (a "3dgr" among them is skipped), evaluated at
    the thresholds of the 3DGR-CT ``config`` (so the report compares them); ``iterations``: each one's count
    (default: :data:`ctrecon.pipeline.classical.DEFAULT_ITERATIONS`)."""
    from ctrecon.pipeline.classical import METHODS, ClassicalConfig

    methods = list(methods)
    if not methods or len(set(methods)) != len(methods):
        raise InputError(f"methods must be distinct, got {methods}")
    unknown = [m for m in methods if m != "3dgr" and m not in METHODS]
    if unknown:
        raise InputError(f"unknown method(s) {', '.join(unknown)} (use 3dgr, {', '.join(METHODS)})")
    evaluation = {name: getattr(config.evaluation, name)
                  for name in ("psnr_threshold", "ssim_threshold", "ssim_threshold_metric")}
    return {m: ClassicalConfig.from_dict({"solver": m, "evaluation": evaluation,
                                          **({"iterations": iterations} if iterations and m != "fdk" else {})})
            for m in methods if m != "3dgr"}


def _checked(cases, views, inits) -> tuple:
    from ctrecon.methods.gaussians import get_initializer, initializer_name

    cases = [str(c) for c in cases]
    if not cases:
        raise InputError("give at least one case (a CT volume)")
    names = [case_name(c) for c in cases]
    if len(set(names)) != len(names):
        raise InputError(f"case names must differ (got {', '.join(names)}); rename or copy the volumes")
    views = tuple(int(v) for v in views)
    if not views or any(v < 1 for v in views) or len(set(views)) != len(views):
        raise InputError(f"views must be distinct positive integers, got {views}")
    labels = tuple(initializer_name(init) for init in inits)
    if not labels or len(set(labels)) != len(labels):
        raise InputError(f"inits must be distinct initialisers, got {labels}")
    for init in inits:
        get_initializer(init)  # InputError listing the known names
    return cases, names, views, dict(zip(labels, inits))


def run_benchmark(cases: Sequence, views: Sequence[int], inits: Sequence, config, out, *, device="cpu",
                  seed: int = 0, crop=None, shape=None, spacing=None, priors: Optional[dict] = None,
                  events: Optional[Callable[[BenchmarkEvent], None]] = None, methods: Sequence[str] = ("3dgr",),
                  classical: Optional[dict] = None) -> dict:
    """Run the benchmark (see the module docstring); returns the report's content (``build_report``)
    plus ``benchmark`` (what ``benchmark.json`` holds).

    cases: CT volume paths (HU; NIfTI, DICOM folder, .npy/.npz). config: a
    :class:`ctrecon.pipeline.reconstruct.ReconstructConfig` shared by every run. crop: (Z, Y, X) voxels, the
    centre of each case (cut first). shape / spacing: resample each case before simulating (as
    ``ctrecon simulate --shape/--spacing``). priors: init name → prior file
    (recorded in each run's config.json). Every scan of a case uses the same ``seed``; a run that
    stops on a non-finite loss keeps its last good state and is listed under ``failures``. methods: "3dgr"
    (every init) and classical methods (:data:`ctrecon.pipeline.classical.METHODS`), run on the same scans;
    classical: {method: ClassicalConfig} (default :func:`classical_configs`). Events of a classical run carry
    the method as ``init``.
    """
    from ctrecon.core.io import read_volume, save_scan, write_json
    from ctrecon.pipeline.classical import reconstruct_classical
    from ctrecon.pipeline.reconstruct import NonFiniteLossError
    from ctrecon.pipeline.reconstruct import reconstruct as run_reconstruct
    from ctrecon.pipeline.report import build_report
    from ctrecon.pipeline.runs import write_run
    from ctrecon.pipeline.simulate import simulate_scan

    cases, names, views, inits = _checked(cases, views, inits)
    config = config.validate()
    classical = {**classical_configs(methods, config), **(classical or {})}
    arms = [(init, initializer, False) for init, initializer in inits.items()] if "3dgr" in methods else []
    arms += [(method, classical[method], True) for method in methods if method != "3dgr"]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    sources = [read_volume(c) for c in cases]  # bad input fails before any work
    if crop is not None:
        sources = [source.centre_crop(crop) for source in sources]
    notify = events or (lambda event: None)
    run_dirs, failures = [], []
    for path, name, source in zip(cases, names, sources):
        for n_views in views:
            scan = simulate_scan(source.array, source.spacing, n_views, shape=shape, spacing_out=spacing, seed=seed,
                                 device=device, source=str(path), origin=source.origin)
            scan.meta["case"] = name
            scan_path = out / "scans" / f"{name}_v{n_views}.npz"
            scan_path.parent.mkdir(parents=True, exist_ok=True)
            save_scan(scan_path, scan)
            notify(BenchmarkEvent("scan", name, n_views, path=str(scan_path)))
            for label, arm, is_classical in arms:
                notify(BenchmarkEvent("run_start", name, n_views, label))
                callback = (lambda p, n=name, v=n_views, i=label: notify(BenchmarkEvent("iteration", n, v, i, p)))
                try:
                    if is_classical:
                        result = reconstruct_classical(scan, config=arm, device=device, seed=seed, callback=callback)
                    else:
                        result = run_reconstruct(scan, init=arm, config=config, device=device, seed=seed,
                                                 callback=callback)
                except NonFiniteLossError as err:
                    result = err.result
                    failures.append({"case": name, "views": n_views, "init": label, "error": str(err)})
                run_dir = out / "runs" / f"{name}_v{n_views}_{label}"
                write_run(str(run_dir), result, scan, scan_file=str(scan_path.resolve()), source=str(path), case=name,
                          seed=seed, device=device, prior=(priors or {}).get(label))
                run_dirs.append(str(run_dir))
                notify(BenchmarkEvent("run_end", name, n_views, label, result=result, path=str(run_dir)))
    report_dir = out / "report"
    summary = build_report(run_dirs, str(report_dir))
    notify(BenchmarkEvent("report", path=str(report_dir)))
    benchmark = {"cases": cases, "case_names": names, "views": list(views), "inits": list(inits),
                 "methods": list(methods), "config": config.to_dict(),
                 "classical": {m: c.to_dict() for m, c in classical.items() if m in methods}, "device": str(device), "seed": seed,
                 "crop": crop, "shape": shape, "spacing": spacing,
                 "priors": priors or {}, "runs": run_dirs, "failures": failures, "report": str(report_dir),
                 "table": summary["markdown_table"]}
    write_json(out / "benchmark.json", benchmark)
    return {**summary, "benchmark": benchmark}
