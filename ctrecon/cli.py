"""Command-line interface: a thin click layer over the library.

Every command: ``--help`` with an example, ``--device auto|cpu|cuda``, ``--seed``; bad input prints
one line ``ctrecon: error: ...`` on stderr and exits 2 with no traceback and no partial output; an
unexpected error (a bug) exits 1 with one line naming the exception. Set ``CTRECON_DEBUG=1`` to see
its traceback.
"""
from __future__ import annotations

import errno
import functools
import json
import os
import signal
import sys
import threading

import click

from ctrecon.core.errors import InputError
from priors.defaults import FIELD_OVERLAP, INIT_OVERLAP

EXIT_BAD_INPUT = 2


def _fail(message: str, code: int = EXIT_BAD_INPUT):
    click.echo(f"ctrecon: error: {message}", err=True)
    sys.exit(code)


def common_options(func):
    """``--device`` and ``--seed`` for every command."""

    @click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
                  help="Where to compute.")
    @click.option("--seed", default=0, show_default=True, type=int, help="Random seed.")
    @functools.wraps(func)
    def wrapper(*args, device, seed, **kwargs):
        import torch

        from ctrecon.operators._backend import resolve_device

        torch.manual_seed(seed)
        return func(*args, device=resolve_device(device), seed=seed, **kwargs)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="ctrecon")
def cli():
    """ctrecon: sparse-view cone-beam CT reconstruction with pretrained Gaussian priors.

    \b
    Example:
      ctrecon demo                                   # the whole pipeline on the shipped CT
      ctrecon simulate data/sample_abdomen_small.nii.gz --views 120 --out scan.npz
      ctrecon fdk scan.npz --out fdk.nii.gz
    """


class _Iterations(click.ParamType):
    """``--iters``: a number of iterations, or ``auto`` (until the data residual stops improving); the
    settings' validation refuses anything else with one line."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        try:
            return int(value)
        except ValueError:
            return value


ITERATIONS = _Iterations()


def _parse_numbers(text: str, option: str, *, count: int, kind: type, allow_single: bool = False) -> tuple:
    """``"64,128,128"`` → a tuple of ``count`` positive numbers (or one, when ``allow_single``)."""
    what = f"{count} positive {'integers' if kind is int else 'numbers'} separated by commas"
    try:
        values = tuple(kind(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise InputError(f"{option} must be {what}, got {text!r}") from None
    if len(values) not in ((1, count) if allow_single else (count,)) or any(not (v > 0) for v in values):
        raise InputError(f"{option} must be {what}{' (or one number)' if allow_single else ''}, got {text!r}")
    return values


def _checked_output(path, suffixes: tuple, what: str):
    """The ``--out`` path, checked before any work: the right suffix, not a folder."""
    from pathlib import Path

    out = Path(path)
    if not out.name.lower().endswith(suffixes):
        raise InputError(f"--out must be a {what} file ending in {' or '.join(suffixes)}, got {out}")
    if out.is_dir():
        raise InputError(f"--out is a folder, expected a file name: {out}")
    return out


def _create_parent(out) -> None:
    """Create the output's folder (like ``mkdir -p``) just before writing, so a failed run leaves nothing."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the output folder {out.parent}: {err.strerror or err}") from None


def _read_input_volume(volume, skip_bad_slices: bool):
    """``read_volume`` of a command's VOLUME; the DICOM files it left out are named in one warning line."""
    import warnings

    from ctrecon.core.io import SkippedSlicesWarning, read_volume

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedSlicesWarning)
        source = read_volume(volume, skip_bad_slices=skip_bad_slices)
    for warning in caught:
        if issubclass(warning.category, SkippedSlicesWarning):
            click.echo(f"ctrecon: warning: {warning.message}", err=True)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return source


SKIP_BAD_SLICES_HELP = ("DICOM series: leave out files that cannot be read or hold no pixel data (named in a "
                        "warning) instead of refusing the series; a hole inside the stack is still refused.")


@cli.command()
@click.argument("volume", type=click.Path(dir_okay=True))
@click.option("--views", required=True, type=click.IntRange(min=1), help="Number of projections (gantry angles).")
@click.option("--arc", default=360.0, show_default=True, type=click.FloatRange(min=0, min_open=True, max=360),
              help="Angular range in degrees; below 360 a short scan (FDK needs 180 + fan angle).")
@click.option("--dose", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Incident photons per detector pixel I0: Poisson noise. Default: noiseless.")
@click.option("--electronic-noise", "electronic_sigma", default=0.0, show_default=True,
              type=click.FloatRange(min=0), help="Gaussian electronic noise sigma in counts (needs --dose).")
@click.option("--mu-water", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Attenuation of water in 1/mm, the physical scale of the photon statistics (with --dose) "
                   "[default: 0.0192, water near 70 keV].")
@click.option("--shape", default=None, metavar="Z,Y,X", help="Resample the volume to this many voxels (trilinear).")
@click.option("--spacing", default=None, metavar="MM", help="Resample to this voxel size in mm: one number or DZ,DY,DX.")
@click.option("--input-units", default="hu", show_default=True, type=click.Choice(["hu", "unit"]),
              help="Volume values: Hounsfield units, or unit attenuation (HU+1024)/4095 already.")
@click.option("--skip-bad-slices", is_flag=True, help=SKIP_BAD_SLICES_HELP)
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Scan file to write (.npz); its folder is created when missing.")
@common_options
def simulate(volume, views, arc, dose, electronic_sigma, mu_water, shape, spacing, input_units, skip_bad_slices, out,
             device, seed):
    """Simulate a circular cone-beam scan of a CT volume.

    VOLUME is a NIfTI file, a DICOM series folder, or a .npy/.npz array, in HU. The detector is sized
    to cover the volume; the scan file holds the projections, angles, geometry, the volume as
    ground truth (unit attenuation) and the noise model.

    \b
    Examples:
      ctrecon simulate data/sample_abdomen_small.nii.gz --views 120 --out out/scan.npz
      ctrecon simulate ct.nii.gz --views 60 --dose 1e5 --electronic-noise 5 --spacing 2 --out scan.npz
      ctrecon simulate dicom_folder/ --views 180 --arc 220 --shape 64,128,128 --out short.npz
    """
    import math
    import time

    from ctrecon.core.io import save_scan
    from ctrecon.pipeline.simulate import simulate_scan

    if shape is not None and spacing is not None:
        raise InputError("--shape and --spacing are mutually exclusive: give one")
    shape = _parse_numbers(shape, "--shape", count=3, kind=int) if shape is not None else None
    spacing = _parse_numbers(spacing, "--spacing", count=3, kind=float, allow_single=True) if spacing else None
    if electronic_sigma and dose is None:
        raise InputError("--electronic-noise needs --dose (the incident photons per pixel)")
    out = _checked_output(out, (".npz",), "scan")
    start = time.perf_counter()
    source = _read_input_volume(volume, skip_bad_slices)
    scan = simulate_scan(source.array, source.spacing, views, arc=math.radians(arc), dose_i0=dose,
                         electronic_sigma=electronic_sigma, shape=shape, spacing_out=spacing,
                         input_units=input_units, seed=seed, device=device, source=str(volume),
                         origin=source.origin, **({} if mu_water is None else {"mu_water": mu_water}))
    scan.meta["source_description"] = source.description
    _create_parent(out)
    save_scan(out, scan)
    geometry = scan.geometry
    noise = (f"Poisson I0={dose:g} photons/pixel" + (f" + electronic sigma {electronic_sigma:g}" if electronic_sigma else "")
             + f", seed {seed}") if dose is not None else "noiseless"
    click.echo(f"{source.description}: {_shape_text(source.array.shape)} voxels at {_shape_text(source.spacing, '.3g')} mm"
               + (f", resampled to {_shape_text(geometry.nVoxel)} at {_shape_text(geometry.dVoxel, '.3g')} mm"
                  if scan.meta["resampling"] else ""))
    click.echo(f"scan: {geometry.n_angles} views over {arc:g} deg, detector {_shape_text(geometry.nDetector)} "
               f"pixels of {_shape_text(geometry.dDetector, '.3g')} mm, DSO {geometry.DSO:.1f} mm, "
               f"DSD {geometry.DSD:.1f} mm, {noise}")
    click.echo(f"wrote {out} in {time.perf_counter() - start:.1f} s")


@cli.command("import")
@click.argument("projections", type=click.Path(dir_okay=True))
@click.option("--geometry", "geometry_path", required=True, type=click.Path(dir_okay=False),
              help="Geometry file: an RTK geometry .xml (ThreeDCircularProjectionGeometry), or a .json "
                   "(ctrecon's own, or a TIGRE geo with angles in radians).")
@click.option("--angles", default=None, type=click.Path(dir_okay=False),
              help="Text file of gantry angles (one per projection) when the geometry file has none.")
@click.option("--angles-unit", default="deg", show_default=True, type=click.Choice(["deg", "rad"]),
              help="Unit of --angles.")
@click.option("--flat", default=None, type=click.Path(dir_okay=True),
              help="Flat field (no object): an image, or a stack averaged over its frames. The projections are "
                   "then intensities, p = -log((I - dark) / (flat - dark)).")
@click.option("--dark", default=None, type=click.Path(dir_okay=True), help="Dark field (no beam), like --flat.")
@click.option("--i0", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Unattenuated intensity (counts) instead of a flat field.")
@click.option("--min-transmission", default=1e-6, show_default=True,
              type=click.FloatRange(min=0, min_open=True, max=1),
              help="Transmissions below this (dead pixels, photon starvation) are clipped to it and counted.")
@click.option("--pixel-size", default=None, metavar="DV,DU",
              help="Detector pixel size in mm (rows, columns) where the image files carry no spacing.")
@click.option("--volume-shape", default=None, metavar="Z,Y,X", help="Voxels of the reconstruction grid.")
@click.option("--voxel-size", default=None, metavar="MM",
              help="Voxel size of the grid in mm, one number or DZ,DY,DX [default: the detector pitch at the "
                   "isocentre; the grid covers the field of view every view sees].")
@click.option("--mu-water", default=0.0192, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Attenuation of water (1/mm) at the scan's effective energy: the scale between physical "
                   "line integrals and ctrecon's unit attenuation.")
@click.option("--line-integral-units", default="physical", show_default=True,
              type=click.Choice(["physical", "unit"]),
              help="Without --flat/--i0 the stack holds line integrals: physical (integral of mu in 1/mm, "
                   "as scanners, RTK and TIGRE write them) or ctrecon's unit attenuation x mm.")
@click.option("--raw-dtype", default=None, help="Headerless raw stack: element type, e.g. uint16, float32.")
@click.option("--raw-shape", default=None, metavar="A,V,U", help="Headerless raw stack: views, rows, columns.")
@click.option("--raw-offset", default=0, show_default=True, type=click.IntRange(min=0),
              help="Headerless raw stack: bytes to skip at the start.")
@click.option("--byte-order", default="little", show_default=True, type=click.Choice(["little", "big"]),
              help="Headerless raw stack: byte order.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Scan file to write (.npz); its folder is created when missing.")
@common_options
def import_command(projections, geometry_path, angles, angles_unit, flat, dark, i0, min_transmission, pixel_size,
                   volume_shape, voxel_size, mu_water, line_integral_units, raw_dtype, raw_shape, raw_offset,
                   byte_order, out, device, seed):
    """Import measured projections (a scanner's or another toolkit's) as a scan file.

    PROJECTIONS is a folder of TIFF/PNG images (one per view, natural order), a multi-page TIFF, a
    MetaImage .mha/.mhd or NIfTI stack (x = detector column, y = row, z = view), a .npy [views, rows,
    columns], or a headerless raw file (--raw-dtype, --raw-shape). The scan has no ground truth: every
    other command takes it (FDK needs a circular orbit; other geometries reconstruct with
    reconstruct --method sart|os-sart|cgls|fista-tv).

    \b
    Examples:
      ctrecon import projections/ --flat flat.tif --dark dark.tif --geometry geometry.xml \\
          --pixel-size 0.4,0.4 --out scan.npz
      ctrecon import projections.mha --geometry geometry.xml --out scan.npz      # RTK line integrals
      ctrecon import stack.raw --raw-dtype uint16 --raw-shape 360,256,512 --i0 60000 \\
          --geometry geo.json --angles angles.txt --volume-shape 128,256,256 --voxel-size 0.5 --out scan.npz
    """
    import time

    from ctrecon.core.io import save_scan
    from ctrecon.pipeline.importer import import_scan

    out = _checked_output(out, (".npz",), "scan")
    if (raw_dtype is None) != (raw_shape is None):
        raise InputError("a headerless raw stack needs both --raw-dtype and --raw-shape")
    start = time.perf_counter()
    scan, summary = import_scan(
        projections, geometry_path, flat=flat, dark=dark, i0=i0, min_transmission=min_transmission, angles=angles,
        angles_unit=angles_unit,
        pixel_size=None if pixel_size is None else _parse_numbers(pixel_size, "--pixel-size", count=2, kind=float),
        volume_shape=None if volume_shape is None else _parse_numbers(volume_shape, "--volume-shape", count=3, kind=int),
        voxel_size=None if voxel_size is None else _parse_numbers(voxel_size, "--voxel-size", count=3, kind=float,
                                                                  allow_single=True),
        mu_water=mu_water, line_integral_units=line_integral_units, raw_dtype=raw_dtype,
        raw_shape=None if raw_shape is None else _parse_numbers(raw_shape, "--raw-shape", count=3, kind=int),
        raw_offset=raw_offset, byte_order=byte_order)
    _create_parent(out)
    save_scan(out, scan)
    geometry = scan.geometry
    click.echo(f"{summary['projection_files']}: {summary['n_views']} views of {_shape_text(geometry.nDetector)} pixels")
    click.echo(f"line integrals: {summary['conversion']}"
               + (f"; {summary['clipped_transmissions']} transmissions below {min_transmission:g} clipped"
                  if summary["min_transmission"] is not None else ""))
    click.echo(f"geometry: {summary['geometry_format']} ({summary['geometry_kind']}); grid {_shape_text(geometry.nVoxel)} "
               f"voxels at {_shape_text(geometry.dVoxel, '.3g')} mm (from the {summary['grid']['from']})")
    click.echo(f"wrote {out} in {time.perf_counter() - start:.1f} s")


def _shape_text(values, spec: str = "d") -> str:
    return "x".join(format(v, spec) for v in values)


@cli.command()
@click.argument("scan", type=click.Path(dir_okay=False))
@click.option("--filter", "filter_name", default="ram-lak", show_default=True,
              type=click.Choice(["ram-lak", "shepp-logan", "cosine", "hann"]),
              help="Ramp-filter window: smoother windows trade resolution for noise.")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="NIfTI volume to write (.nii.gz or .nii); metrics go to <stem>.json beside it. "
                   "Its folder is created when missing.")
@common_options
def fdk(scan, filter_name, out, device, seed):
    """Reconstruct a scan with FDK (filtered backprojection; Parker weights for short scans).

    Writes the volume in unit attenuation with the geometry's voxel spacing. When the scan holds a
    ground truth, prints and stores PSNR (data range 1) and both SSIMs: 3-D SSIM (Gaussian window,
    sigma 1.5) and the 3DGR-CT convention (mean of axial-slice SSIM, 7x7 window).

    \b
    Examples:
      ctrecon fdk out/scan.npz --out out/fdk.nii.gz
      ctrecon fdk scan.npz --filter hann --device cuda --out recon/fdk_hann.nii.gz
    """
    import time

    import numpy as np
    import torch
    from tqdm import tqdm

    from ctrecon import __version__
    from ctrecon.operators.fdk import fdk as reconstruct_fdk
    from ctrecon.core.io import atomic_outputs, load_scan, save_volume, write_json
    from ctrecon.pipeline.metrics import psnr, ssim3d, ssim_slice

    out = _checked_output(out, (".nii.gz", ".nii"), "NIfTI")
    suffix = ".nii.gz" if out.name.lower().endswith(".nii.gz") else ".nii"
    json_path = out.with_name(out.name[: -len(suffix)] + ".json")
    loaded = load_scan(scan)
    geometry = loaded.geometry
    start = time.perf_counter()
    with tqdm(total=geometry.n_angles, desc="FDK backprojection", unit="view", disable=None, leave=False) as bar:
        volume = reconstruct_fdk(loaded.projections, geometry, filter_name, device=device,
                                 progress=lambda done, total: bar.update(done - bar.n))
        if volume.device.type == "cuda":
            torch.cuda.synchronize(volume.device)
    seconds = time.perf_counter() - start
    volume = volume.cpu().numpy()
    origin = loaded.meta.get("origin")
    if not (isinstance(origin, list) and len(origin) == 3 and all(isinstance(v, (int, float)) for v in origin)):
        origin = [float(geometry.volume.axis_centres(axis)[0]) for axis in (2, 1, 0)]  # world (x, y, z) of voxel 0
    metrics = None
    if loaded.ground_truth is not None:
        metrics = {"psnr_db": psnr(volume, loaded.ground_truth), "ssim3d": ssim3d(volume, loaded.ground_truth),
                   "ssim_slice_3dgrct": ssim_slice(volume, loaded.ground_truth), "data_range": 1.0}
    summary = {"scan": str(scan), "output": str(out), "filter": filter_name, "device": str(device),
               "seconds": seconds, "units": "unit attenuation (HU + 1024) / 4095",
               "geometry": {**geometry.to_dict(include_angles=False), "n_views": geometry.n_angles,
                            "short_scan": geometry.is_short_scan()},
               "value_range": [float(np.min(volume)), float(np.max(volume))], "metrics": metrics,
               "metrics_note": None if metrics is None else
               "psnr/ssim vs the scan's ground truth, data_range 1; ssim3d: 3-D Gaussian window sigma 1.5; "
               "ssim_slice_3dgrct: mean of axial 2-D SSIM, 7x7 uniform window",
               "version": __version__}
    _create_parent(out)
    with atomic_outputs(out, json_path) as (volume_file, json_file):  # both or neither
        save_volume(volume_file, volume, geometry.dVoxel, origin=origin)
        write_json(json_file, summary)
    click.echo(f"FDK ({filter_name}) of {geometry.n_angles} views{' (short scan, Parker weights)' if geometry.is_short_scan() else ''}"
               f" -> {_shape_text(geometry.nVoxel)} voxels at {_shape_text(geometry.dVoxel, '.3g')} mm in {seconds:.2f} s on {device}")
    if metrics is not None:
        click.echo(f"vs ground truth: PSNR {metrics['psnr_db']:.2f} dB | SSIM 3-D (Gaussian sigma 1.5) "
                   f"{metrics['ssim3d']:.4f} | SSIM slice-mean (3DGR-CT, 7x7) {metrics['ssim_slice_3dgrct']:.4f}")
    click.echo(f"wrote {out} and {json_path}")


@cli.command()
@click.option("--data", required=True, type=click.Path(exists=True),
              help="AbdomenAtlas1.0Mini folder (BDMAP_*/ct.nii.gz) or any folder of NIfTI volumes.")
@click.option("--config", "config_name", default="paper", show_default=True,
              type=click.Choice(["paper", "base", "small", "tiny"]), help="Named model size.")
@click.option("--model", "architecture", default="medgmae", show_default=True,
              type=click.Choice(["medgmae", "medgmae-star", "voxel-mae"]), help="Prior architecture.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--steps", default=100_000, show_default=True, type=click.IntRange(min=1), help="Optimizer steps.")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="Crops per optimizer step over all processes.")
@click.option("--accum", default=1, show_default=True, type=click.IntRange(min=1), help="Gradient-accumulation micro-steps.")
@click.option("--lr", default=1e-4, show_default=True, type=float, help="Peak learning rate (AdamW).")
@click.option("--warmup", default=None, type=click.IntRange(min=1), help="Warm-up steps [default: 2% of --steps].")
@click.option("--window", default="-175,250", show_default=True,
              help="HU window LOW,HIGH scaled to [0, 1]; 'unit' = -1024,3071 (unit attenuation, the reconstruction prior).")
@click.option("--loss", default="masked", show_default=True, type=click.Choice(["masked", "zeroed-visible"]),
              help="masked: MSE on masked voxels (paper); zeroed-visible: whole crop vs input with visible patches zeroed (public code).")
@click.option("--head-init", default="paper", show_default=True, type=click.Choice(["paper", "code"]),
              help="paper: Xavier heads; code: the public code's N(0, 0.01^2) scale-head weights.")
@click.option("--intensity-gain", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Multiplies the intensity head (the public code renders 0.1*sigmoid).")
@click.option("--crop-size", default=None, type=click.IntRange(min=1), help="Crop edge in voxels [default: 96].")
@click.option("--crops-per-volume", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--corruption", default="none", show_default=True, type=click.Choice(["none", "noise", "fdk"]),
              help="What the encoder sees (the loss compares with the clean crop, on every voxel when corrupted): "
                   "the crop (MedGMAE), the crop plus Gaussian noise of a random sigma (MDAE), or the same crop of "
                   "a cached sparse-view FDK (60-180 views) of the training volume, as at reconstruction.")
@click.option("--fdk-dose", default=None, metavar="LOW,HIGH",
              help="With --corruption fdk: photon noise (photons per pixel, as simulate --dose) at doses spread "
                   "log-uniformly over LOW..HIGH across the cached scans [default: noiseless].")
@click.option("--mask-ratio-range", default=None, metavar="LOW,HIGH",
              help="Each step masks a share of the patches drawn from U(LOW, HIGH) (MDAE) instead of the "
                   "config's fixed ratio; 0 is allowed with a corrupted input.")
@click.option("--gaussian-tokens", default="queries", show_default=True, type=click.Choice(["queries", "patches"]),
              help="queries: the paper's learnable Gaussian queries; patches: every patch token decodes "
                   "K / patches Gaussians anchored in its patch (not in the paper).")
@click.option("--cache", default=None, type=click.Path(file_okay=False), help="Folder caching preprocessed volumes.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0), help="Data-loading processes.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help="auto: bf16 autocast on CUDA, fp32 on CPU.")
@click.option("--checkpoint-every", default=1000, show_default=True, type=click.IntRange(min=0))
@click.option("--preview-every", default=1000, show_default=True, type=click.IntRange(min=0), help="PNG previews (0: none).")
@click.option("--log-every", default=10, show_default=True, type=click.IntRange(min=0), help="log.csv rows (0: none).")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt when it exists.")
@common_options
def pretrain(data, config_name, architecture, out, steps, batch, accum, lr, warmup, window, loss, head_init,
             intensity_gain, crop_size, crops_per_volume, corruption, fdk_dose, mask_ratio_range, gaussian_tokens,
             cache, workers, precision, checkpoint_every, preview_every, log_every, resume, device, seed):
    """Pre-train a MedGMAE / MedGMAE* / voxel-MAE prior on CT volumes.

    Writes OUT/prior.pt (weights + metadata, for --prior), OUT/checkpoint.pt (resumable state),
    OUT/encoder_monai.pt (the encoder for MONAI ViT/UNETR),
    OUT/log.csv, OUT/previews/*.png and OUT/config.json. Several GPUs: launch with torchrun.

    \b
    Examples:
      ctrecon pretrain --data AbdomenAtlas1.0Mini --config paper --out ckpt/ --window unit
      ctrecon pretrain --data ct_folder/ --config tiny --out run/ --steps 50 --batch 2 --crop-size 32
      ctrecon pretrain --data AbdomenAtlas1.0Mini --config small --window unit --corruption fdk --cache cache/ --out fdk/
      torchrun --nproc_per_node 4 -m ctrecon.cli pretrain --data DIR --config paper --out ckpt/ --batch 32
    """
    from tqdm import tqdm

    from priors.data import DataConfig
    from priors.model import model_config
    from priors.pretrain import TrainConfig
    from priors.pretrain import pretrain as run_pretrain

    if window.strip().lower() == "unit":
        window_hu = (-1024.0, 3071.0)
    else:
        window_hu = _number_pair(window, "--window (HU, or 'unit')")
    if fdk_dose is not None and corruption != "fdk":
        raise InputError("--fdk-dose needs --corruption fdk")
    overrides = {"loss": loss, "head_init": head_init, "intensity_gain": intensity_gain,
                 "gaussian_tokens": gaussian_tokens, **({"crop_size": crop_size} if crop_size else {}),
                 **({"mask_ratio_range": _number_pair(mask_ratio_range, "--mask-ratio-range")} if mask_ratio_range else {})}
    cfg = model_config(config_name, architecture, **overrides)
    data_cfg = DataConfig(window_hu=window_hu, crops_per_volume=crops_per_volume, corruption=corruption,
                          fdk_dose=_number_pair(fdk_dose, "--fdk-dose") if fdk_dose else ())
    train_cfg = TrainConfig(steps=steps, batch=batch, accum=accum, lr=lr, warmup_steps=warmup, precision=precision,
                            checkpoint_every=checkpoint_every, log_every=log_every, preview_every=preview_every,
                            workers=workers, seed=seed)
    main_process = int(os.environ.get("RANK", "0")) == 0
    bar = None

    def progress(step, total, record):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, initial=step - 1, desc="pretrain", unit="step")
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.5f}", lr=f"{record['lr']:.2e}")

    try:
        summary = run_pretrain(data, out, cfg, data_cfg, train_cfg, resume=resume, device=device, cache_dir=cache,
                               progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if main_process:
        start = f"resumed at step {summary['start_step']}, " if summary["resumed"] else ""
        click.echo(f"{cfg.architecture} ({config_name}) on {summary['training_data']['n_volumes']} volume(s): "
                   f"{start}{summary['steps']} steps, last loss {summary['final_loss']:.6f}, "
                   f"{summary['seconds']:.1f} s on {summary['processes']} process(es), {summary['precision']}")
        click.echo(f"prior: {summary['prior']}\ncheckpoint: {summary['checkpoint']}\nlog: {summary['log']}")


def _number_pair(text: str, option: str) -> tuple:
    """``"LOW,HIGH"`` → (low, high) floats; anything else is one InputError line naming ``option``."""
    try:
        pair = tuple(float(v) for v in text.split(","))
    except ValueError:
        pair = ()
    if len(pair) != 2:
        raise InputError(f"{option} must be LOW,HIGH (two numbers), got {text!r}")
    return pair


def _config_file(config_path) -> dict:
    """The settings object of a --config JSON file ({} without one); a run's config.json, which nests them under
    "config", works too."""
    if config_path is None:
        return {}
    try:
        with open(config_path, encoding="utf-8") as handle:
            settings = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read --config {config_path}: {err}") from None
    if not isinstance(settings, dict) or not isinstance(settings.get("config", settings), dict):
        raise InputError(f"--config {config_path} must hold a JSON object")
    return settings.get("config", settings)


OPTIMIZER_HELP = ("Optimiser: 'preconditioned' (ramp-filtered residual, TV 1e-3 (3e-4 from MedGMAE), schedules "
                  "tied to the run, --iters auto; measured fastest on noiseless and noisy scans, see data/README.md) or '3dgr' "
                  "(3DGR-CT's, faithful) [default: preconditioned; a --config file that names no method is read as "
                  "3dgr, the only one before there was a choice].")


def _reconstruct_config(config_path, optimizer, overrides: dict, *, no_densify: bool, stop_at_thresholds: bool,
                        init_options: dict | None = None):
    """The ReconstructConfig of a command: the --config file, then the options that were given."""
    from ctrecon.pipeline.reconstruct import ReconstructConfig

    settings = ReconstructConfig.flat_settings(_config_file(config_path))
    settings["method"] = optimizer or settings.get("method") or ("3dgr" if config_path else "preconditioned")
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if init_options:
        settings["init_options"] = {**settings.get("init_options", {}), **init_options}
    if no_densify:
        settings["strategy"] = None
    if stop_at_thresholds:
        settings["stop_at_thresholds"] = True
    return ReconstructConfig.from_dict(settings)


def _case_name(scan, scan_path: str) -> str:
    """Name of the imaged case for reports: meta "case", else the source file named in meta "source"
    (e.g. "NIfTI chest.nii.gz (...)" -> "chest"), else the scan file's stem."""
    import re
    from pathlib import Path

    meta = scan.meta or {}
    if isinstance(meta.get("case"), str) and meta["case"]:
        return meta["case"]
    match = re.search(r"([^\s/\\]+?)(\.nii\.gz|\.nii|\.npz|\.npy)\b", str(meta.get("source", "")))
    return match.group(1) if match else Path(scan_path).stem


PRIOR_INITS = ("medgmae", "medgmae-star")
#: ``reconstruct --method``: 3DGR-CT and ctrecon.pipeline.classical.METHODS (kept equal by a test; the CLI
#: imports no torch before a command runs).
RECONSTRUCTION_METHODS = ("3dgr", "sart", "os-sart", "cgls", "fista-tv", "fdk")


def _prior_initializers(inits, prior) -> tuple:
    """``(initialisers, prior files)`` of the init names ``inits``: the prior ones (``PRIOR_INITS``)
    become :class:`priors.zero_shot.PriorInit` of ``prior`` (default: each one's shipped prior), their
    files recorded as init name → file; the others stay names. ``--prior`` needs a prior init. Every prior is
    loaded and checked here, before any work."""
    used = [init for init in inits if init in PRIOR_INITS]
    if prior is not None and not used:
        raise InputError(f"--prior is for the inits {' and '.join(PRIOR_INITS)}")
    if not used:
        return tuple(inits), {}
    from priors.zero_shot import PriorInit

    chosen = {init: PriorInit(prior, name=init) for init in used}
    for initializer in chosen.values():
        initializer.check()  # a bad prior file fails here, before any scan is simulated or reconstructed
    return tuple(chosen.get(init, init) for init in inits), {init: str(c.path) for init, c in chosen.items()}


@cli.command()
@click.argument("scan_path", metavar="SCAN", type=click.Path(dir_okay=False))
@click.option("--method", type=click.Choice(RECONSTRUCTION_METHODS), default=None,
              help="3dgr (Gaussians, the default), a classical iterative method on the same projector: sart, "
                   "os-sart, cgls, fista-tv, or fdk alone [default: 3dgr, or the method of a --config run].")
@click.option("--init", "init", default=None,
              help="3dgr: initialiser fbp (3DGR-CT), r2 (R²-Gaussian), medgmae / medgmae-star (zero-shot prior, "
                   "see --prior) or another registered name [default: fbp]. Classical methods: start from "
                   "zeros or fdk [default: zeros].")
@click.option("--init-gaussians", type=click.Path(dir_okay=False), default=None,
              help="Start from this Gaussian file (e.g. from `ctrecon infer`) instead; --init names it.")
@click.option("--prior", type=click.Path(dir_okay=False), default=None,
              help="Prior checkpoint for --init medgmae / medgmae-star (a prior.pt of `ctrecon pretrain`) "
                   "[default: the shipped prior in data/priors/].")
@click.option("--init-option", "init_options", multiple=True, metavar="KEY=VALUE",
              help="Keyword option of the initialiser (JSON value), e.g. scale_factor=1.0 (fbp) or overlap=0.75 "
                   f"(medgmae*: window overlap, default {INIT_OVERLAP}); repeatable.")
@click.option("--iters", type=ITERATIONS, default=None,
              help="Iterations, or 'auto': until the data residual stops improving (no ground truth needed; "
                   "capped by max_iterations, 3000) [default: auto (preconditioned), 15000 (3dgr)].")
@click.option("--views-per-iter", type=int, default=None,
              help="Random views per iteration (0: all) [default: 40 (preconditioned), 0 (3dgr)].")
@click.option("--eval-every", type=int, default=None, help="Evaluate every E iterations [default: 100].")
@click.option("--n-gaussians", type=int, default=None,
              help="Initial Gaussian count [default: preconditioned: one per 100 voxels, at least 50000, at most "
                   "--max-gaussians; 3dgr: 50000].")
@click.option("--max-gaussians", type=int, default=None, help="Cap for densification [default: 200000].")
@click.option("--loss", type=click.Choice(["mse", "l1"]), default=None, help="Projection loss [default: mse].")
@click.option("--dssim", type=float, default=None, help="Weight of D-SSIM over projections [default: 0].")
@click.option("--tv", type=float, default=None,
              help="Weight of 3-D TV of the volume [default: preconditioned 1e-3, from --init medgmae 3e-4; 3dgr 0].")
@click.option("--coarse-iters", type=int, default=None,
              help="First iterations at half resolution (3DGR-CT low-res stage) [default: 0].")
@click.option("--optimizer", type=click.Choice(["preconditioned", "3dgr"]), default=None, help=OPTIMIZER_HELP)
@click.option("--no-densify", is_flag=True, help="Keep the Gaussian count fixed (no clone/split/prune).")
@click.option("--densify", type=click.Choice(["additive", "3dgr"]), default=None,
              help="Density control: 'additive' (splits and clones that keep the field, stops when the data stop "
                   "asking; +0.9 dB and slice SSIM 0.93 vs 0.88 at 600 iterations on development CT, 1.4x the "
                   "time per iteration) or '3dgr' (3DGR-CT's) [default: none (preconditioned), 3dgr (3dgr)].")
@click.option("--subsets", type=int, default=None, help="os-sart: view blocks per pass [default: 20].")
@click.option("--relaxation", type=float, default=None, help="sart / os-sart: relaxation in (0, 2) [default: 1].")
@click.option("--tv-weight", type=float, default=None,
              help="fista-tv: weight of the 3-D TV term (scale-free, see ctrecon.methods.classical) [default: "
                   "3e-4, chosen on development CT].")
@click.option("--validation-views", type=click.IntRange(min=0), default=None,
              help="3dgr: leave this many views (spread over the scan) out of FDK and fit, stop once their loss "
                   "has stopped falling and return the state of its lowest (no ground truth needed; stops the fit "
                   "of noise) [default: 0, off].")
@click.option("--grid-spacing", default=None, metavar="MM",
              help="Reconstruct on a grid of this voxel size (one number or DZ,DY,DX; same extent), e.g. coarser "
                   "than the scan's to trade resolution for time; the projector stays exact on the measured "
                   "detector, and a ground truth is averaged onto the grid [default: the scan's grid].")
@click.option("--stop-at-psnr", type=float, default=None, help="Stop once PSNR reaches this (dB).")
@click.option("--stop-at-thresholds", is_flag=True, help="Stop once PSNR 35 dB and SSIM 0.90 are both reached.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="JSON file of ReconstructConfig settings (a run's config.json works); options above override.")
@click.option("--case", default=None, help="Case name recorded for reports [default: from the scan].")
@click.option("--out", required=True, type=click.Path(), help="Run folder to write.")
@common_options
def reconstruct(scan_path, method, init, init_gaussians, prior, init_options, iters, views_per_iter, eval_every,
                n_gaussians, max_gaussians, loss, dssim, tv, coarse_iters, optimizer, no_densify, densify, subsets,
                relaxation, tv_weight, validation_views, grid_spacing, stop_at_psnr, stop_at_thresholds, config_path, case,
                out, device, seed):
    """Reconstruct SCAN (a scan .npz): 3DGR-CT (Gaussians) or a classical method.

    Writes OUT/volume.nii.gz (unit attenuation, as `ctrecon fdk`), OUT/gaussians.npz (3dgr only), OUT/config.json,
    OUT/curves.png and OUT/metrics.json (PSNR/SSIM history against the scan's ground truth, iterations and seconds
    to PSNR 35 dB and SSIM 0.90, evaluation time excluded). Ctrl-C stops and writes what was
    reached (metrics.json says "interrupted": true).

    \b
    Examples:
      ctrecon reconstruct scan.npz --init fbp --iters 15000 --out run/
      ctrecon reconstruct scan.npz --iters 3000 --views-per-iter 10 --stop-at-psnr 35 --out run_fast/
      ctrecon reconstruct scan.npz --init medgmae-star --prior ckpt/prior.pt --out run_prior/
      ctrecon reconstruct scan.npz --method os-sart --iters 30 --out run_ossart/
      ctrecon reconstruct big_scan.npz --init medgmae-star --grid-spacing 2 --out run_coarse/
    """
    from tqdm import tqdm

    from ctrecon.core.io import load_scan
    from ctrecon.operators.fdk import check_circular
    from ctrecon.pipeline.metrics import threshold_label
    from ctrecon.pipeline.simulate import regrid_scan
    from ctrecon.pipeline.reconstruct import NonFiniteLossError
    from ctrecon.pipeline.runs import RUN_FILES, GAUSSIANS_FILE, check_run_folder, write_run

    check_run_folder(out)
    if method is None:
        from ctrecon.pipeline.classical import classical_method

        method = classical_method(_config_file(config_path)) or "3dgr"
    given = {"--init-gaussians": init_gaussians, "--prior": prior, "--init-option": init_options or None,
             "--views-per-iter": views_per_iter, "--n-gaussians": n_gaussians, "--max-gaussians": max_gaussians,
             "--loss": loss, "--dssim": dssim, "--tv": tv, "--coarse-iters": coarse_iters, "--optimizer": optimizer,
             "--no-densify": no_densify or None, "--densify": densify,
             "--validation-views": validation_views} if method != "3dgr" else \
        {"--subsets": subsets, "--relaxation": relaxation, "--tv-weight": tv_weight}
    if no_densify and densify:
        raise InputError("--densify and --no-densify contradict each other: give one")
    if grid_spacing is not None:
        grid_spacing = _parse_numbers(grid_spacing, "--grid-spacing", count=3, kind=float, allow_single=True)
    misplaced = [name for name, value in given.items() if value is not None]
    if misplaced:
        raise InputError(f"{', '.join(misplaced)} {'does' if len(misplaced) == 1 else 'do'} not apply to --method "
                         f"{method}")
    common = {"eval_every": eval_every, "stop_at_psnr": stop_at_psnr}
    if method == "3dgr":
        run, config, label, record = _gaussian_run(init or "fbp", init_gaussians, prior, init_options, iters,
                                                   stop_at_thresholds, no_densify, optimizer, config_path,
                                                   {**common, "views_per_iter": views_per_iter,
                                                    "n_gaussians": n_gaussians, "max_gaussians": max_gaussians,
                                                    "loss": loss, "lambda_dssim": dssim, "lambda_tv": tv,
                                                    "coarse_iterations": coarse_iters, "strategy": densify,
                                                    "validation_views": validation_views}, device, seed)
    else:
        run, config, label, record = _classical_run(method, init, iters, stop_at_thresholds, config_path,
                                                    {**common, "subsets": subsets, "relaxation": relaxation,
                                                     "tv_weight": tv_weight}, device, seed)
    scan = load_scan(scan_path)
    if grid_spacing is not None:
        measured = scan.geometry
        scan = regrid_scan(scan, grid_spacing)
        click.echo(f"grid: {_shape_text(scan.geometry.nVoxel)} voxels at {_shape_text(scan.geometry.dVoxel, '.3g')} mm "
                   f"(the scan's: {_shape_text(measured.nVoxel)} at {_shape_text(measured.dVoxel, '.3g')} mm)"
                   + ("; PSNR/SSIM against the ground truth averaged onto it" if scan.ground_truth is not None else ""))
    if method in ("3dgr", "fdk") or init == "fdk":
        check_circular(scan.geometry)  # every Gaussian initialiser, and the fdk method and start, begin with FDK
    if scan.ground_truth is None:
        click.echo("note: the scan has no ground truth; PSNR/SSIM and thresholds are not computed", err=True)

    bar = None  # created at the first report, so that errors during FDK/initialisation print one line
    postfix = {}

    def progress(p):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=config.iteration_cap, desc=label, unit="it", dynamic_ncols=True)
        if p.iteration:
            bar.update(1)
        if p.evaluation is not None and p.evaluation["psnr"] is not None:
            postfix.update(psnr=f"{p.evaluation['psnr']:.2f}", ssim=f"{p.evaluation['ssim_slice']:.3f}")
        if p.loss is not None:
            postfix.update(loss=f"{p.loss:.2e}", **({"N": p.n_gaussians} if method == "3dgr" else {}))
            bar.set_postfix(postfix, refresh=False)

    stage_bars = {}  # the stages before the first iteration: FDK views, a prior's windows (progress and ETA)

    def stage_progress(stage, done, total):
        if stage not in stage_bars:
            stage_bars[stage] = tqdm(total=total, desc=stage, unit="view" if stage == "FDK" else "window",
                                     disable=None, leave=False)
        stage_bars[stage].total = total
        stage_bars[stage].update(done - stage_bars[stage].n)

    failure = None
    try:
        result = run(scan, progress, stage_progress)
    except NonFiniteLossError as err:
        failure, result = err, err.result
    finally:
        for stage_bar in [*stage_bars.values(), *([bar] if bar is not None else [])]:
            stage_bar.close()
    write_run(out, result, scan, scan_file=os.path.abspath(scan_path), source=scan.meta.get("source"),
              case=case or _case_name(scan, scan_path), seed=seed, device=device, **record)
    final = result.final or {}
    summary = [f"{label}: {result.iterations} iterations in {result.wall_seconds:.1f} s "
               f"(+{result.eval_seconds:.1f} s evaluation)"
               + (f", {result.n_gaussians} Gaussians" if result.n_gaussians is not None else "")]
    if result.stop_reason not in ("completed", "interrupted"):
        run_steps = result.to_metrics()["iterations_run"]
        summary.append(f"stopped: {result.stop_reason}" + (f" (at iteration {run_steps}; the state returned is that of "
                                                           f"iteration {result.iterations})"
                                                           if run_steps != result.iterations else ""))
    if final:
        summary.append(f"final PSNR {final['psnr']:.2f} dB, SSIM {final['ssim_slice']:.4f} (axial slices), "
                       f"{final['ssim3d']:.4f} (3-D)")
        for key, hit in result.thresholds.items():
            kind = "psnr" if key.startswith("psnr") else "ssim"
            value = config.evaluation.psnr_threshold if kind == "psnr" else config.evaluation.ssim_threshold
            summary.append(f"{threshold_label(kind, value)}: " + ("not reached" if hit is None else
                                                                    f"iteration {hit['iteration']}, {hit['seconds']:.1f} s"))
    files = [name for name in RUN_FILES if result.field is not None or name != GAUSSIANS_FILE]
    summary.append(f"wrote {out}/ ({', '.join(files)})")
    click.echo("\n".join(summary))
    if failure is not None:
        raise click.ClickException(str(failure))
    if result.interrupted:
        _fail(f"interrupted after {result.iterations} iterations; results so far are in {out}/", 130)


def _gaussian_run(init, init_gaussians, prior, init_options, iters, stop_at_thresholds, no_densify, optimizer,
                  config_path, overrides: dict, device, seed: int) -> tuple:
    """``(run(scan, callback, stage_progress) -> result, config, label, write_run extras)`` of ``reconstruct --method 3dgr``;
    every check that needs no scan is made here, before any work."""
    from ctrecon.methods.gaussians import GaussianField, get_initializer
    from ctrecon.pipeline.reconstruct import reconstruct as run_reconstruct

    options = {}
    for item in init_options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--init-option must be KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value  # a plain string
    config = _reconstruct_config(config_path, optimizer, {**overrides, "iterations": iters}, no_densify=no_densify,
                                 stop_at_thresholds=stop_at_thresholds, init_options=options)
    init_field, initializer = None, init
    if prior is not None and (init not in PRIOR_INITS or init_gaussians is not None):
        raise InputError(f"--prior is for --init {' or '.join(PRIOR_INITS)} (without --init-gaussians)")
    if init_gaussians is not None:
        init_field = GaussianField.load(init_gaussians)
    elif init in PRIOR_INITS:
        (initializer,), files = _prior_initializers([init], prior)
        prior = files[init]
    else:
        get_initializer(init)  # InputError listing the known names

    def run(scan, callback, stage_progress):
        return run_reconstruct(scan, init=initializer, config=config, device=device, seed=seed, callback=callback,
                               init_field=init_field, stage_progress=stage_progress)

    return run, config, f"3DGR-CT ({init})", {"prior": prior, "init_gaussians": init_gaussians}


def _classical_run(method, start, iters, stop_at_thresholds, config_path, overrides: dict, device, seed: int) -> tuple:
    """``(run(scan, callback, stage_progress) -> result, config, label, write_run extras)`` of a classical ``--method``; ``start``
    (--init) None keeps the --config file's (zeros without one)."""
    from ctrecon.pipeline.classical import ClassicalConfig, classical_method, reconstruct_classical

    if iters == "auto":
        raise InputError(f"--iters auto is for --method 3dgr; give {method} a number of iterations")
    settings = _config_file(config_path)
    if config_path is not None and classical_method(settings) is None:
        raise InputError(f"--config {config_path} holds 3dgr settings, not those of a classical method")
    # the file's settings in sections (it may be flat), then the options that were given
    sections = (ClassicalConfig.from_dict(settings) if config_path is not None else ClassicalConfig()).to_dict()
    solver = {"start": start, "iterations": iters, **overrides}
    sections["solver"].update(name=method, **{k: v for k, v in solver.items()
                                              if v is not None and k not in ("eval_every", "stop_at_psnr")})
    if overrides["eval_every"] is not None:
        sections["evaluation"]["eval_every"] = overrides["eval_every"]
    if overrides["stop_at_psnr"] is not None:
        sections["stopping"]["stop_at_psnr"] = overrides["stop_at_psnr"]
    if stop_at_thresholds:
        sections["stopping"]["stop_at_thresholds"] = True
    config = ClassicalConfig.from_dict(sections)

    def run(scan, callback, stage_progress):  # a classical run's FDK start is one short step: no stage bars
        return reconstruct_classical(scan, config=config, device=device, seed=seed, callback=callback)

    return run, config, method.upper() if method != "fista-tv" else "FISTA-TV", {}


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Report folder to write.")
@common_options
def report(runs, out, device, seed):
    """Compare reconstruction runs: a Table-4-style summary, curves and paired tests.

    Groups RUN folders (written by `ctrecon reconstruct`) by arm (the initialisation of a 3DGR-CT run, the
    method of a classical one) and view count and writes OUT/report.md, OUT/table.csv, OUT/curves.png,
    OUT/curves_seconds.png and OUT/stats.json. Times to a threshold that a run never reached are censored
    (shown as >= what it did) and rank last; paired tests (sign test on times, Wilcoxon on final PSNR)
    pair cases at one view count.

    \b
    Example:
      ctrecon report runs/fbp_* runs/medgmae_* --out report/
    """
    from ctrecon.pipeline.report import build_report

    result = build_report(runs, out)
    click.echo(result["markdown_table"])
    click.echo(f"\nwrote {out}/ (report.md, table.csv, curves.png, curves_seconds.png, stats.json)")


@cli.command()
@click.argument("volume", type=click.Path(dir_okay=True))
@click.option("--prior", default=None, type=click.Path(dir_okay=False),
              help="Prior checkpoint (a prior.pt of `ctrecon pretrain`) [default: the shipped MedGMAE* prior].")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Gaussian file to write (.npz).")
@click.option("--render", default=None, type=click.Path(dir_okay=False),
              help="Also write the field rendered on the volume's grid (.nii.gz/.nii, in the input's units).")
@click.option("--levels", default="all", show_default=True, type=click.Choice(["all", "first"]),
              help="all: every MedGMAE* level; first: level 0 only (MedGMAE).")
@click.option("--overlap", default=FIELD_OVERLAP, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Window overlap (fraction of a window), blended; 0: non-overlapping windows (the paper's).")
@click.option("--no-resample", is_flag=True, help="Cut windows at the volume's own spacing, not the prior's.")
@click.option("--input-units", default="hu", show_default=True, type=click.Choice(["hu", "unit"]),
              help="Volume values: HU, or unit attenuation (e.g. the output of `ctrecon fdk`).")
@click.option("--frame", default="scan", show_default=True, type=click.Choice(["scan", "patient"]),
              help="Gaussian coordinates: scan = volume centred at the origin (the frame of `ctrecon simulate` "
                   "scans and `reconstruct --init-gaussians`); patient = the file's LPS frame.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Windows per forward pass.")
@click.option("--skip-bad-slices", is_flag=True, help=SKIP_BAD_SLICES_HELP)
@common_options
def infer(volume, prior, out, render, levels, overlap, no_resample, input_units, frame, batch_size, skip_bad_slices,
          device, seed):
    """Zero-shot Gaussians of a volume with a MedGMAE / MedGMAE* prior.

    The volume is windowed to the prior's intensity window, resampled to its voxel spacing, cut into
    windows of its crop size, and every window's Gaussians are mapped to world mm and stitched into one
    field (unit attenuation), written as a ctrecon Gaussian file (.npz, for `reconstruct --init-gaussians`).

    \b
    Examples:
      ctrecon infer ct.nii.gz --out gaussians.npz --render rendered.nii.gz
      ctrecon infer fdk.nii.gz --input-units unit --prior ckpt/prior.pt --levels first --out g.npz
      ctrecon infer dicom_folder/ --overlap 0 --frame patient --out g.npz
    """
    import time

    import numpy as np
    import torch
    from tqdm import tqdm

    from priors.zero_shot import (ZeroShotConfig, infer_field, load_zero_shot_prior, shipped_prior_path,
                                  to_prior_window)
    from ctrecon.core.geometry import VolumeGeometry
    from ctrecon.core.io import atomic_outputs, save_volume
    from ctrecon.pipeline.metrics import psnr
    from ctrecon.core.units import hu_to_unit, unit_to_hu

    out = _checked_output(out, (".npz",), "Gaussian")
    if render is not None:
        render = _checked_output(render, (".nii.gz", ".nii"), "NIfTI")
    prior = prior if prior is not None else shipped_prior_path("medgmae-star")
    config = ZeroShotConfig(levels=levels, overlap=overlap, resample=not no_resample, batch_size=batch_size)
    source = _read_input_volume(volume, skip_bad_slices)
    model, meta = load_zero_shot_prior(prior, device)
    unit = source.array if input_units == "unit" else hu_to_unit(source.array)
    offset = (0.0, 0.0, 0.0)
    if frame == "patient":  # centre of the volume in the file's LPS frame, (z, y, x)
        offset = tuple(o + (n - 1) / 2 * d for o, n, d in zip(source.origin[::-1], source.array.shape, source.spacing))
    grid = VolumeGeometry(source.array.shape, source.spacing, offset)
    start = time.perf_counter()
    with tqdm(desc="zero-shot windows", unit="window", disable=None, leave=False) as bar:
        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)

        field = infer_field(torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32)), grid, model, meta, config,
                            device=device, progress=progress)
    seconds = time.perf_counter() - start
    field.metadata.update(source=source.description, frame=frame, prior_file=str(prior))
    rendered = None
    if render is not None:
        with torch.no_grad():
            rendered = field.render(grid).cpu()
    outputs = [out] + ([render] if render is not None else [])
    for path in outputs:
        _create_parent(path)
    with atomic_outputs(*outputs) as files:  # the Gaussians and the rendering: both or neither
        field.save(files[0])
        if rendered is not None:
            save_volume(files[1], rendered.numpy() if input_units == "unit" else unit_to_hu(rendered.numpy()),
                        source.spacing, source.origin)
    windows, counts = field.metadata["windows"], field.metadata["gaussians"]
    click.echo(f"{source.description}: {_shape_text(source.array.shape)} voxels at {_shape_text(source.spacing, '.3g')} mm")
    click.echo(f"{meta['architecture']} prior ({'all levels' if config.levels == 'all' else 'level 0'}, "
               f"crop {meta['crop_size'][0]} at {_shape_text(meta['voxel_spacing_mm'], '.3g')} mm): "
               f"{windows['inferred']} of {windows['total']} windows inferred "
               f"({windows['total'] - windows['inferred']} empty), "
               f"{counts['kept']} Gaussians kept of {counts['produced']}, {seconds:.1f} s on {device}")
    if rendered is not None:
        lo, hi = meta["intensity_window_hu"]
        target = to_prior_window(torch.from_numpy(np.asarray(unit, dtype=np.float32)), (lo, hi)) * ((hi - lo) / 4095.0)
        click.echo(f"rendered field vs the volume in the prior's window: PSNR {psnr(rendered, target):.2f} dB "
                   f"(unit attenuation, data range 1); wrote {render}")
    click.echo(f"wrote {out} ({len(field)} Gaussians, world mm, {frame} frame)")


def _benchmark_events(echo):
    """tqdm progress for :func:`ctrecon.pipeline.benchmark.run_benchmark` events (one bar per run; without a
    terminal, one line per evaluation)."""
    from tqdm import tqdm

    state = {"bar": None, "postfix": {}}

    def handle(event):
        if event.kind == "run_start":
            state["bar"], state["postfix"] = None, {}
        elif event.kind == "iteration":
            p = event.progress
            if state["bar"] is None:
                state["bar"] = tqdm(total=p.iterations, desc=f"{event.case} {event.views} views {event.init}",
                                    unit="it", dynamic_ncols=True, leave=False, disable=None)
            if p.iteration:
                state["bar"].update(1)
            if p.evaluation is not None and p.evaluation["psnr"] is not None:
                state["postfix"].update(psnr=f"{p.evaluation['psnr']:.2f}", ssim=f"{p.evaluation['ssim_slice']:.3f}")
                state["bar"].set_postfix(state["postfix"], refresh=False)
                if state["bar"].disable:  # no terminal (a log file): a line per evaluation instead of a bar
                    echo(f"{event.case} {event.views} views {event.init}: iteration {p.iteration}, "
                         f"PSNR {p.evaluation['psnr']:.2f} dB, SSIM {p.evaluation['ssim_slice']:.4f}, "
                         f"{p.seconds:.1f} s")
        elif event.kind == "run_end":
            if state["bar"] is not None:
                state["bar"].close()
            r = event.result
            final = f", final PSNR {r.final['psnr']:.2f} dB" if r.final else ""
            echo(f"{event.case} {event.views} views {event.init}: {r.iterations} iterations in "
                 f"{r.wall_seconds:.1f} s (+{r.init_seconds:.1f} s init){final} -> {event.path}")
        elif event.kind == "scan":
            echo(f"simulated {event.case} at {event.views} views -> {event.path}")

    return handle


@cli.command()
@click.argument("cases", nargs=-1, required=True, type=click.Path(dir_okay=True))
@click.option("--views", default="80,120,160", show_default=True, help="View counts, comma-separated.")
@click.option("--inits", default="fbp,medgmae,medgmae-star", show_default=True,
              help="Initialisations, comma-separated (fbp, r2, medgmae, medgmae-star).")
@click.option("--methods", default="3dgr", show_default=True,
              help="Methods, comma-separated: 3dgr (with every --inits) and classical ones on the same scans: "
                   "sart, os-sart, cgls, fista-tv, fdk.")
@click.option("--classical-iters", type=click.IntRange(min=1), default=None,
              help="Iterations of each classical method (passes for SART / OS-SART) [default: each one's own].")
@click.option("--iters", type=ITERATIONS, default=None,
              help="Iterations per run, or 'auto' [default: auto (preconditioned), 15000 (3dgr)].")
@click.option("--eval-every", type=click.IntRange(min=1), default=None, help="Evaluate every E iterations [default: 100].")
@click.option("--views-per-iter", type=click.IntRange(min=0), default=None,
              help="Random views per iteration (0: all) [default: 40 (preconditioned), 0 (3dgr)].")
@click.option("--n-gaussians", type=click.IntRange(min=1), default=None,
              help="Initial Gaussians (fbp/r2; a cap for the priors) [default: 50000].")
@click.option("--optimizer", type=click.Choice(["preconditioned", "3dgr"]), default=None, help=OPTIMIZER_HELP)
@click.option("--no-densify", is_flag=True, help="Keep the Gaussian count fixed (no clone/split/prune).")
@click.option("--stop-at-thresholds", is_flag=True, help="Stop each run once PSNR 35 dB and SSIM 0.90 are reached.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="JSON file of ReconstructConfig settings (a run's config.json works); options above override.")
@click.option("--prior", type=click.Path(dir_okay=False), default=None,
              help="Prior checkpoint for medgmae / medgmae-star [default: the shipped priors].")
@click.option("--crop", default=None, metavar="Z,Y,X", help="Cut the centre Z,Y,X voxels of every case first.")
@click.option("--shape", default=None, metavar="Z,Y,X", help="Resample every case to this many voxels.")
@click.option("--spacing", default=None, metavar="MM", help="Resample every case to this voxel size: one number or DZ,DY,DX.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Benchmark folder to write.")
@common_options
def benchmark(cases, views, inits, methods, classical_iters, iters, eval_every, views_per_iter, n_gaussians, optimizer, no_densify, stop_at_thresholds,
              config_path, prior, crop, shape, spacing, out, device, seed):
    """The paper's Table 4: simulate each CASE at each view count, reconstruct with every initialisation
    (3DGR-CT) and every classical --methods.

    CASES are CT volumes in HU (NIfTI, DICOM folder, .npy/.npz). Writes OUT/scans/, OUT/runs/<case>_v<views>_<init>/
    and <case>_v<views>_<method>/ (as `ctrecon reconstruct`), OUT/report/ (as `ctrecon report`: table, curves, paired tests) and
    OUT/benchmark.json.

    \b
    Examples:
      ctrecon benchmark ct1.nii.gz ct2.nii.gz --views 80,120,160 --inits fbp,medgmae,medgmae-star --out bench/
      ctrecon benchmark ct.nii.gz --views 120 --iters 2000 --views-per-iter 10 --spacing 6 --device cpu --out b/
      ctrecon benchmark ct.nii.gz --views 120 --crop 48,96,96 --views-per-iter 10 --no-densify --out b/
      ctrecon benchmark ct.nii.gz --views 80,120 --methods 3dgr,os-sart,cgls,fista-tv,fdk --inits fbp --out b/
    """
    from ctrecon.pipeline.benchmark import classical_configs, run_benchmark
    from ctrecon.pipeline.reconstruct import ReconstructConfig

    view_counts = _parse_numbers(views, "--views", count=len(views.split(",")), kind=int)
    init_names = tuple(name.strip() for name in inits.split(",") if name.strip())
    crop = _parse_numbers(crop, "--crop", count=3, kind=int) if crop is not None else None
    shape = _parse_numbers(shape, "--shape", count=3, kind=int) if shape is not None else None
    spacing = _parse_numbers(spacing, "--spacing", count=3, kind=float, allow_single=True) if spacing else None
    if shape is not None and spacing is not None:
        raise InputError("--shape and --spacing are mutually exclusive: give one")
    overrides = {"iterations": iters, "eval_every": eval_every, "views_per_iter": views_per_iter,
                 "n_gaussians": n_gaussians}
    config = _reconstruct_config(config_path, optimizer, overrides, no_densify=no_densify,
                                 stop_at_thresholds=stop_at_thresholds)
    method_names = tuple(name.strip() for name in methods.split(",") if name.strip())
    classical = classical_configs(method_names, config, classical_iters)
    initializers, priors = _prior_initializers(init_names, prior) if "3dgr" in method_names else (init_names, {})
    result = run_benchmark(cases, view_counts, initializers, config, out, device=device, seed=seed, crop=crop, shape=shape,
                           spacing=spacing[0] if spacing and len(spacing) == 1 else spacing, priors=priors,
                           events=_benchmark_events(click.echo), methods=method_names, classical=classical)
    click.echo(result["markdown_table"])
    click.echo(f"\nwrote {out}/ (scans/, runs/, report/ with report.md, table.csv, curves.png, curves_seconds.png, stats.json; "
               "benchmark.json)")


@cli.command()
@click.option("--out", default="ctrecon_demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder to write.")
@click.option("--full", "profile", flag_value="full", default=None,
              help="Full-size case, all views per iteration (the default on a GPU).")
@click.option("--cpu-size", "profile", flag_value="cpu", help="The reduced CPU case (the default without a GPU).")
@click.option("--iters", type=click.IntRange(min=1), default=None,
              help="Iterations per initialisation [default: until the residual stops improving (preconditioned), "
                   "150 on the CPU case (3dgr)].")
@click.option("--optimizer", type=click.Choice(["preconditioned", "3dgr"]), default="preconditioned",
              show_default=True, help="Optimiser of every run (see `ctrecon reconstruct --help`).")
@click.option("--crop", default=None, metavar="Z,Y,X",
              help="Voxels of the centre crop in the CPU case [default: 24,64,64].")
@common_options
def demo(out, profile, iters, optimizer, crop, device, seed):
    """The whole pipeline on the shipped real CT, with no arguments.

    Simulates a 120-view cone-beam scan of data/sample_abdomen_small.nii.gz, reconstructs it with
    FDK and with 3DGR-CT from three initialisations (fbp, zero-shot MedGMAE, zero-shot MedGMAE* with
    the shipped priors) and writes a short report: PSNR/SSIM, iterations and seconds to PSNR 35 dB and
    SSIM 0.90, slices and convergence curves. Without a GPU a reduced case (64x64x24 voxels, a few
    minutes on two cores); on a GPU the full-size case.

    \b
    Examples:
      ctrecon demo
      ctrecon demo --device cuda --out demo_gpu/
      ctrecon demo --iters 500 --out demo_long/
    """
    import time

    from ctrecon.pipeline.demo import CPU_CROP, DEMO_INITS, run_demo

    start = time.perf_counter()
    crop = _parse_numbers(crop, "--crop", count=3, kind=int) if crop is not None else CPU_CROP
    _, priors = _prior_initializers(DEMO_INITS, None)
    summary = run_demo(out, device=device, profile=profile, iterations=iters, optimizer=optimizer, crop=crop, seed=seed,
                       priors=priors, events=_benchmark_events(click.echo))
    click.echo("")
    click.echo(summary["markdown"])
    click.echo(f"demo finished in {time.perf_counter() - start:.0f} s; report: {summary['summary']}")


def _internal_error(err: BaseException):
    """Exit 1 with one line naming an unexpected exception; with ``CTRECON_DEBUG=1``, its traceback instead."""
    if os.environ.get("CTRECON_DEBUG", "") not in ("", "0"):
        raise err
    detail = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    _fail(f"internal error ({type(err).__name__}){': ' + detail if detail else ''}; "
          "set CTRECON_DEBUG=1 for the traceback", 1)


#: Errors of the storage, not of ctrecon: a full disk or quota, a read-only file system.
_STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    """Console entry point. Bad input (an InputError, or a missing, misplaced or forbidden file) exits 2 and
    a usage error its click code, with one line ``ctrecon: error: ...``; Ctrl-C exits 130, and so does SIGTERM
    (what ``timeout``, SLURM and Kubernetes send), which stops a command the same way (a reconstruction writes
    what it reached); anything else is an internal error (:func:`_internal_error`). A reader that leaves early
    (``| head``) gets no message: click exits 1 quietly on a broken pipe."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        _run(argv)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _run(argv) -> None:
    try:
        cli.main(args=argv, prog_name="ctrecon", standalone_mode=False)
    except click.exceptions.Abort as err:  # click turns Ctrl-C, and an EOFError from anywhere, into Abort
        if isinstance(err.__cause__, EOFError):
            _internal_error(err.__cause__)
        _fail("interrupted", 130)
    except click.ClickException as err:
        if isinstance(err, click.UsageError) and err.ctx is not None:
            click.echo(err.ctx.get_usage(), err=True)
        _fail(err.format_message(), err.exit_code if err.exit_code else EXIT_BAD_INPUT)
    except (InputError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        _fail(str(err) if not isinstance(err, OSError) or not err.filename else f"{err.strerror}: {err.filename}")
    except OSError as err:
        if err.errno not in _STORAGE_ERRORS:
            _internal_error(err)
        _fail(f"cannot write the output: {err.strerror}{f' ({err.filename})' if err.filename else ''}; "
              "an earlier output there is left as it was", 1)
    except Exception as err:  # noqa: BLE001 - last resort: one line unless debugging
        _internal_error(err)
    sys.exit(0)


if __name__ == "__main__":
    main()
