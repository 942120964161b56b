import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ctrecon.core.errors import InputError
from ctrecon.core.geometry import VolumeGeometry
from ctrecon.core.io import Scan, load_scan, load_volume, save_scan
from ctrecon.pipeline.metrics import psnr, ssim3d, ssim_slice
from ctrecon.core.phantoms import ellipsoid_volume, shepp_logan_3d
from ctrecon.core.units import unit_to_hu

from cli_helpers import run_cli

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample_abdomen_small.nii.gz"


def console(args, cwd):
    """The installed console script (``python -m ctrecon.cli`` where it is not on PATH)."""
    command = [shutil.which("ctrecon")] if shutil.which("ctrecon") else [sys.executable, "-m", "ctrecon.cli"]
    return subprocess.run(command + [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def assert_bad_input(result, *fragments):
    code, out, err = result
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and lines[-1].startswith("ctrecon: error: ")
    assert not any(line.startswith("ctrecon: error: ") for line in lines[:-1])  # one error line
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def phantom_hu(tmp_path_factory):
    """A small Shepp–Logan head in HU (air -1024) as .npy (1 mm voxels)."""
    volume = VolumeGeometry((12, 24, 20), (1.0, 1.0, 1.0))
    hu = unit_to_hu(ellipsoid_volume(shepp_logan_3d(volume, scale=0.3), volume, supersample=1))
    path = tmp_path_factory.mktemp("phantom") / "head.npy"
    np.save(path, hu.astype(np.float32))
    return path


@pytest.fixture(scope="module")
def small_scan(phantom_hu, tmp_path_factory):
    path = tmp_path_factory.mktemp("scan") / "scan.npz"
    assert run_cli(["simulate", phantom_hu, "--views", 48, "--device", "cpu", "--out", path])[0] == 0
    return path


# --------------------------------------------------------------------------- end to end (subprocess)
@pytest.mark.skipif(not SAMPLE.exists(), reason="shipped sample CT missing")
def test_readme_commands_on_the_sample_ct(tmp_path):
    simulated = console(["simulate", SAMPLE, "--views", 120, "--out", "out/scan.npz"], cwd=tmp_path)
    assert simulated.returncode == 0, simulated.stderr
    assert "120 views" in simulated.stdout and "wrote out/scan.npz" in simulated.stdout
    reconstructed = console(["fdk", "out/scan.npz", "--out", "out/fdk.nii.gz"], cwd=tmp_path)
    assert reconstructed.returncode == 0, reconstructed.stderr
    printed = float(re.search(r"PSNR ([\d.]+) dB", reconstructed.stdout).group(1))
    assert "SSIM 3-D" in reconstructed.stdout and "SSIM slice-mean (3DGR-CT" in reconstructed.stdout
    volume, spacing = load_volume(tmp_path / "out" / "fdk.nii.gz")
    scan = load_scan(tmp_path / "out" / "scan.npz")
    assert volume.shape == (30, 101, 122) and spacing == pytest.approx((3.0, 3.0, 3.0))
    # The NIfTI holds unit attenuation (load_volume reads values as stored) and the printed metrics are its own.
    assert printed == pytest.approx(psnr(volume, scan.ground_truth), abs=0.01)
    assert 28.0 < printed < 40.0
    report = json.loads((tmp_path / "out" / "fdk.json").read_text())
    assert report["metrics"]["psnr_db"] == pytest.approx(printed, abs=0.01)
    assert report["metrics"]["ssim_slice_3dgrct"] == pytest.approx(ssim_slice(volume, scan.ground_truth), abs=1e-6)
    assert report["metrics"]["ssim3d"] > 0.85 and report["filter"] == "ram-lak" and report["seconds"] > 0
    assert report["geometry"]["n_views"] == 120 and report["geometry"]["nVoxel"] == [30, 101, 122]
    # Written in the source's patient frame: the same voxel grid as the input CT.
    from ctrecon.core.io import read_volume
    assert read_volume(tmp_path / "out" / "fdk.nii.gz").origin == pytest.approx(read_volume(SAMPLE).origin, abs=1e-4)


def test_console_bad_input_is_one_line_without_traceback(tmp_path):
    result = console(["simulate", "missing.nii.gz", "--views", 10, "--out", "scan.npz"], cwd=tmp_path)
    assert_bad_input((result.returncode, result.stdout, result.stderr), "missing.nii.gz")
    assert not (tmp_path / "scan.npz").exists()


# --------------------------------------------------------------------------- simulate
def test_simulate_with_noise_resampling_and_new_output_folder(phantom_hu, tmp_path):
    out = tmp_path / "new" / "deeper" / "scan.npz"  # missing folders are created
    code, stdout, _ = run_cli(["simulate", phantom_hu, "--views", 10, "--arc", 240, "--dose", 5e4, "--electronic-noise", 2,
                               "--shape", "8,12,10", "--seed", 3, "--device", "cpu", "--out", out])
    assert code == 0 and "Poisson I0=50000" in stdout and "resampled to 8x12x10" in stdout
    scan = load_scan(out)
    assert scan.projections.shape == (10, 8, 12) and scan.geometry.arc == pytest.approx(math.radians(240))
    assert scan.meta["noise"]["model"] == "poisson+gaussian" and scan.meta["seed"] == 3
    assert scan.geometry.dVoxel == pytest.approx((1.5, 2.0, 2.0))
    again = tmp_path / "again.npz"
    assert run_cli(["simulate", phantom_hu, "--views", 10, "--arc", 240, "--dose", 5e4, "--electronic-noise", 2,
                    "--spacing", "1.5,2,2", "--seed", 3, "--out", again])[0] == 0
    np.testing.assert_array_equal(load_scan(again).projections, scan.projections)  # same seed, same scan


@pytest.mark.parametrize("args, fragments", [
    (["--views", 0], ["--views", "0"]),
    (["--views", 8, "--shape", "8,abc,3"], ["--shape", "8,abc,3"]),
    (["--views", 8, "--shape", "8,12"], ["--shape"]),
    (["--views", 8, "--shape", "8,12,10", "--spacing", "2"], ["--shape", "--spacing", "mutually exclusive"]),
    (["--views", 8, "--spacing", "-2"], ["--spacing"]),
    (["--views", 8, "--electronic-noise", 3], ["--dose"]),
    (["--views", 8, "--arc", 400], ["--arc"]),
    (["--views", 8, "--input-units", "unit"], ["unit attenuation"]),
])
def test_simulate_rejects_bad_options(phantom_hu, tmp_path, args, fragments):
    out = tmp_path / "scan.npz"
    assert_bad_input(run_cli(["simulate", phantom_hu, *args, "--out", out]), *fragments)
    assert not out.exists()


def bad_volume(tmp_path, kind):
    path = tmp_path / ("volume.nii.gz" if kind == "corrupt" else "volume.npy")
    if kind == "corrupt":
        path.write_bytes(b"\x1f\x8b this is not really gzip")
    elif kind == "unit range":
        np.save(path, np.random.default_rng(0).uniform(0, 1, (8, 10, 10)).astype(np.float32))
    elif kind == "2-D":
        np.save(path, np.full((10, 10), -1000.0))
    elif kind == "nan":
        volume = np.full((8, 10, 10), -1000.0)
        volume[3, 4, 5] = np.nan
        np.save(path, volume)
    elif kind == "inf":
        volume = np.full((8, 10, 10), -1000.0)
        volume[0, 0, 0] = np.inf
        np.save(path, volume)
    return path


@pytest.mark.parametrize("kind, fragments", [
    ("corrupt", ["volume.nii.gz is corrupt"]),
    ("unit range", ["Hounsfield", "--input-units unit"]),
    ("2-D", ["3-D"]),
    ("nan", ["NaN"]),
    ("inf", ["Inf"]),
])
def test_simulate_rejects_bad_volumes_and_keeps_existing_output(tmp_path, kind, fragments):
    out = tmp_path / "scan.npz"
    out.write_bytes(b"previous result")
    assert_bad_input(run_cli(["simulate", bad_volume(tmp_path, kind), "--views", 8, "--out", out]), *fragments)
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")) == []


def test_simulate_rejects_missing_file_wrong_suffix_and_file_as_folder(phantom_hu, tmp_path):
    assert_bad_input(run_cli(["simulate", tmp_path / "nope.nii.gz", "--views", 8, "--out", tmp_path / "s.npz"]), "nope.nii.gz")
    assert_bad_input(run_cli(["simulate", phantom_hu, "--views", 8, "--out", tmp_path / "scan.h5"]), ".npz")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_bad_input(run_cli(["simulate", phantom_hu, "--views", 8, "--out", blocker / "scan.npz"]), "output folder")


# --------------------------------------------------------------------------- fdk
def test_fdk_writes_volume_metrics_and_json(small_scan, tmp_path):
    out = tmp_path / "recon" / "head.nii.gz"
    code, stdout, _ = run_cli(["fdk", small_scan, "--filter", "hann", "--device", "cpu", "--out", out])
    assert code == 0
    volume, spacing = load_volume(out)
    scan = load_scan(small_scan)
    assert volume.shape == scan.ground_truth.shape and spacing == pytest.approx(scan.geometry.dVoxel)
    report = json.loads((tmp_path / "recon" / "head.json").read_text())
    assert report["filter"] == "hann" and report["geometry"]["DSO"] == pytest.approx(scan.geometry.DSO)
    assert report["metrics"]["psnr_db"] == pytest.approx(psnr(volume, scan.ground_truth), abs=1e-6)
    assert report["metrics"]["ssim3d"] == pytest.approx(ssim3d(volume, scan.ground_truth), abs=1e-6)
    assert f"PSNR {report['metrics']['psnr_db']:.2f} dB" in stdout and "wrote" in stdout
    assert report["metrics"]["psnr_db"] > 22.0


def test_fdk_without_ground_truth_reports_no_metrics(small_scan, tmp_path):
    scan = load_scan(small_scan)
    bare = tmp_path / "bare.npz"
    save_scan(bare, Scan(scan.projections, scan.angles, scan.geometry))
    code, stdout, _ = run_cli(["fdk", bare, "--out", tmp_path / "bare.nii"])
    assert code == 0 and "PSNR" not in stdout
    assert json.loads((tmp_path / "bare.json").read_text())["metrics"] is None
    assert load_volume(tmp_path / "bare.nii")[0].shape == scan.geometry.nVoxel


def scan_variant(small_scan, tmp_path, kind):
    scan = load_scan(small_scan)
    path = tmp_path / f"{kind}.npz"
    geometry = scan.geometry
    if kind == "misses volume":
        save_scan(path, Scan(scan.projections, scan.angles, geometry.replace(offOrigin=(900.0, 0.0, 0.0))))
    elif kind == "too short":
        short = geometry.replace(arc=math.pi)
        save_scan(path, Scan(scan.projections, scan.angles, short))
    elif kind == "inconsistent":
        arrays = dict(np.load(small_scan))
        arrays["projections"] = arrays["projections"][:, :, :-2]
        np.savez(path, **arrays)
    elif kind == "corrupt":
        path.write_bytes(b"PK\x03\x04 truncated zip")
    elif kind == "not a scan":
        np.savez(path, volume=np.zeros((4, 4, 4)))
    return path


@pytest.mark.parametrize("kind, fragments", [
    ("misses volume", ["does not see"]),
    ("too short", ["arc"]),
    ("inconsistent", ["shape"]),
    ("corrupt", ["corrupt.npz"]),
    ("not a scan", ["projections"]),
])
def test_fdk_rejects_bad_scans_and_keeps_existing_output(small_scan, tmp_path, kind, fragments):
    out = tmp_path / "fdk.nii.gz"
    out.write_bytes(b"previous result")
    assert_bad_input(run_cli(["fdk", scan_variant(small_scan, tmp_path, kind), "--out", out]), *fragments)
    assert out.read_bytes() == b"previous result" and not (tmp_path / "fdk.json").exists()


def test_fdk_rejects_missing_scan_bad_suffix_and_filter(small_scan, tmp_path):
    assert_bad_input(run_cli(["fdk", tmp_path / "none.npz", "--out", tmp_path / "x.nii.gz"]), "none.npz")
    assert_bad_input(run_cli(["fdk", small_scan, "--out", tmp_path / "x.mha"]), ".nii")
    assert_bad_input(run_cli(["fdk", small_scan, "--filter", "wiener", "--out", tmp_path / "x.nii.gz"]), "wiener")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["simulate", "fdk"])
def test_help_has_examples(command):
    code, stdout, _ = run_cli([command, "--help"])
    assert code == 0 and "Examples:" in stdout and f"ctrecon {command} " in stdout and "--device" in stdout


def test_closed_stdout_exits_quietly():
    """`ctrecon ... | head -1`: a reader that leaves early gets no traceback and no error line."""
    proc = subprocess.Popen([sys.executable, "-m", "ctrecon.cli", "report", "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait() == 1
    assert stderr == ""


# --------------------------------------------------------------------------- errors: bad input vs bugs
@pytest.mark.parametrize("error, code, expected", [
    (InputError("the runs disagree"), 2, "ctrecon: error: the runs disagree"),
    (FileNotFoundError(2, "No such file or directory", "runs/a"), 2, "ctrecon: error: No such file or directory: runs/a"),
    (RuntimeError("kernel failed\nsecond line of detail"), 1,
     "ctrecon: error: internal error (RuntimeError): kernel failed; set CTRECON_DEBUG=1 for the traceback"),
    (ValueError("not from the user"), 1,  # only InputError is bad input; a bare ValueError is a bug
     "ctrecon: error: internal error (ValueError): not from the user; set CTRECON_DEBUG=1 for the traceback"),
    (EOFError(), 1,  # click turns an EOFError into Abort: still an internal error, not an interruption
     "ctrecon: error: internal error (EOFError); set CTRECON_DEBUG=1 for the traceback"),
    (KeyboardInterrupt(), 130, "ctrecon: error: interrupted"),
])
def test_bad_input_exits_2_and_unexpected_errors_exit_1_with_one_line(monkeypatch, tmp_path, error, code, expected):
    import ctrecon.pipeline.report

    def build_report(*args, **kwargs):
        raise error

    monkeypatch.delenv("CTRECON_DEBUG", raising=False)
    monkeypatch.setattr(ctrecon.pipeline.report, "build_report", build_report)
    result, stdout, stderr = run_cli(["report", tmp_path, "--out", tmp_path / "report"])
    assert (result, stdout, stderr.strip().splitlines()) == (code, "", [expected])
    assert "Traceback" not in stderr and not (tmp_path / "report").exists()


def test_debug_variable_shows_the_traceback_of_an_unexpected_error(monkeypatch, tmp_path):
    import ctrecon.pipeline.report

    def build_report(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(ctrecon.pipeline.report, "build_report", build_report)
    monkeypatch.setenv("CTRECON_DEBUG", "1")
    with pytest.raises(RuntimeError, match="kernel failed"):
        run_cli(["report", tmp_path, "--out", tmp_path / "report"])


def test_fdk_writes_its_volume_and_json_together(phantom_hu, tmp_path, monkeypatch):
    import ctrecon.core.io as io_module

    scan = tmp_path / "scan.npz"
    assert run_cli(["simulate", phantom_hu, "--views", 8, "--out", scan])[0] == 0
    out = tmp_path / "fdk.nii.gz"
    assert run_cli(["fdk", scan, "--out", out])[0] == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io_module, "write_json", full_disk)  # the volume is written first
    code, _, err = run_cli(["fdk", scan, "--filter", "hann", "--out", out])
    assert code == 1 and "No space left on device" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # fdk.nii.gz not replaced alone
