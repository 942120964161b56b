"""Classical methods as runs (ctrecon.pipeline.classical): the run folder and metrics schema of 3DGR-CT, the
CLI's --method, Ctrl-C, the report and the benchmark over both kinds of run."""
import json
import os

import numpy as np
import pytest
import torch

from ctrecon.core.errors import InputError
from ctrecon.core.geometry import ConeBeamGeometry, VolumeGeometry
from ctrecon.core.io import Scan, save_scan
from ctrecon.core.phantoms import Ellipsoid, ellipsoid_volume
from ctrecon.operators.fdk import fdk
from ctrecon.operators.projector import Projector
from ctrecon.pipeline.classical import METHODS, ClassicalConfig, reconstruct_classical
from ctrecon.pipeline.metrics import evaluate

from cli_helpers import run_cli


@pytest.fixture(scope="module")
def scan():
    """16³ grid of 2 mm voxels, two ellipsoids, 40 cone-beam views projected by the project's projector."""
    grid = VolumeGeometry((16, 16, 16), (2.0, 2.0, 2.0))
    geometry = ConeBeamGeometry.covering(grid, n_views=40)
    truth = ellipsoid_volume([Ellipsoid((0.0, 0.0, 0.0), (11.0, 9.0, 10.0), 0.25),
                              Ellipsoid((3.0, 2.0, 1.0), (4.0, 3.0, 4.5), 0.2)], grid)
    projections = Projector(geometry)(torch.as_tensor(truth)).numpy()
    return Scan(projections, geometry.angles, geometry, truth, {"case": "ellipsoids"})


@pytest.fixture(scope="module")
def scan_file(scan, tmp_path_factory):
    path = tmp_path_factory.mktemp("scan") / "phantom.npz"
    save_scan(path, scan)
    return path


@pytest.mark.parametrize("method", ["sart", "os-sart", "cgls", "fista-tv"])
def test_every_method_improves_on_its_start_and_records_like_3dgr(scan, method):
    config = ClassicalConfig.from_dict({"solver": method, "iterations": 6})
    result = reconstruct_classical(scan, config=config, seed=0)
    assert result.method == method and result.init == "zeros" and result.field is None and result.iterations == 6
    assert [h["iteration"] for h in result.history] == list(range(7))
    assert result.history[-1]["psnr"] > result.history[0]["psnr"] + 10  # from zeros
    assert result.final == {k: result.history[-1][k] for k in result.final}
    assert result.final == pytest.approx(evaluate(result.volume, scan.ground_truth))
    metrics = result.to_metrics()
    assert metrics["method"] == method and set(metrics["thresholds"]) == {"psnr35", "ssim90"}
    assert metrics["timing"]["solve"] > 0 and metrics["wall_seconds"] >= metrics["timing"]["solve"]
    again = reconstruct_classical(scan, config=config, seed=0)
    assert torch.equal(again.volume, result.volume)  # deterministic for a seed


def test_fdk_run_and_fdk_start(scan):
    result = reconstruct_classical(scan, config=ClassicalConfig.from_dict({"solver": "fdk"}))
    expected = fdk(scan.projections, scan.geometry)
    assert result.iterations == 0 and result.init == "none" and result.init_seconds > 0
    np.testing.assert_allclose(result.volume.numpy(), expected.numpy(), rtol=1e-6, atol=1e-7)
    started = reconstruct_classical(scan, config=ClassicalConfig.from_dict(
        {"solver": "cgls", "start": "fdk", "iterations": 2}))
    assert started.init == "fdk" and started.history[0]["psnr"] == pytest.approx(result.final["psnr"], abs=1e-4)


def test_targets_interrupt_and_settings(scan):
    config = ClassicalConfig.from_dict({"solver": "cgls", "iterations": 50, "stop_at_psnr": 25.0})
    result = reconstruct_classical(scan, config=config)
    assert result.stop_reason == "psnr target" and result.final["psnr"] >= 25.0 and result.iterations < 50

    def interrupt(progress):
        if progress.iteration == 3:
            raise KeyboardInterrupt

    stopped = reconstruct_classical(scan, config=ClassicalConfig.from_dict({"solver": "sart", "iterations": 9}),
                                    callback=interrupt)
    assert stopped.interrupted and stopped.iterations == 3 and stopped.history[-1]["iteration"] == 3
    for bad, message in (({"solver": "nope"}, "unknown method"), ({"solver": "cgls", "subsets": 4}, "does not apply"),
                         ({"solver": "sart", "iterations": 0}, "positive integer"),
                         ({"solver": "fdk", "start": "fdk"}, "no start"), ({"solver": "cgls", "bogus": 1}, "unknown")):
        with pytest.raises(InputError, match=message):
            ClassicalConfig.from_dict(bad)
    assert ClassicalConfig.from_dict(ClassicalConfig.from_dict({"solver": "os-sart", "subsets": 5}).to_dict()) \
        == ClassicalConfig.from_dict({"solver": "os-sart", "subsets": 5})


def test_cli_method_writes_a_run_the_report_reads(scan_file, tmp_path):
    from ctrecon.cli import RECONSTRUCTION_METHODS

    assert RECONSTRUCTION_METHODS == ("3dgr", *METHODS)
    out = tmp_path / "ossart"
    code, stdout, err = run_cli(["reconstruct", scan_file, "--method", "os-sart", "--iters", 3, "--subsets", 5,
                                 "--out", out])
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["config.json", "curves.png", "metrics.json", "volume.nii.gz"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "os-sart" and metrics["iterations"] == 3 and metrics["case"] == "ellipsoids"
    assert "OS-SART: 3 iterations" in stdout
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["solver"]["name"] == "os-sart" and config["solver"]["subsets"] == 5
    again = tmp_path / "again"  # a classical run's config.json names its method
    code, _, err = run_cli(["reconstruct", scan_file, "--config", out / "config.json", "--out", again])
    assert code == 0, err
    assert json.loads((again / "metrics.json").read_text())["method"] == "os-sart"
    flat = tmp_path / "flat.json"  # the flat form names the method as "solver"; the file's start is kept
    flat.write_text(json.dumps({"solver": "cgls", "iterations": 2, "start": "fdk"}))
    code, _, err = run_cli(["reconstruct", scan_file, "--config", flat, "--out", tmp_path / "flat_run"])
    assert code == 0, err
    flat_metrics = json.loads((tmp_path / "flat_run" / "metrics.json").read_text())
    assert (flat_metrics["method"], flat_metrics["init"], flat_metrics["iterations"]) == ("cgls", "fdk", 2)
    gaussians = tmp_path / "3dgr"
    code, _, err = run_cli(["reconstruct", scan_file, "--iters", 4, "--n-gaussians", 300, "--max-gaussians", 600,
                            "--eval-every", 2, "--out", gaussians])
    assert code == 0, err
    code, stdout, err = run_cli(["report", out, gaussians, "--out", tmp_path / "report"])
    assert code == 0, err
    assert "| os-sart | zeros |" in stdout and "| 3dgr | fbp |" in stdout


def test_cli_refuses_options_of_the_other_kind_before_any_work(scan_file, tmp_path):
    cases = [["--method", "cgls", "--prior", "p.pt"], ["--method", "sart", "--n-gaussians", 10],
             ["--method", "sart", "--iters", "auto"], ["--subsets", 4], ["--method", "cgls", "--subsets", 4],
             ["--method", "sart", "--init", "medgmae"], ["--method", "sart", "--relaxation", 2.5],
             ["--method", "cgls", "--validation-views", 4]]
    for options in cases:
        code, _, err = run_cli(["reconstruct", scan_file, *options, "--out", tmp_path / "run"])
        assert code == 2, options
        assert err.startswith("ctrecon: error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_benchmark_runs_classical_methods_beside_3dgr(tmp_path):
    from ctrecon.pipeline.benchmark import run_benchmark
    from ctrecon.pipeline.reconstruct import ReconstructConfig

    rng = np.random.default_rng(0)
    volume = np.full((12, 16, 16), -1000.0, dtype=np.float32)
    volume[3:9, 4:12, 4:12] = 40.0 + rng.normal(0, 5, (6, 8, 8))
    path = tmp_path / "tiny.npy"
    np.save(path, volume)
    config = ReconstructConfig.from_dict({"iterations": 3, "n_gaussians": 200, "max_gaussians": 400, "eval_every": 3,
                                          "strategy": None})
    summary = run_benchmark([str(path)], (20,), ("fbp",), config, tmp_path / "bench", spacing=None,
                            methods=("3dgr", "cgls", "fdk"))
    arms = [row["arm"] for row in summary["groups"]]
    assert arms == ["fbp", "cgls", "fdk"]
    assert sorted(os.listdir(tmp_path / "bench" / "runs")) == ["tiny_v20_cgls", "tiny_v20_fbp", "tiny_v20_fdk"]
    assert summary["benchmark"]["methods"] == ["3dgr", "cgls", "fdk"]
