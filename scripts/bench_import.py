#!/usr/bin/env python3
"""Round trip of a measured scan through ``ctrecon import``: simulate → intensities → files → import → FDK
and 3DGR-CT, against the same reconstructions of the simulated scan itself.

The case (as scripts/bench_convergence.py makes it): a real CT resampled to ``--spacing`` mm and
centre-cropped to ``--crop``, a noiseless ``--views``-view scan. Its line integrals p become what a
scanner records: counts ``Poisson(I0·exp(-κ p)) + dark`` (κ = μ_water·4095/1024, the model of
``simulate --dose``), written as 16-bit TIFF files, one per view, with a flat field (``Poisson(I0) +
dark``) and a dark field, and the geometry as an RTK geometry XML. The ``ctrecon import`` command reads
them back (on the original grid). Reported: the imported line integrals against p, and FDK and 3DGR-CT
(``--init``, the preconditioned default, ``--iters`` iterations) of both scans, as PSNR against the
ground truth and of the imported reconstruction against the original one.

    python scripts/bench_import.py --case ../shared/data/ct/chest_pyradiomics_lung1.nii.gz --out out/import
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_convergence import SHARED_CT, make_scan  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default=str(SHARED_CT / "chest_pyradiomics_lung1.nii.gz"),
                        help="a CT volume [default: the development lung1 CT]")
    parser.add_argument("--spacing", type=float, default=3.0)
    parser.add_argument("--crop", default="48,96,96", help="centre crop Z,Y,X (voxels)")
    parser.add_argument("--views", type=int, default=120)
    parser.add_argument("--i0", type=float, default=5e4,
                        help="photons per pixel of the written intensities (16-bit: at most ~65 000 with the dark)")
    parser.add_argument("--dark", type=float, default=100.0, help="dark-field counts")
    parser.add_argument("--init", default="fbp")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


def write_measured(scan, folder: Path, i0: float, dark: float, seed: int) -> None:
    """The scanner's files of ``scan``: 16-bit TIFF counts per view, flat.tif, dark.tif, geometry.xml."""
    import numpy as np
    from PIL import Image

    from ctrecon.core.geometry_files import rtk_parameters, write_rtk_geometry
    from ctrecon.core.units import attenuation_scale

    kappa = attenuation_scale()
    rng = np.random.default_rng(seed)
    counts = rng.poisson(i0 * np.exp(-kappa * scan.projections.astype(np.float64))) + dark
    if counts.max() > 65535:
        raise SystemExit(f"I0 {i0:g} + dark overflows 16-bit counts; lower --i0")
    (folder / "projections").mkdir(parents=True)
    for view, image in enumerate(counts):
        Image.fromarray(image.astype(np.uint16)).save(folder / "projections" / f"view_{view:04d}.tif")
    detector = scan.geometry.nDetector
    Image.fromarray((rng.poisson(i0, detector) + dark).astype(np.uint16)).save(folder / "flat.tif")
    Image.fromarray(np.full(detector, dark, dtype=np.uint16)).save(folder / "dark.tif")
    write_rtk_geometry(folder / "geometry.xml", rtk_parameters(scan.geometry))


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    from ctrecon.core.io import load_scan
    from ctrecon.operators.fdk import fdk
    from ctrecon.pipeline.metrics import psnr, ssim_slice
    from ctrecon.pipeline.reconstruct import ReconstructConfig, reconstruct

    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; give a new --out")
    crop = tuple(int(v) for v in args.crop.split(","))
    scan = make_scan(args.case, args.spacing, crop, args.views, None, args.seed)
    write_measured(scan, out / "measured", args.i0, args.dark, args.seed)
    geometry = scan.geometry
    command = [sys.executable, "-m", "ctrecon.cli", "import", str(out / "measured" / "projections"),
               "--flat", str(out / "measured" / "flat.tif"), "--dark", str(out / "measured" / "dark.tif"),
               "--geometry", str(out / "measured" / "geometry.xml"),
               "--pixel-size", f"{geometry.dDetector[0]!r},{geometry.dDetector[1]!r}",
               "--volume-shape", ",".join(map(str, geometry.nVoxel)),
               "--voxel-size", ",".join(repr(v) for v in geometry.dVoxel), "--out", str(out / "imported.npz")]
    started = time.perf_counter()
    printed = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if printed.returncode != 0:
        raise SystemExit(printed.stderr)
    import_seconds = time.perf_counter() - started
    imported = load_scan(out / "imported.npz")
    truth = torch.as_tensor(scan.ground_truth)
    error = imported.projections - scan.projections
    results = {"args": vars(args), "import_command": " ".join(command), "import_output": printed.stdout,
               "import_seconds": import_seconds,
               "line_integrals": {"mean_error": float(error.mean()), "rms_error": float(np.sqrt((error ** 2).mean())),
                                  "rms_of_p": float(np.sqrt((scan.projections ** 2).mean()))}}
    config = ReconstructConfig.from_dict({"method": "preconditioned", "iterations": args.iters, "eval_every": args.iters})
    volumes = {}
    for name, source in (("original", scan), ("imported", imported)):
        volumes[f"fdk {name}"] = fdk(source.projections, source.geometry)
        run = reconstruct(source, init=args.init, config=config, device="cpu", seed=args.seed)
        volumes[f"3dgr {name}"] = run.volume
    results["psnr_vs_truth"] = {name: psnr(volume, truth) for name, volume in volumes.items()}
    results["ssim_slice_vs_truth"] = {name: ssim_slice(volume, truth) for name, volume in volumes.items()}
    results["psnr_imported_vs_original"] = {
        kind: psnr(volumes[f"{kind} imported"], volumes[f"{kind} original"]) for kind in ("fdk", "3dgr")}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(printed.stdout, end="")
    print(f"line integrals: mean error {results['line_integrals']['mean_error']:.2e}, rms error "
          f"{results['line_integrals']['rms_error']:.3g} (rms of p {results['line_integrals']['rms_of_p']:.3g})")
    for name in volumes:
        print(f"{name:14s} PSNR {results['psnr_vs_truth'][name]:.2f} dB, slice SSIM "
              f"{results['ssim_slice_vs_truth'][name]:.4f} against the ground truth")
    for kind, value in results["psnr_imported_vs_original"].items():
        print(f"{kind}: imported against original reconstruction PSNR {value:.2f} dB")
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
