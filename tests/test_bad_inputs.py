"""A corpus of bad inputs, one of each class the reliability review found (each once silent, a traceback, an
internal error or a destroyed output): every one must end with exit code 2, one line ``ctrecon: error: ...``
on stderr, no new file, and the earlier output left byte for byte."""
import gzip
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from ctrecon.core.geometry import ConeBeamGeometry, VolumeGeometry
from ctrecon.core.io import Scan, save_scan, save_volume
from ctrecon.operators.projector import Projector

from cli_helpers import run_cli
from test_io import write_series

PREVIOUS = b"an earlier result that must survive"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A small CT in HU, its scan, and the arrays to damage."""
    root = tmp_path_factory.mktemp("good")
    hu = np.full((12, 16, 16), -1000.0, dtype=np.float32)
    hu[3:9, 4:12, 4:12] = 40.0
    save_volume(root / "ct.nii.gz", hu, (2.0, 2.0, 2.0))
    grid = VolumeGeometry(hu.shape, (2.0, 2.0, 2.0))
    geometry = ConeBeamGeometry.covering(grid, n_views=12)
    truth = (hu + 1024.0) / 4095.0
    projections = Projector(geometry)(torch.as_tensor(truth)).numpy()
    save_scan(root / "scan.npz", Scan(projections, geometry.angles, geometry, truth))
    return {"root": root, "hu": hu}


def _rewrite_scan(source, target, **members):
    with np.load(source) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays.update(members)
    np.savez(target, **arrays)


def _case(name, good, tmp):
    """(command arguments, the output path that must not change or appear) of bad-input case ``name``."""
    root, out_scan, out_run = good["root"], tmp / "out.npz", tmp / "run"
    if name == "gzip trailer damaged":
        data = bytearray((root / "ct.nii.gz").read_bytes())
        data[-8] ^= 0x5A  # the CRC-32: nibabel reads the voxels without reaching it
        (tmp / "ct.nii.gz").write_bytes(bytes(data))
        return ["simulate", tmp / "ct.nii.gz", "--views", 8, "--out", out_scan], out_scan
    if name == ".npy renamed .npz":
        np.save(tmp / "ct.npy", good["hu"])
        os.replace(tmp / "ct.npy", tmp / "ct.npz")
        return ["simulate", tmp / "ct.npz", "--views", 8, "--out", out_scan], out_scan
    if name == "voxel size 0 in the header":
        image = nib.Nifti1Image(good["hu"], None)
        image.header.set_zooms((2.0, 0.0, 2.0))
        nib.save(image, tmp / "ct.nii")
        return ["simulate", tmp / "ct.nii", "--views", 8, "--out", out_scan], out_scan
    if name == "DICOM slice without pixels at the end":
        paths = write_series(tmp / "series", good["hu"][:6], shuffle=False)
        dataset = pydicom.dcmread(paths[-1])
        del dataset.PixelData
        dataset.save_as(paths[-1])
        return ["simulate", tmp / "series", "--views", 8, "--out", out_scan], out_scan
    if name == "dose far too low":
        return ["simulate", root / "ct.nii.gz", "--views", 8, "--dose", 1e-3, "--out", out_scan], out_scan
    if name == "ground truth in HU":
        _rewrite_scan(root / "scan.npz", tmp / "scan.npz", ground_truth=good["hu"])
        return ["reconstruct", tmp / "scan.npz", "--method", "cgls", "--iters", 2, "--out", out_run], out_run
    if name == "projections scaled by 1e30":
        with np.load(root / "scan.npz") as archive:
            projections = archive["projections"] * np.float32(1e30)
        _rewrite_scan(root / "scan.npz", tmp / "scan.npz", projections=projections)
        return ["fdk", tmp / "scan.npz", "--out", tmp / "fdk.nii.gz"], tmp / "fdk.nii.gz"
    if name == "config value of the wrong type":
        (tmp / "config.json").write_text(json.dumps({"densify_grad_quantile": "high"}))
        return ["reconstruct", root / "scan.npz", "--config", tmp / "config.json", "--out", out_run], out_run
    if name == "classical config value of the wrong type":
        (tmp / "config.json").write_text(json.dumps({"solver": {"name": "sart", "relaxation": "high"}}))
        return ["reconstruct", root / "scan.npz", "--config", tmp / "config.json", "--out", out_run], out_run
    if name == "truncated Gaussian file":
        (tmp / "g.npz").write_bytes(b"PK\x03\x04" + b"\0" * 40)
        return ["reconstruct", root / "scan.npz", "--init-gaussians", tmp / "g.npz", "--out", out_run], out_run
    if name == "run history not a list":
        (tmp / "badrun").mkdir()
        (tmp / "badrun" / "metrics.json").write_text(json.dumps({"init": "fbp", "iterations": 3, "history": "x"}))
        return ["report", tmp / "badrun", "--out", tmp / "report"], tmp / "report"
    if name == "header claims a huge volume":
        header = nib.Nifti1Header()
        header.set_data_shape((2000, 2000, 2000))
        header.set_data_dtype(np.float32)
        header.set_zooms((1.0, 1.0, 1.0))
        with gzip.open(tmp / "ct.nii.gz", "wb") as handle:  # a 2 kB file whose header promises 32 GB
            header.write_to(handle)
            handle.write(b"\0" * 1024)
        return ["simulate", tmp / "ct.nii.gz", "--views", 8, "--out", out_scan], out_scan
    if name == "grid larger than the memory":
        return ["simulate", root / "ct.nii.gz", "--views", 8, "--shape", "4000,4000,4000", "--out", out_scan], out_scan
    if name == "views larger than the memory":
        return ["simulate", root / "ct.nii.gz", "--views", 2_000_000, "--out", out_scan], out_scan
    if name == "output under a file":
        (tmp / "file").write_text("x")
        return ["reconstruct", root / "scan.npz", "--method", "cgls", "--out", tmp / "file" / "run"], tmp / "file"
    if name == "output folder of someone else's files":
        return ["reconstruct", root / "scan.npz", "--method", "cgls", "--out", tmp / "mine"], tmp / "mine"
    raise AssertionError(name)


CASES = ["gzip trailer damaged", ".npy renamed .npz", "voxel size 0 in the header",
         "DICOM slice without pixels at the end", "dose far too low", "ground truth in HU",
         "projections scaled by 1e30", "config value of the wrong type", "classical config value of the wrong type",
         "truncated Gaussian file", "run history not a list", "header claims a huge volume",
         "grid larger than the memory", "views larger than the memory", "output under a file",
         "output folder of someone else's files"]


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_exit_2_and_leaves_outputs_alone(name, good, tmp_path, monkeypatch):
    monkeypatch.setenv("CTRECON_MEMORY_BYTES", str(2 ** 30))  # a 1 GiB machine: size limits bite before allocation
    args, output = _case(name, good, tmp_path)
    if name == "output folder of someone else's files":
        output.mkdir()
        (output / "thesis.tex").write_bytes(PREVIOUS)
    elif output.suffix in (".npz", ".gz") and name != "output under a file":
        output.write_bytes(PREVIOUS)  # an earlier output of the same name
    elif name == "ground truth in HU" or output.name == "report":
        output.mkdir()
        (output / "metrics.json").write_bytes(PREVIOUS)
    before = _snapshot(tmp_path)
    code, _, err = run_cli(args)
    assert code == 2, (name, err)
    assert err.startswith("ctrecon: error: ") and err.count("\n") == 1, (name, err)
    assert _snapshot(tmp_path) == before, name  # nothing new, nothing changed
    shutil.rmtree(tmp_path, ignore_errors=True)
