"""``ctrecon import``: measured projections (16-bit TIFF intensities with flat and dark fields, MetaImage
line integrals) and their geometry files in, an ordinary scan file out; bad input is one line, exit 2,
nothing written."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ctrecon.core.geometry import ConeBeamGeometry, VolumeGeometry
from ctrecon.core.geometry_files import (DetectorGrid, read_rtk_geometry, rtk_parameters, rtk_scan_geometry,
                                         write_rtk_geometry)
from ctrecon.core.io import load_scan
from ctrecon.core.phantoms import ellipsoid_volume, shepp_logan_3d
from ctrecon.core.units import MU_WATER
from ctrecon.operators.fdk import fdk
from ctrecon.operators.projector import Projector
from ctrecon.pipeline.metrics import psnr

from cli_helpers import run_cli
from test_geometry_files import random_parameters

KAPPA = MU_WATER * 4095 / 1024      # mm⁻¹ per unit attenuation (the model simulate writes intensities with)
GRID = VolumeGeometry((16, 40, 40), (2.0, 2.0, 2.0))
I0, DARK = 30000.0, 120.0


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A scanner's files of a phantom scan: 16-bit TIFF intensities (Poisson), flat, dark, RTK geometry."""
    folder = tmp_path_factory.mktemp("scanner")
    geometry = ConeBeamGeometry.covering(GRID, n_views=60).replace(offDetector=(0.0, 1.5))
    truth = ellipsoid_volume(shepp_logan_3d(GRID, fill=0.8), GRID).astype(np.float32)
    line_integrals = Projector(geometry)(torch.from_numpy(truth)).numpy().astype(np.float64)
    rng = np.random.default_rng(0)
    counts = rng.poisson(I0 * np.exp(-KAPPA * line_integrals)) + DARK
    (folder / "projections").mkdir()
    for view, image in enumerate(counts):        # proj_2 before proj_10: natural order
        Image.fromarray(image.astype(np.uint16)).save(folder / "projections" / f"proj_{view}.tif")
    Image.fromarray((rng.poisson(I0, geometry.nDetector) + DARK).astype(np.uint16)).save(folder / "flat.tif")
    Image.fromarray(np.full(geometry.nDetector, DARK, np.uint16)).save(folder / "dark.tif")
    write_rtk_geometry(folder / "geometry.xml", rtk_parameters(geometry))
    return folder, geometry, truth, line_integrals


def grid_options(grid=GRID):
    return ["--volume-shape", ",".join(map(str, grid.nVoxel)), "--voxel-size", str(grid.dVoxel[0])]


def test_tiff_intensities_with_flat_and_dark_round_trip(measured, tmp_path):
    folder, geometry, truth, line_integrals = measured
    pitch = f"{geometry.dDetector[0]},{geometry.dDetector[1]}"
    code, out, err = run_cli(["import", folder / "projections", "--flat", folder / "flat.tif", "--dark",
                              folder / "dark.tif", "--geometry", folder / "geometry.xml", "--pixel-size", pitch,
                              *grid_options(), "--out", tmp_path / "scan.npz"])
    assert code == 0, err
    assert "60 views" in out and "RTK XML (circular)" in out and "0 transmissions below" in out
    scan = load_scan(tmp_path / "scan.npz")
    assert scan.ground_truth is None and scan.meta["source"] == "import"
    np.testing.assert_allclose(scan.geometry.pixel_positions(), geometry.pixel_positions(), atol=1e-6)
    # photon noise only: the imported line integrals scatter about the true ones by ~1/sqrt(counts)/kappa
    error = scan.projections - line_integrals
    assert abs(float(error.mean())) < 0.01 and float(error.std()) < 3.0 / math.sqrt(I0 * 0.1) / KAPPA
    imported = fdk(scan.projections, scan.geometry).numpy()
    clean = fdk(line_integrals.astype(np.float32), geometry).numpy()
    assert psnr(imported, clean, data_range=1.0) > 35.0
    # and the other commands take it: FDK from the CLI
    code, out, err = run_cli(["fdk", tmp_path / "scan.npz", "--out", tmp_path / "fdk.nii.gz"])
    assert code == 0, err


def test_rtk_metaimage_line_integrals_with_their_origin(measured, tmp_path):
    """An RTK-style stack: physical line integrals in a .mha whose origin holds the detector offset."""
    folder, geometry, truth, line_integrals = measured
    (nv, nu), (dv, du) = geometry.nDetector, geometry.dDetector
    ov, ou = geometry.offDetector
    header = ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              f"DimSize = {nu} {nv} {len(geometry)}\nElementSpacing = {du!r} {dv!r} 1\n"
              f"Offset = {ou - (nu - 1) / 2 * du!r} {ov - (nv - 1) / 2 * dv!r} 0\n"
              "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n")
    (tmp_path / "stack.mha").write_bytes(header.encode() + (line_integrals * KAPPA).astype("<f4").tobytes())
    write_rtk_geometry(tmp_path / "centred.xml", rtk_parameters(geometry.replace(offDetector=(0.0, 0.0))))
    code, out, err = run_cli(["import", tmp_path / "stack.mha", "--geometry", tmp_path / "centred.xml",
                              *grid_options(), "--out", tmp_path / "scan.npz"])
    assert code == 0, err
    scan = load_scan(tmp_path / "scan.npz")
    assert scan.geometry.offDetector == pytest.approx(geometry.offDetector)
    np.testing.assert_allclose(scan.projections, line_integrals, rtol=1e-5, atol=1e-5)


def test_default_grid_covers_the_field_of_view(measured, tmp_path):
    folder, geometry, *_ = measured
    pitch = f"{geometry.dDetector[0]},{geometry.dDetector[1]}"
    code, out, err = run_cli(["import", folder / "projections", "--i0", I0 + DARK, "--geometry",
                              folder / "geometry.xml", "--pixel-size", pitch, "--out", tmp_path / "scan.npz"])
    assert code == 0, err
    assert "from the field of view" in out
    grid = load_scan(tmp_path / "scan.npz").geometry
    assert grid.dVoxel[1] == pytest.approx(geometry.dDetector[1] * geometry.DSO / geometry.DSD)


def _angles_file(path, degrees):
    path.write_text("# gantry angles, degrees\n" + "\n".join(f"{a:.10f}" for a in degrees) + "\n")
    return path


def test_npy_with_tigre_json_and_an_angles_file(measured, tmp_path):
    folder, geometry, truth, line_integrals = measured
    np.save(tmp_path / "stack.npy", (line_integrals * KAPPA).astype(np.float32))
    geo, _ = geometry.to_tigre()
    tigre = {key: (value.tolist() if isinstance(value, np.ndarray) else value) for key, value in vars(geo).items()}
    tigre.update(DSO=float(geo.DSO), DSD=float(geo.DSD))
    (tmp_path / "geo.json").write_text(json.dumps(tigre))
    angles = _angles_file(tmp_path / "angles.txt", np.degrees(geometry.angles))
    code, out, err = run_cli(["import", tmp_path / "stack.npy", "--geometry", tmp_path / "geo.json", "--angles",
                              angles, "--out", tmp_path / "scan.npz"])
    assert code == 0, err
    assert "TIGRE JSON" in out and "from the geometry file" in out
    scan = load_scan(tmp_path / "scan.npz")
    np.testing.assert_allclose(scan.geometry.pixel_positions(), geometry.pixel_positions(), atol=1e-6)
    assert scan.geometry.nVoxel == geometry.nVoxel


def _cases(folder, geometry, tmp):
    """(arguments, message) of bad imports, each next to good files."""
    pitch = f"{geometry.dDetector[0]},{geometry.dDetector[1]}"
    xml, projections = folder / "geometry.xml", folder / "projections"
    odd = tmp / "odd"
    odd.mkdir()
    for view in range(3):
        Image.fromarray(np.zeros((8, 8 + (view == 2)), np.uint16)).save(odd / f"p{view}.tif")
    bright_dark = tmp / "bright_dark.tif"
    Image.fromarray(np.full(geometry.nDetector, 60000, np.uint16)).save(bright_dark)
    short = tmp / "short.npy"
    np.save(short, np.zeros((59, *geometry.nDetector), np.float32))
    nan = tmp / "nan.npy"
    data = np.zeros((60, *geometry.nDetector), np.float32)
    data[3, 4, 5] = np.nan
    np.save(nan, data)
    unknown = tmp / "unknown.xml"
    unknown.write_text(xml.read_text().replace("<GantryAngle>", "<Wobble>1</Wobble><GantryAngle>", 1))
    (tmp / "junk.tif").write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    common = ["--geometry", xml, "--pixel-size", pitch]
    return {
        "mismatched image sizes": ([odd, *common], "p2.tif"),
        "angles count": ([short, *common], "describes 60 views but"),
        "flat darker than dark": ([projections, "--flat", folder / "flat.tif", "--dark", bright_dark, *common],
                                  "not above the dark field"),
        "NaN": ([nan, *common], "NaN"),
        "unreadable file": ([tmp / "junk.tif", *common], "junk.tif"),
        "unknown XML field": ([projections, "--i0", "1e4", "--geometry", unknown, "--pixel-size", pitch],
                              "unknown RTK geometry field <Wobble>"),
        "no pixel size": ([projections, "--i0", "1e4", "--geometry", xml], "--pixel-size"),
        "dark without flat": ([projections, "--dark", folder / "dark.tif", *common], "needs a flat field or i0"),
        "angles beside RTK": ([projections, "--i0", "1e4", *common, "--angles", tmp / "angles.txt"], "drop --angles"),
        "raw without shape": ([short, "--raw-dtype", "float32", *common], "--raw-shape"),
    }


@pytest.mark.parametrize("name", ["mismatched image sizes", "angles count", "flat darker than dark", "NaN",
                                  "unreadable file", "unknown XML field", "no pixel size", "dark without flat",
                                  "angles beside RTK", "raw without shape"])
def test_bad_import_is_one_line_exit_2_and_writes_nothing(measured, tmp_path, name):
    folder, geometry, *_ = measured
    _angles_file(tmp_path / "angles.txt", np.degrees(geometry.angles))
    arguments, message = _cases(folder, geometry, tmp_path)[name]
    out = tmp_path / "out" / "scan.npz"
    code, stdout, err = run_cli(["import", *arguments, "--out", out])
    assert code == 2, (stdout, err)
    assert err.count("\n") == 1 and err.startswith("ctrecon: error:") and message in err, err
    assert not (tmp_path / "out").exists()


def test_a_tilted_orbit_imports_as_cone_vec_and_reconstructs_iteratively(tmp_path):
    """Per-view tilts and offsets (an RTK file the circle cannot describe): SART takes the scan, FDK and
    the Gaussian initialisers (which start from FDK) refuse it in one line."""
    parameters = random_parameters(n_views=24)
    write_rtk_geometry(tmp_path / "tilted.xml", parameters)
    grid = VolumeGeometry((12, 24, 24), (2.0, 2.0, 2.0))
    geometry = rtk_scan_geometry(read_rtk_geometry(tmp_path / "tilted.xml"), DetectorGrid((30, 40), (1.5, 1.5)), grid)
    truth = ellipsoid_volume(shepp_logan_3d(grid, fill=0.8), grid).astype(np.float32)
    np.save(tmp_path / "stack.npy", Projector(geometry)(torch.from_numpy(truth)).numpy())
    code, out, err = run_cli(["import", tmp_path / "stack.npy", "--geometry", tmp_path / "tilted.xml",
                              "--pixel-size", "1.5,1.5", "--line-integral-units", "unit", *grid_options(grid),
                              "--out", tmp_path / "scan.npz"])
    assert code == 0, err
    assert "(cone_vec)" in out
    code, out, err = run_cli(["reconstruct", tmp_path / "scan.npz", "--method", "sart", "--iters", "3",
                              "--out", tmp_path / "sart"])
    assert code == 0, err
    for command in (["fdk", tmp_path / "scan.npz", "--out", tmp_path / "fdk.nii.gz"],
                    ["reconstruct", tmp_path / "scan.npz", "--init", "fbp", "--iters", "2", "--out", tmp_path / "gs"]):
        code, out, err = run_cli(command)
        assert code == 2 and "FDK needs a circular scan" in err and err.count("\n") == 1, err
    assert not (tmp_path / "fdk.nii.gz").exists() and not (tmp_path / "gs").exists()
