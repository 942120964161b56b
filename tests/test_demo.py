"""`ctrecon demo` (reduced to a few iterations) and `ctrecon benchmark`'s input checks."""
import json
from pathlib import Path

import numpy as np
import pytest

from ctrecon.pipeline.demo import CPU_CROP, CPU_MAX_ITERATIONS, DEMO_CASE, DEMO_INITS, demo_config
from ctrecon.methods.gaussians import GaussianField

from cli_helpers import run_cli

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_the_whole_pipeline_and_reports(tmp_path):
    out = tmp_path / "demo"
    code, stdout, stderr = run_cli(["demo", "--iters", "3", "--crop", "16,40,40", "--out", out, "--device", "cpu"])
    assert code == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert stdout.rstrip().endswith(f"report: {out / 'summary.md'}")
    assert summary["profile"] == "cpu" and summary["views"] == 120
    assert [row["init"] for row in summary["inits"]] == list(DEMO_INITS)
    for name in ("slices.png", "summary.md", "report/curves.png", "report/report.md", "report/table.csv"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "summary.md").read_text()
    for init in DEMO_INITS:
        assert f"| {init} |" in table
    assert "to PSNR 35 dB" in table and "FDK: PSNR" in table
    assert stdout.count("iteration 3, PSNR") == len(DEMO_INITS)  # no terminal: evaluations as log lines
    for row in summary["inits"]:
        assert row["iterations"] == 3 and np.isfinite(row["final"]["psnr"]) and row["n_gaussians_initial"] > 0
        meta = json.loads((Path(row["run"]) / "config.json").read_text())
        assert meta["views"] == 120 and meta["case"] == "sample_abdomen_centre"
        if row["init"] != "fbp":  # the shipped priors, zero-shot on the FDK
            assert meta["prior"].endswith(f"data/priors/{row['init']}.pt")
            field = GaussianField.load(Path(row["run"]) / "gaussians.npz")
            assert field.metadata["prior"]["architecture"] in ("medgmae", "medgmae-star")
    assert summary["fdk"]["psnr"] > 25
    # The zero-shot fields fit the FDK of the scan far better than an empty volume does (~12 dB), and
    # a few iterations do not make them diverge.
    for row in summary["inits"][1:]:
        assert row["initial_psnr"] > 20 and row["final"]["psnr"] > row["initial_psnr"] - 1


def test_demo_profiles():
    cpu, full = demo_config("cpu", optimizer="3dgr"), demo_config("full", optimizer="3dgr")
    assert cpu.schedule.views_per_iter == 10 and full.schedule.views_per_iter == 0
    assert full.schedule.iterations > cpu.schedule.iterations
    cpu, full = demo_config("cpu"), demo_config("full")  # the default optimiser: its own stopping rule
    assert cpu.optimizer.method == full.optimizer.method == "preconditioned"
    assert cpu.schedule.iterations == full.schedule.iterations == "auto"
    assert cpu.iteration_cap == CPU_MAX_ITERATIONS and full.schedule.views_per_iter == 0
    assert demo_config("cpu", 40).schedule.iterations == 40
    assert DEMO_CASE.is_file() and all(c <= n for c, n in zip(CPU_CROP, (30, 101, 122)))
    with pytest.raises(ValueError, match="profile"):
        demo_config("tiny")


def test_benchmark_rejects_bad_input_before_any_work(tmp_path):
    out = tmp_path / "bench"
    code, _, stderr = run_cli(["benchmark", DEMO_CASE, "--inits", "fbp,nope", "--out", out])
    assert code == 2 and "unknown initializer 'nope'" in stderr and not out.exists()
    code, _, stderr = run_cli(["benchmark", DEMO_CASE, DEMO_CASE, "--inits", "fbp", "--out", out])
    assert code == 2 and "case names must differ" in stderr and not out.exists()
    code, _, stderr = run_cli(["benchmark", DEMO_CASE, "--views", "80,x", "--out", out])
    assert code == 2 and "--views" in stderr and not out.exists()
    code, _, stderr = run_cli(["benchmark", DEMO_CASE, "--inits", "fbp", "--prior", tmp_path / "p.pt", "--out", out])
    assert code == 2 and "--prior" in stderr and not out.exists()
    bad_config = tmp_path / "config.json"
    bad_config.write_text("[1, 2]")
    code, _, stderr = run_cli(["benchmark", DEMO_CASE, "--inits", "fbp", "--config", bad_config, "--out", out])
    assert code == 2 and "must hold a JSON object" in stderr and not out.exists()
    bad_config.write_text('{"iterations": 5, "learning_rate": 1}')
    code, _, stderr = run_cli(["benchmark", DEMO_CASE, "--inits", "fbp", "--config", bad_config, "--out", out])
    assert code == 2 and "learning_rate" in stderr and not out.exists()
    code, _, stderr = run_cli(["benchmark", DEMO_CASE, "--inits", "fbp", "--crop", "31,8,8", "--out", out])
    assert code == 2 and "crop must be 3 sizes" in stderr and not out.exists()


def test_benchmark_command_crops_and_passes_its_settings(tmp_path):
    out = tmp_path / "bench"
    code, stdout, stderr = run_cli(["benchmark", DEMO_CASE, "--views", "16,24", "--inits", "fbp", "--crop", "12,24,20",
                                    "--iters", "2", "--views-per-iter", "4", "--n-gaussians", "300", "--no-densify",
                                    "--device", "cpu", "--out", out])
    assert code == 0, stderr
    bench = json.loads((out / "benchmark.json").read_text())
    assert bench["crop"] == [12, 24, 20] and bench["config"]["density"]["strategy"] is None
    assert bench["config"]["schedule"]["views_per_iter"] == 4 and bench["config"]["schedule"]["iterations"] == 2
    for views in (16, 24):
        run = json.loads((out / "runs" / f"sample_abdomen_small_v{views}_fbp" / "config.json").read_text())
        assert run["geometry"]["nVoxel"] == [12, 24, 20] and run["views"] == views
    assert (out / "report" / "report.md").is_file() and "| fbp | 16 |" in stdout
