"""Report on synthetic runs: group statistics, censored times to a threshold, paired tests, files, CLI; and the
run folders themselves (ctrecon.pipeline.runs), written and read back."""
import csv
import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from ctrecon.core.errors import InputError
from ctrecon.pipeline.report import build_report
from ctrecon.pipeline.runs import RUN_FILES, load_run, write_run

CASES = ("case_a", "case_b", "case_c")


def _history(final_psnr, iterations, seed):
    rng = np.random.default_rng(seed)
    its = np.arange(0, iterations + 1, 50)
    psnr = 20.0 + (final_psnr - 20.0) * (1 - np.exp(-its / 150.0))
    return [{"iteration": int(i), "seconds": float(i) * 0.1, "loss": None if i == 0 else float(rng.uniform(0.1, 1)),
             "psnr": float(p), "ssim3d": float(p) / 40.0, "ssim_slice": float(p) / 39.0, "n_gaussians": 100}
            for i, p in zip(its, psnr)]


def _write_run(root, name, *, init, views, case, wall, psnr35, ssim90, final_psnr, iterations=400, seed=0,
               views_in_config=False, method=None, psnr_threshold=None):
    run = root / name
    run.mkdir()
    threshold = lambda it: None if it is None else {"iteration": it, "seconds": it * 0.1}  # noqa: E731
    psnr_key = "psnr35" if psnr_threshold is None else f"psnr{psnr_threshold:g}"
    metrics = {"init": init, "iterations": iterations, "wall_seconds": wall, "eval_seconds": 1.0,
               "n_gaussians": 100, "final": {"psnr": final_psnr, "ssim3d": final_psnr / 40.0,
                                             "ssim_slice": final_psnr / 39.0},
               "thresholds": {psnr_key: threshold(psnr35), "ssim90": threshold(ssim90)},
               "history": _history(final_psnr, iterations, seed), "ssim_threshold_metric": "ssim_slice"}
    if method is not None:
        metrics["method"] = method
    if psnr_threshold is not None:
        metrics.update(psnr_threshold=psnr_threshold, ssim_threshold=0.9)
    config = {"init": init}
    if views_in_config:  # the report falls back to config.json for views and case
        config.update(views=views, case=case)
    else:
        metrics.update(views=views, case=case)
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "config.json").write_text(json.dumps(config))
    return str(run), metrics


@pytest.fixture()
def synthetic_runs(tmp_path):
    """fbp and r2 runs on three cases at 60 and 120 views; one fbp/60 run never reaches 35 dB."""
    rng = np.random.default_rng(1)
    runs = {}
    for views in (60, 120):
        for c, case in enumerate(CASES):
            for init, base in (("fbp", 300), ("r2", 200)):
                psnr35 = int(base + rng.integers(0, 100)) if not (init == "fbp" and views == 60 and c == 2) else None
                path, metrics = _write_run(
                    tmp_path, f"{init}_{views}_{case}", init=init, views=views, case=case,
                    wall=float(rng.uniform(10, 20)), psnr35=psnr35, ssim90=None if init == "fbp" else psnr35,
                    final_psnr=float(rng.uniform(34, 38)), seed=c, views_in_config=(c == 0))
                runs[(init, views, case)] = (path, metrics)
    return runs


def test_group_statistics_and_censored_medians(synthetic_runs, tmp_path):
    out = tmp_path / "report"
    result = build_report([p for p, _ in synthetic_runs.values()], str(out))
    rows = {(r["arm"], r["views"]): r for r in result["groups"]}
    assert list(rows) == [("fbp", 60), ("r2", 60), ("fbp", 120), ("r2", 120)]
    for (init, views), row in rows.items():
        members = [m for (i, v, _), (_, m) in synthetic_runs.items() if (i, v) == (init, views)]
        walls = [m["wall_seconds"] for m in members]
        assert row["n_runs"] == 3 and row["method"] == "3dgr" and row["init"] == init
        assert row["wall_seconds_mean"] == pytest.approx(np.mean(walls))
        assert row["wall_seconds_std"] == pytest.approx(np.std(walls, ddof=1))
        reached = sorted(m["thresholds"]["psnr35"]["iteration"] for m in members
                         if m["thresholds"]["psnr35"] is not None)
        assert row["psnr35_reached"] == len(reached)
        # the unreached run ranks last: of [a, b, never] the median is b; of [a, b, c] it is b too
        assert row["psnr35_iteration_median"] == reached[1] and row["psnr35_iteration_censored"] is False
        assert row["psnr35_seconds_median"] == pytest.approx(reached[1] * 0.1)
        finals = [m["final"]["psnr"] for m in members]
        assert row["final_psnr_std"] == pytest.approx(np.std(finals, ddof=1))
    assert rows[("fbp", 60)]["psnr35_reached"] == 2
    never = rows[("fbp", 120)]
    assert never["ssim90_reached"] == 0 and never["ssim90_iteration_censored"] is True
    assert never["ssim90_iteration_median"] == 400  # the budget: a lower bound

    table = result["markdown_table"]
    assert "iters to PSNR 35 dB" in table and "SSIM axial as 3DGR-CT's code (range 2)" in table
    fbp60 = next(line for line in table.splitlines() if line.startswith("| 3dgr | fbp | 60 |"))
    assert "(1/3 not reached)" in fbp60 and "≥ 400 (3/3 not reached)" in fbp60
    for name in ("report.md", "table.csv", "curves.png", "curves_seconds.png", "stats.json"):
        assert (out / name).stat().st_size > 0
    with open(out / "table.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert len(csv_rows) == 4 and csv_rows[0]["arm"] == "fbp" and csv_rows[0]["psnr35_reached"] == "2"
    assert csv_rows[0]["ssim90_iteration_censored"] == "True"
    saved = json.loads((out / "stats.json").read_text())
    assert saved["groups"] == result["groups"] and saved["tests"] == result["tests"]
    stops = (out / "report.md").read_text().split("## Where each run stopped")[1].split("##")[0]
    assert stops.count("\n| ") == 1 + len(synthetic_runs)  # a header and one row per run
    for _, metrics in synthetic_runs.values():
        assert f"| {metrics['iterations']} | {metrics.get('stop_reason', 'completed')} | {metrics['final']['psnr']:.2f} |" \
            in stops


def test_paired_tests_per_view_count_with_censoring(synthetic_runs, tmp_path):
    result = build_report([p for p, _ in synthetic_runs.values()], str(tmp_path / "report"))
    tests = {(t["quantity"], t["views"]): t for t in result["tests"]}
    # never pooled over view counts: the view counts of one case are not independent pairs
    assert set(tests) == {(q, v) for q in ("iterations", "seconds", "final_psnr") for v in (60, 120)}
    for views in (60, 120):
        a = [synthetic_runs[("fbp", views, c)][1] for c in CASES]
        b = [synthetic_runs[("r2", views, c)][1] for c in CASES]
        finals = stats.wilcoxon([m["final"]["psnr"] for m in a], [m["final"]["psnr"] for m in b])
        test = tests[("final_psnr", views)]
        assert (test["arm_a"], test["arm_b"], test["n_cases"]) == ("fbp", "r2", 3)
        assert test["statistic"] == pytest.approx(finals.statistic) and test["p"] == pytest.approx(finals.pvalue)
        # sign test by hand: a run that never reached 35 dB loses to one that did
        its = lambda m: math.inf if m["thresholds"]["psnr35"] is None else m["thresholds"]["psnr35"]["iteration"]  # noqa: E731
        wins_a = sum(its(x) < its(y) for x, y in zip(a, b))
        wins_b = sum(its(x) > its(y) for x, y in zip(a, b))
        test = tests[("iterations", views)]
        assert (test["wins_a"], test["wins_b"], test["ties"]) == (wins_a, wins_b, 3 - wins_a - wins_b)
        assert test["p"] == pytest.approx(stats.binomtest(wins_a, wins_a + wins_b).pvalue)
        assert test["label"] == "iterations to PSNR 35 dB"
    censored = tests[("iterations", 60)]
    assert censored["wins_b"] >= 1  # case_c: r2 reached 35 dB, fbp did not: counted, not dropped


def test_one_case_skips_the_test_and_seeds_are_reduced(tmp_path):
    paths = [_write_run(tmp_path, "fbp_s0", init="fbp", views=80, case="x", wall=5, psnr35=100, ssim90=None,
                        final_psnr=36.0)[0],
             _write_run(tmp_path, "fbp_s1", init="fbp", views=80, case="x", wall=7, psnr35=200, ssim90=None,
                        final_psnr=37.0)[0],
             _write_run(tmp_path, "r2_s0", init="r2", views=80, case="x", wall=6, psnr35=None, ssim90=None,
                        final_psnr=35.5)[0]]
    result = build_report(paths, str(tmp_path / "out"))
    final = next(t for t in result["tests"] if t["quantity"] == "final_psnr")
    assert final["n_cases"] == 1 and final["p"] is None and "1 case(s)" in final["note"]
    assert final["median_a"] == pytest.approx(36.5)  # two seeds of the same (case, views, arm) averaged
    iters = next(t for t in result["tests"] if t["quantity"] == "iterations")
    assert iters["n_cases"] == 1 and iters["censored_b"] is True and iters["median_b"] == 400
    r2 = next(r for r in result["groups"] if r["arm"] == "r2")
    assert r2["psnr35_reached"] == 0 and r2["wall_seconds_std"] is None
    assert "| 3dgr | r2 | 80 | 1 | 6.0 | ≥ 400 (1/1 not reached) |" in result["markdown_table"]


def test_thresholds_named_by_their_values_and_classical_arms(tmp_path):
    paths = [_write_run(tmp_path, f"{m}_{c}", init="zeros" if m != "3dgr" else "fbp", method=m, views=80, case=c,
                        wall=5.0, psnr35=100 if m != "cgls" else None, ssim90=None, final_psnr=31.0,
                        psnr_threshold=30.0)[0]
             for m in ("3dgr", "sart", "cgls") for c in ("a", "b")]
    result = build_report(paths, str(tmp_path / "out"))
    assert [r["arm"] for r in result["groups"]] == ["fbp", "sart", "cgls"]
    assert result["thresholds"][0] == {"key": "psnr30", "label": "PSNR 30 dB"}
    assert "iters to PSNR 30 dB" in result["markdown_table"] and "35 dB" not in result["markdown_table"]
    assert result["groups"][1]["psnr30_iteration_median"] == 100 and result["groups"][2]["psnr30_reached"] == 0
    assert "| sart | zeros | 80 |" in result["markdown_table"]
    mixed = _write_run(tmp_path, "other", init="fbp", views=80, case="a", wall=5.0, psnr35=1, ssim90=1,
                       final_psnr=36.0)[0]  # evaluated at the default 35 dB
    with pytest.raises(InputError, match="different thresholds"):
        build_report([*paths, mixed], str(tmp_path / "out2"))


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="run folder not found"):
        load_run(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="metrics file not found"):
        load_run(str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read"):
        load_run(str(tmp_path / "broken"))
    path = _write_run(tmp_path, "ok", init="fbp", views=80, case="x", wall=5, psnr35=1, ssim90=1, final_psnr=36.0)[0]
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        build_report([path], str(tmp_path / "file"))


def test_cli_report(tmp_path):
    from ctrecon.cli import main

    paths = [_write_run(tmp_path, f"run{i}", init=init, views=80, case=f"c{i % 2}", wall=5.0 + i, psnr35=100 + i,
                        ssim90=50, final_psnr=35.0 + i)[0] for i, init in enumerate(("fbp", "fbp", "r2", "r2"))]
    out = tmp_path / "rep"
    with pytest.raises(SystemExit) as exit_info:
        main(["report", *paths, "--out", str(out)])
    assert exit_info.value.code == 0
    assert sorted(os.listdir(out)) == ["curves.png", "curves_seconds.png", "report.md", "stats.json", "table.csv"]
    tests = json.loads((out / "stats.json").read_text())["tests"]
    final = [t for t in tests if t["quantity"] == "final_psnr"]
    expected = stats.wilcoxon([35.0, 36.0], [37.0, 38.0]).pvalue  # fbp c0, c1 against r2 c0, c1
    assert final and all(t["n_cases"] == 2 and t["p"] == pytest.approx(expected) for t in final)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "nope"), "--out", str(out)])
    assert exit_info.value.code == 2


def test_run_folder_written_is_read_back(tmp_path):
    """write_run's folder, read by load_run: the same metrics, views and case, and the volume."""
    import torch

    from ctrecon.core.geometry import ConeBeamGeometry, VolumeGeometry
    from ctrecon.core.io import Scan
    from ctrecon.core.phantoms import Ellipsoid, ellipsoid_volume
    from ctrecon.operators.projector import Projector
    from ctrecon.pipeline.reconstruct import ReconstructConfig, reconstruct

    grid = VolumeGeometry((12, 12, 12), (2.0, 2.0, 2.0))
    geometry = ConeBeamGeometry.covering(grid, n_views=12)
    truth = ellipsoid_volume([Ellipsoid((0.0, 0.0, 0.0), (8.0, 7.0, 6.0), 0.25)], grid)
    scan = Scan(Projector(geometry)(torch.as_tensor(truth)).numpy(), geometry.angles, geometry, truth)
    config = ReconstructConfig.from_dict({"iterations": 2, "n_gaussians": 50, "max_gaussians": 100, "eval_every": 1})
    result = reconstruct(scan, init="fbp", config=config, seed=0)
    out = tmp_path / "run"
    write_run(str(out), result, scan, scan_file="/scans/phantom.npz", source="phantom", case="phantom", seed=0,
              device="cpu", prior=None)
    assert sorted(os.listdir(out)) == sorted(RUN_FILES)
    run = load_run(str(out))
    assert (run.init, run.views, run.case) == ("fbp", 12, "phantom")
    assert run.metrics == json.loads(json.dumps({**result.to_metrics(), "views": 12, "case": "phantom"}))
    assert run.final("psnr") == pytest.approx(result.final["psnr"])
    np.testing.assert_allclose(run.volume(), result.volume.numpy(), rtol=1e-6, atol=1e-7)
    config_json = json.loads((out / "config.json").read_text())
    assert config_json["config"] == json.loads(json.dumps(result.config.to_dict())) and config_json["scan"] == "/scans/phantom.npz"


def test_a_failed_report_leaves_the_earlier_one_whole(synthetic_runs, tmp_path, monkeypatch):
    import ctrecon.pipeline.report as report_module

    paths = [p for p, _ in synthetic_runs.values()]
    out = tmp_path / "report"
    build_report(paths, str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_module, "plot_group_curves", full_disk)  # after report.md and table.csv
    with pytest.raises(OSError):
        build_report(paths[:4], str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no new table beside old curves
