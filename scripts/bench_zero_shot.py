#!/usr/bin/env python3
"""Zero-shot quality of priors against the FDK they start from: PSNR of each prior's stitched field.

For every case (resampled to ``--spacing``, centre-cropped to ``--crop``, as scripts/bench_convergence.py
makes them) and view count, a noiseless (or ``--dose``) scan, its FDK, and for each ``--prior NAME=PATH``
(``NAME`` is the initialiser: medgmae or medgmae-star; PATH a prior.pt, or "shipped") the stitched zero-shot
field rendered on the grid, at the reconstruction defaults (overlap, Gaussian cap of the preconditioned method).

    python scripts/bench_zero_shot.py --case lung1=../shared/data/ct/chest_pyradiomics_lung1.nii.gz --spacing 3 \\
        --prior medgmae-star=shipped --prior medgmae-star=/tmp/fdk/medgmae-star/prior.pt --views 80,120,160
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convergence import DEFAULT_CASE, make_scan  # noqa: E402  (puts the checkout on sys.path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", default=None, metavar="NAME=PATH")
    parser.add_argument("--spacing", type=float, default=None)
    parser.add_argument("--crop", default="48,96,96")
    parser.add_argument("--views", default="120", help="comma-separated view counts")
    parser.add_argument("--dose", type=float, default=None)
    parser.add_argument("--prior", action="append", required=True, metavar="INIT=PATH",
                        help="an initialiser and its prior file ('shipped': the shipped one); repeatable")
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from ctrecon.operators.fdk import fdk
    from ctrecon.pipeline.metrics import psnr
    from ctrecon.pipeline.reconstruct import ReconstructConfig
    from priors.zero_shot import PriorInit

    crop = tuple(int(v) for v in args.crop.split(","))
    budget_config = ReconstructConfig.from_dict({"method": "preconditioned"})
    rows = []
    for case in args.case or [DEFAULT_CASE]:
        name, path = case.split("=", 1)
        for views in (int(v) for v in args.views.split(",")):
            scan = make_scan(path, args.spacing, crop, views, args.dose, 0)
            truth = torch.as_tensor(scan.ground_truth)
            volume = fdk(scan.projections, scan.geometry)
            row = {"case": name, "views": views, "fdk_psnr": psnr(volume, truth), "priors": {}}
            budget = budget_config.gaussian_budget(math.prod(scan.geometry.nVoxel))
            for spec in args.prior:
                init, prior = spec.split("=", 1)
                initializer = PriorInit(None if prior == "shipped" else prior, name=init)
                field = initializer(volume, scan.geometry.volume, budget)
                with torch.no_grad():
                    rendered = field.render(scan.geometry.volume)
                row["priors"][spec] = {"psnr": psnr(rendered, truth), "gaussians": len(field)}
            rows.append(row)
            cells = "; ".join(f"{spec}: {v['psnr']:.2f} dB ({v['gaussians']} Gaussians)" for spec, v in row["priors"].items())
            print(f"{name} {views} views: FDK {row['fdk_psnr']:.2f} dB; {cells}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
