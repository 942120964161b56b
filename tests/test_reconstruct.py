"""The 3DGR-CT loop on a tiny ellipsoid phantom: convergence, view sampling, density control, guards, CLI."""
import json
import math
import os
import signal

import numpy as np
import pytest
import torch

from ctrecon.pipeline import reconstruct as recon_module
from ctrecon.core.errors import InputError
from ctrecon.core.geometry import ConeBeamGeometry, VolumeGeometry
from ctrecon.core.io import Scan, save_scan
from ctrecon.core.phantoms import Ellipsoid, ellipsoid_volume
from ctrecon.operators.projector import Projector
from ctrecon.pipeline.metrics import psnr
from ctrecon.methods.gaussians import DensityStrategy
from ctrecon.pipeline.reconstruct import (OPTIMIZER_METHODS, SECTIONS, VALIDATION_STOP, NonFiniteLossError,
                                          ReconstructConfig, Trainer, _ViewCycle, coarse_lattice, learning_rates,
                                          projection_ssim, ramp_weighted_error, reconstruct, residual_converged,
                                          total_variation, validation_split)

from cli_helpers import run_cli

N_VOXELS = 16
N_VIEWS = 30


@pytest.fixture(scope="module")
def scan():
    """16³ grid of 2 mm voxels, three ellipsoids, 30 cone-beam views projected by the project's projector."""
    grid = VolumeGeometry((N_VOXELS,) * 3, (2.0, 2.0, 2.0))
    geometry = ConeBeamGeometry.covering(grid, n_views=N_VIEWS)
    phantom = [Ellipsoid((0.0, 0.0, 0.0), (11.0, 9.0, 10.0), 0.25),
               Ellipsoid((3.0, 2.0, 1.0), (4.0, 3.0, 4.5), 0.2),
               Ellipsoid((-4.0, -3.0, -2.0), (2.5, 3.0, 2.5), -0.1)]
    truth = ellipsoid_volume(phantom, grid)
    projections = Projector(geometry)(torch.as_tensor(truth)).numpy()
    return Scan(projections, geometry.angles, geometry, truth, {"case": "ellipsoids"})


def small_config(**changes):
    settings = dict(iterations=60, n_gaussians=500, max_gaussians=1000, eval_every=20, strategy=None)
    settings.update(changes)
    return ReconstructConfig.from_dict(settings)


def test_loop_lowers_loss_and_beats_the_fbp_initialisation(scan):
    result = reconstruct(scan, init="fbp", config=small_config(iterations=120), seed=0)
    history = result.history
    assert [h["iteration"] for h in history] == list(range(0, 121, 20))
    assert history[0]["loss"] is None and history[1]["loss"] > 0
    assert history[-1]["loss"] < history[1]["loss"] / 5
    assert result.final["psnr"] == history[-1]["psnr"]
    assert result.final["psnr"] > history[0]["psnr"] + 3.0  # well above the FBP initialisation
    assert result.iterations == 120 and not result.interrupted and result.stop_reason == "completed"
    assert set(result.timing) == {"render", "project", "backward", "densify", "validate"}
    assert result.wall_seconds >= sum(result.timing.values()) * 0.99 and result.eval_seconds > 0
    assert all(h2["seconds"] >= h1["seconds"] for h1, h2 in zip(history, history[1:]))
    assert tuple(result.volume.shape) == (N_VOXELS,) * 3 and result.volume.dtype == torch.float32
    assert set(result.thresholds) == {"psnr35", "ssim90"}
    for key, metric, value in (("psnr35", "psnr", 35.0), ("ssim90", "ssim_slice", 0.90)):
        first = next((h for h in history if h[metric] >= value), None)
        assert result.thresholds[key] == (None if first is None else
                                          {"iteration": first["iteration"], "seconds": first["seconds"]})


def test_random_views_are_seeded_and_cover_every_view(scan):
    cycle = _ViewCycle(N_VIEWS, 7, torch.Generator().manual_seed(3))
    drawn = torch.cat([cycle.next() for _ in range(30)])  # 210 = 7 epochs of 30 views
    assert torch.equal(torch.bincount(drawn, minlength=N_VIEWS), torch.full((N_VIEWS,), 7))
    config = small_config(iterations=30, views_per_iter=5, eval_every=10, n_gaussians=300)
    first = reconstruct(scan, config=config, seed=1)
    again = reconstruct(scan, config=config, seed=1)
    assert first.history[-1]["loss"] < first.history[1]["loss"]
    assert [h["loss"] for h in first.history] == [h["loss"] for h in again.history]  # deterministic on CPU
    assert torch.equal(first.volume, again.volume)
    with pytest.raises(InputError, match="views_per_iter"):
        reconstruct(scan, config=small_config(views_per_iter=N_VIEWS + 1), seed=0)


def test_densify_and_prune_change_the_count_within_the_cap(scan):
    counts = []
    config = small_config(iterations=50, n_gaussians=200, max_gaussians=240, strategy="3dgr", densify_from=10,
                          densify_until=45, densify_every=10, eval_every=25, densify_grad_quantile=0.8)
    result = reconstruct(scan, config=config, seed=0, callback=lambda p: counts.append(p.n_gaussians))
    assert counts[0] == 200
    assert len(set(counts)) > 1  # densification acted
    assert max(counts) <= 240 and result.n_gaussians == counts[-1] == len(result.field)
    changes = [i for i in range(1, len(counts)) if counts[i] != counts[i - 1]]
    # callback index == iteration; it reports before that iteration's density control
    assert set(changes) <= {11, 21, 31, 41}


def test_the_loop_drives_the_density_strategy_only_through_its_hooks(scan, monkeypatch):
    assert reconstruct(scan, config=small_config(iterations=3, n_gaussians=200), seed=0).timing["densify"] == 0.0
    calls = []

    class Recorder(DensityStrategy):
        def step_post_backward(self, field, optimizer, iteration):
            calls.append(("post_backward", iteration, field.means.grad is not None))

        def step_post_update(self, field, optimizer, iteration):
            calls.append(("post_update", iteration, field.means.grad is None))

    monkeypatch.setattr(recon_module.DensitySettings, "build", lambda self, volume, generator: Recorder())
    result = reconstruct(scan, config=small_config(iterations=3, n_gaussians=200, strategy="3dgr"), seed=0)
    # gradients present after backward, cleared before the update hook; no update after the last step
    assert calls == [("post_backward", 1, True), ("post_update", 1, True), ("post_backward", 2, True),
                     ("post_update", 2, True), ("post_backward", 3, True)]
    assert result.timing["densify"] > 0


def test_non_finite_loss_keeps_the_last_good_state(scan):
    config = small_config(iterations=20, n_gaussians=200)

    def poison(volume, iteration):
        return volume.sum() * (math.nan if iteration == 5 else 0.0)

    with pytest.raises(NonFiniteLossError, match="non-finite loss at iteration 5") as info:
        reconstruct(scan, config=config, seed=2, regularizer=poison)
    error = info.value
    assert error.iteration == 5 and error.result.iterations == 3  # the state rendered at iteration 4
    assert error.result.stop_reason == "non-finite loss at iteration 5"
    assert torch.isfinite(error.result.volume).all() and error.result.final["psnr"] > 0
    reference = reconstruct(scan, config=small_config(iterations=3, n_gaussians=200), seed=2)
    for name, param in error.result.field.raw_parameters().items():
        assert torch.equal(param, reference.field.raw_parameters()[name]), name


def test_initialiser_options_are_passed_and_checked(scan):
    config = small_config(iterations=1, init_options={"scale_factor": 1.5})
    result = reconstruct(scan, config=config, seed=0)
    assert result.field.metadata["options"]["scale_factor"] == 1.5
    with pytest.raises(InputError, match="does not accept init_options"):
        reconstruct(scan, config=small_config(init_options={"bogus": 1}), seed=0)
    with pytest.raises(InputError, match="unknown initializer 'nope'"):
        reconstruct(scan, init="nope", config=small_config(), seed=0)


def test_keyboard_interrupt_returns_what_was_reached(scan):
    def interrupt(progress):
        if progress.iteration == 7:
            raise KeyboardInterrupt

    result = reconstruct(scan, config=small_config(iterations=40, eval_every=5, n_gaussians=200), callback=interrupt)
    assert result.interrupted and result.stop_reason == "interrupted" and result.iterations == 7
    assert [h["iteration"] for h in result.history] == [0, 5, 7]  # the reached state is evaluated
    assert result.to_metrics()["interrupted"] is True


def test_early_stop_and_coarse_stage(scan):
    result = reconstruct(scan, config=small_config(iterations=200, stop_at_psnr=0.0, eval_every=10), seed=0)
    assert result.iterations == 0 and result.stop_reason == "psnr target"
    coarse = reconstruct(scan, config=small_config(iterations=24, coarse_iterations=16, eval_every=8,
                                                   n_gaussians=300), seed=0)
    assert coarse.history[-1]["loss"] < coarse.history[1]["loss"]


@pytest.mark.parametrize("shape", [(16, 16, 16), (5, 6, 7), (1, 4, 3)])
def test_coarse_lattice_centres_are_the_subsampled_voxel_centres(shape):
    grid = VolumeGeometry(shape, (1.5, 2.0, 0.7), (3.0, -1.0, 0.5))
    centres = grid.voxel_centres()
    for offset in np.ndindex(2, 2, 2):
        sub = coarse_lattice(grid, offset)
        start = [a if a < n else 0 for a, n in zip(offset, shape)]
        expected = centres[start[0]::2, start[1]::2, start[2]::2]
        np.testing.assert_allclose(sub.voxel_centres(), expected, atol=1e-9)


def test_learning_rate_schedules_and_config_validation():
    config = ReconstructConfig()
    assert learning_rates(0, config, 100.0) == pytest.approx(
        {"means": 2e-3 * 100.0, "intensities": 0.05, "log_scales": 5e-3, "quats": 1e-3})
    assert learning_rates(30_000, config, 100.0)["means"] == pytest.approx(2e-6 * 100.0)
    assert learning_rates(60_000, config, 100.0)["means"] == pytest.approx(2e-6 * 100.0)
    assert learning_rates(15_000, config, 1.0)["means"] == pytest.approx(math.sqrt(2e-3 * 2e-6))
    assert learning_rates(15_000, config, 1.0)["intensities"] == 0.05  # constant without a final value
    decaying = ReconstructConfig.from_dict({"intensity_lr_final": 0.005, "lr_decay_steps": 100})
    assert learning_rates(50, decaying, 1.0)["intensities"] == pytest.approx(math.sqrt(0.05 * 0.005))
    assert learning_rates(100, decaying, 1.0)["means"] == pytest.approx(2e-6)
    assert ReconstructConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for bad, message in (({"iterations": 0}, "iterations"), ({"loss": "l3"}, "unknown loss"),
                         ({"max_gaussians": 10, "n_gaussians": 20}, "max_gaussians"), ({"nope": 1}, "unknown"),
                         ({"scale_lr_final": -1.0}, "scale_lr_final")):
        with pytest.raises(InputError, match=message):
            ReconstructConfig.from_dict(bad)


def test_preconditioned_step_backpropagates_the_ramp_filtered_residual(scan):
    from ctrecon.methods.gaussians import get_initializer
    from ctrecon.operators.fdk import fdk, filter_projections, filter_response

    config = small_config(method="preconditioned", views_per_iter=0, iterations=1, lambda_tv=0.01)
    field = get_initializer("fbp")(fdk(scan.projections, scan.geometry), scan.geometry.volume, 300,
                                   torch.Generator().manual_seed(0))
    trainer = Trainer(scan, field, config, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
                      regularizer=None, init="fbp", init_seconds=0.0)
    params = list(field.raw_parameters().values())
    volume = field.render(scan.geometry.volume)
    predicted = Projector(scan.geometry)(volume) / trainer.projection_scale
    residual = (predicted - trainer.target).detach()
    response, _ = filter_response(scan.geometry.nDetector[1],
                                  scan.geometry.dDetector[1] * scan.geometry.DSO / scan.geometry.DSD)
    filtered = filter_projections(residual, scan.geometry) * 2 / (residual.numel() * np.sqrt(np.mean(response ** 2)))
    expected = torch.autograd.grad([predicted, 0.01 * total_variation(volume)], params, [filtered, None])
    trainer.step(1)  # the same render and projection, then Adam: read the gradients Adam saw from its first moment
    for param, grad in zip(params, expected):
        first_moment = trainer.optimizer.state[param]["exp_avg"]
        torch.testing.assert_close(first_moment, 0.1 * grad, rtol=1e-4, atol=1e-12)
    assert float((residual * filter_projections(residual, scan.geometry)).sum()) > 0  # a descent direction in r


def test_optimizer_methods_fill_in_their_settings(scan):
    fast = ReconstructConfig.from_dict({"method": "preconditioned"})
    for name, value in OPTIMIZER_METHODS["preconditioned"].items():
        section = next(s for s in SECTIONS if hasattr(getattr(fast, s), name))
        assert getattr(getattr(fast, section), name) == value
    assert ReconstructConfig.from_dict({"method": "preconditioned", "views_per_iter": 7}).schedule.views_per_iter == 7
    assert ReconstructConfig.from_dict({}) == ReconstructConfig()  # the library default stays 3DGR-CT's
    with pytest.raises(InputError, match="unknown optimizer method 'sgd'"):
        ReconstructConfig.from_dict({"method": "sgd"})
    with pytest.raises(InputError, match="use loss mse"):
        ReconstructConfig.from_dict({"method": "preconditioned", "loss": "l1"})
    result = reconstruct(scan, init="fbp", config=small_config(method="preconditioned", iterations=60), seed=0)
    assert result.history[-1]["loss"] < result.history[1]["loss"] / 5
    assert result.final["psnr"] > result.history[0]["psnr"] + 3.0


def test_residual_rule_compares_whole_consecutive_windows():
    falling = [1.0 / (1 + t) for t in range(40)]
    assert not residual_converged(falling, 10, 0.01)            # still improving by far more than 1 %
    assert not residual_converged([1.0] * 19, 10, 0.01)         # fewer than two windows
    assert residual_converged([1.0] * 20, 10, 0.01)             # no improvement between the two windows
    assert not residual_converged([1.0] * 21, 10, 0.01)         # only at whole windows
    assert residual_converged([1.0] * 10 + [0.995] * 10, 10, 0.01)  # 0.5 % < 1 %
    assert not residual_converged([1.0] * 10 + [0.98] * 10, 10, 0.01)


def test_auto_iterations_stop_on_the_residual_without_ground_truth(scan):
    config = small_config(iterations="auto", max_iterations=400, residual_window=20, residual_tolerance=0.2)
    blind = Scan(scan.projections, scan.angles, scan.geometry, None, scan.meta)
    result = reconstruct(blind, init="fbp", config=config, seed=0)
    assert result.stop_reason == "data residual converged"
    assert result.iterations % 20 == 0 and 40 <= result.iterations < 400
    assert result.final is None and result.history[-1]["iteration"] == result.iterations
    with_truth = reconstruct(scan, init="fbp", config=config, seed=0)  # the same run, now with PSNR where it stopped
    assert with_truth.iterations == result.iterations and with_truth.final["psnr"] > with_truth.history[0]["psnr"]
    capped = reconstruct(scan, init="fbp", config=small_config(iterations="auto", max_iterations=30), seed=0)
    assert capped.iterations == 30 and capped.stop_reason == "completed"
    with pytest.raises(InputError, match='iterations must be a positive integer or "auto"'):
        small_config(iterations="many")
    with pytest.raises(InputError, match="residual_tolerance"):
        small_config(iterations="auto", residual_tolerance=1.5)


def test_decays_follow_the_run_length_when_not_given():
    config = ReconstructConfig.from_dict({"iterations": 400, "lr_decay_steps": None, "intensity_lr_final": 0.005})
    assert config.decay_steps == 400
    assert learning_rates(400, config, 1.0)["intensities"] == pytest.approx(0.005)
    assert learning_rates(200, config, 1.0)["intensities"] == pytest.approx(math.sqrt(0.05 * 0.005))
    auto = ReconstructConfig.from_dict({"iterations": "auto", "lr_decay_steps": None, "max_iterations": 900})
    assert auto.iteration_cap == auto.decay_steps == 900


def test_config_sections_read_nested_flat_and_old_files():
    nested = ReconstructConfig.from_dict({"schedule": {"iterations": 200, "views_per_iter": 10},
                                          "density": {"strategy": None}})
    old = ReconstructConfig.from_dict({"iterations": 200, "views_per_iter": 10, "densify": False})  # a flat file
    assert nested == old and nested.schedule.iterations == 200 and nested.density.strategy is None
    assert list(old.to_dict()) == list(SECTIONS) and old.to_dict()["schedule"]["views_per_iter"] == 10
    assert ReconstructConfig.from_dict({"densify": True}).density.strategy == "3dgr"
    assert ReconstructConfig.from_dict({"optimizer": {"loss": "l1"}, "eval_every": 7}).evaluation.eval_every == 7
    for bad, message in (({"schedule": {"eval_every": 5}}, r"unknown reconstruction setting\(s\): schedule.eval_every"),
                         ({"iterations": 5, "schedule": {"iterations": 6}}, "iterations is given twice"),
                         ({"schedule": 5}, "'schedule' must be an object"),
                         ({"strategy": "mcmc"}, "unknown density strategy 'mcmc'"),
                         ({"density": {"densify_every": 0}}, "densify_every must be a positive integer")):
        with pytest.raises(InputError, match=message):
            ReconstructConfig.from_dict(bad)


def test_loss_terms_against_independent_formulas():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.random((3, 20, 24))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    expected = np.mean([structural_similarity(a[i], b[i], gaussian_weights=True, sigma=1.5, data_range=1.0,
                                              use_sample_covariance=False) for i in range(3)])
    assert float(projection_ssim(torch.as_tensor(a), torch.as_tensor(b))) == pytest.approx(expected, rel=1e-6)
    assert float(projection_ssim(torch.as_tensor(a), torch.as_tensor(a))) == pytest.approx(1.0)
    volume = rng.random((4, 5, 6))
    expected_tv = sum(np.abs(np.diff(volume, axis=axis)).mean() for axis in range(3))
    assert float(total_variation(torch.as_tensor(volume))) == pytest.approx(expected_tv)


# ----------------------------------------------------------------------------- CLI
REQUIRED_KEYS = {"init", "iterations", "wall_seconds", "eval_seconds", "n_gaussians", "final", "thresholds", "history"}


@pytest.fixture(scope="module")
def scan_file(scan, tmp_path_factory):
    path = tmp_path_factory.mktemp("scan") / "phantom.npz"
    save_scan(path, scan)
    return path


def test_cli_writes_every_file_with_the_metrics_contract(scan_file, tmp_path):
    out = tmp_path / "run"
    assert run_cli(["reconstruct", scan_file, "--iters", 20, "--eval-every", 10, "--n-gaussians", 200,
                    "--max-gaussians", 400, "--views-per-iter", 10, "--out", out])[0] == 0
    assert sorted(os.listdir(out)) == ["config.json", "curves.png", "gaussians.npz", "metrics.json", "volume.nii.gz"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert REQUIRED_KEYS <= set(metrics)
    assert metrics["init"] == "fbp" and metrics["iterations"] == 20 and metrics["interrupted"] is False
    assert set(metrics["final"]) == {"psnr", "ssim3d", "ssim_slice", "ssim_slice_3dgr_code"}
    assert set(metrics["thresholds"]) == {"psnr35", "ssim90"}
    for entry in metrics["thresholds"].values():
        assert entry is None or set(entry) == {"iteration", "seconds"}
    assert [h["iteration"] for h in metrics["history"]] == [0, 10, 20]
    for record in metrics["history"]:
        assert set(record) == {"iteration", "seconds", "loss", "psnr", "ssim3d", "ssim_slice", "ssim_slice_3dgr_code",
                               "n_gaussians"}
    assert metrics["views"] == N_VIEWS and metrics["case"] == "ellipsoids"
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["schedule"]["views_per_iter"] == 10 and config["config"]["schedule"]["iterations"] == 20

    from ctrecon.methods.gaussians import GaussianField
    from ctrecon.core.io import load_volume

    volume_hu, spacing = load_volume(out / "volume.nii.gz")
    assert volume_hu.shape == (N_VOXELS,) * 3 and spacing == pytest.approx((2.0, 2.0, 2.0))
    assert len(GaussianField.load(str(out / "gaussians.npz"))) == metrics["n_gaussians"]
    # the config.json of a run reproduces it
    again = tmp_path / "again"
    assert run_cli(["reconstruct", scan_file, "--config", out / "config.json", "--out", again])[0] == 0
    assert json.loads((again / "metrics.json").read_text())["history"][-1]["loss"] == metrics["history"][-1]["loss"]


def test_cli_optimizer_default_choice_and_config_files(scan_file, tmp_path):
    def method_of(*options):
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        assert run_cli(["reconstruct", scan_file, "--iters", 5, "--n-gaussians", 100, *options, "--out", out])[0] == 0
        return json.loads((out / "config.json").read_text())["config"]["optimizer"]["method"], out

    default, run = method_of()
    assert default == "preconditioned"
    assert method_of("--optimizer", "3dgr")[0] == "3dgr"
    assert method_of("--config", run / "config.json")[0] == "preconditioned"  # a run's config keeps its method
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"views_per_iter": 5}))
    assert method_of("--config", flat)[0] == "3dgr"  # files from before the choice are 3DGR-CT's
    assert method_of("--config", flat, "--optimizer", "preconditioned")[0] == "preconditioned"
    code, _, err = run_cli(["reconstruct", scan_file, "--iters", "0", "--out", tmp_path / "bad"])
    assert code == 2 and 'positive integer or "auto"' in err and not (tmp_path / "bad").exists()
    densified = tmp_path / "densified"
    assert run_cli(["reconstruct", scan_file, "--iters", 5, "--n-gaussians", 100, "--densify", "additive",
                    "--out", densified])[0] == 0
    density = json.loads((densified / "config.json").read_text())["config"]["density"]
    assert density["strategy"] == "additive" and density["densify_grad_threshold"] == 0.055  # the method's own
    code, _, err = run_cli(["reconstruct", scan_file, "--densify", "additive", "--no-densify", "--out", tmp_path / "x"])
    assert code == 2 and "contradict" in err and not (tmp_path / "x").exists()


def test_cli_validation_views_stop_and_say_which_state_they_return(scan, tmp_path):
    """Held-out views whose measurements disagree with the rest (zeros) stop the fit early; the summary says
    which state the run folder holds."""
    _, held = validation_split(N_VIEWS, 6)
    projections = scan.projections.copy()
    projections[held] = 0.0
    save_scan(tmp_path / "spoiled.npz", Scan(projections, scan.angles, scan.geometry, scan.ground_truth))
    (tmp_path / "often.json").write_text(json.dumps({"validation_every": 5, "validation_patience": 2}))
    out = tmp_path / "run"
    code, stdout, err = run_cli(["reconstruct", tmp_path / "spoiled.npz", "--config", tmp_path / "often.json",
                                 "--optimizer", "preconditioned", "--iters", 100, "--n-gaussians", 150,
                                 "--views-per-iter", 6, "--validation-views", 6, "--out", out])
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "config.json").read_text())["config"]["stopping"]["validation_views"] == 6
    assert metrics["stop_reason"] == "held-out views' loss stopped falling"
    assert metrics["iterations_run"] == metrics["iterations"] + 10 < 100
    assert [check[0] for check in metrics["validation"]] == list(range(5, metrics["iterations_run"] + 1, 5))
    assert (f"stopped: held-out views' loss stopped falling (at iteration {metrics['iterations_run']}; the state "
            f"returned is that of iteration {metrics['iterations']})") in stdout
    code, _, err = run_cli(["reconstruct", tmp_path / "spoiled.npz", "--validation-views", 20, "--out", tmp_path / "bad"])
    assert code == 2 and "at least half of the scan's 30 views" in err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_cli_ctrl_c_and_sigterm_write_what_was_reached(scan_file, tmp_path, monkeypatch, how):
    original = recon_module.reconstruct

    def interrupted_at_5(*args, callback=None, **kwargs):
        def hook(progress):
            callback(progress)
            if progress.iteration == 5:
                if how == "ctrl-c":
                    raise KeyboardInterrupt
                os.kill(os.getpid(), signal.SIGTERM)  # what timeout, SLURM and Kubernetes send
                signal.sigtimedwait([], 1.0)  # the handler runs by now
                raise AssertionError("SIGTERM did not stop the run")

        return original(*args, callback=hook, **kwargs)

    monkeypatch.setattr(recon_module, "reconstruct", interrupted_at_5)
    out = tmp_path / "run"
    code, _, err = run_cli(["reconstruct", scan_file, "--iters", 50, "--eval-every", 20, "--n-gaussians", 200,
                            "--out", out])
    assert code == 130
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["interrupted"] is True and metrics["iterations"] == 5
    assert [h["iteration"] for h in metrics["history"]] == [0, 5]
    assert (out / "volume.nii.gz").exists() and (out / "gaussians.npz").exists()
    assert "interrupted after 5 iterations" in err


def test_cli_failed_write_leaves_the_earlier_run_intact(scan_file, tmp_path, monkeypatch):
    import ctrecon.pipeline.plots as plots

    out = tmp_path / "run"
    options = ["reconstruct", scan_file, "--iters", 2, "--eval-every", 1, "--n-gaussians", 200, "--out", out]
    assert run_cli(options)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "plot_run_curves", full_disk)  # fails after the volume and Gaussians are written
    code, _, err = run_cli([*options[:3], 3, *options[4:]])
    last = err.strip().splitlines()[-1]  # (after the progress bar)
    assert code == 1 and last.startswith("ctrecon: error: cannot write the output: No space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # not a mix of the two runs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporaries


def test_cli_checks_out_before_any_work(scan_file, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("do not delete")
    for out, message in ((tmp_path / "file" / "run", "is not a folder"), (tmp_path / "mine", "not its output")):
        code, stdout, err = run_cli(["reconstruct", scan_file, "--iters", 5, "--out", out])
        assert code == 2 and message in err and "iterations" not in stdout
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "do not delete"


def test_case_names_come_from_the_scan_source(scan, tmp_path):
    from ctrecon.cli import _case_name

    described = Scan(scan.projections, scan.angles, scan.geometry, None,
                     {"source": "NIfTI chest_lung1.nii.gz (stored RAS, reoriented to LPS)"})
    assert _case_name(described, "x/scan_v120.npz") == "chest_lung1"
    bare = Scan(scan.projections, scan.angles, scan.geometry, None, {"source": "array"})
    assert _case_name(bare, "x/scan_v120.npz") == "scan_v120"


def test_cli_bad_input_is_one_line_and_writes_nothing(scan_file, tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a zip file")
    existing_file = tmp_path / "taken"
    existing_file.write_text("x")
    cases = [(tmp_path / "missing.npz", ["--out", tmp_path / "r1"]),
             (corrupt, ["--out", tmp_path / "r2"]),
             (scan_file, ["--init", "nonsense", "--out", tmp_path / "r3"]),
             (scan_file, ["--iters", 0, "--out", tmp_path / "r4"]),
             (scan_file, ["--init-option", "bogus=1", "--out", tmp_path / "r5"]),
             (scan_file, ["--out", existing_file])]
    for scan_path, options in cases:
        code, _, err = run_cli(["reconstruct", scan_path, *options])
        assert code == 2, options
        assert err.startswith("ctrecon: error: ") and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == ["corrupt.npz", "taken"]


def test_validation_split_spreads_the_held_out_views():
    fitted, held = validation_split(120, 8)
    assert held.tolist() == [7, 22, 37, 52, 67, 82, 97, 112]
    assert fitted.size == 112 and not set(fitted.tolist()) & set(held.tolist())
    assert sorted(fitted.tolist() + held.tolist()) == list(range(120))
    assert validation_split(30, 1)[1].tolist() == [15]


def test_held_out_views_never_enter_the_fit_and_the_lowest_state_is_returned(scan):
    from ctrecon.operators.fdk import filter_projections, filter_response

    """Garbage in the held-out views changes nothing in the fit (only their loss), and a stop returns the
    state of the lowest held-out loss with the steps made recorded beside it."""
    config = small_config(method="preconditioned", iterations=40, views_per_iter=6, validation_views=4,
                          validation_every=5, validation_patience=100)
    clean = reconstruct(scan, init="fbp", config=config, seed=2)
    _, held = validation_split(N_VIEWS, 4)
    spoiled_projections = scan.projections.copy()
    spoiled_projections[held] *= 3.0
    spoiled = reconstruct(Scan(spoiled_projections, scan.angles, scan.geometry, scan.ground_truth), init="fbp",
                          config=config, seed=2)
    assert torch.equal(clean.volume, spoiled.volume)
    assert [h["loss"] for h in clean.history] == [h["loss"] for h in spoiled.history]
    assert [check[0] for check in clean.validation] == list(range(5, 41, 5))
    assert all(s[1] > c[1] for c, s in zip(clean.validation, spoiled.validation))
    assert clean.stop_reason == "completed" and clean.timing["validate"] > 0

    # the spoiled views' loss rises as the fit improves: with patience 2 the run stops and returns its lowest
    early = reconstruct(Scan(spoiled_projections, scan.angles, scan.geometry, scan.ground_truth), init="fbp",
                        config=small_config(**{**config.to_dict()["stopping"], "method": "preconditioned",
                                               "iterations": 40, "views_per_iter": 6, "validation_every": 5,
                                               "validation_patience": 2}), seed=2)
    losses = dict(map(tuple, early.validation))
    best = min(losses, key=losses.get)
    assert early.stop_reason == VALIDATION_STOP
    assert early.iterations == best and early.to_metrics()["iterations_run"] == best + 10
    assert max(losses) == best + 10
    assert early.final["psnr"] == pytest.approx(psnr(early.volume, torch.as_tensor(scan.ground_truth)), abs=1e-4)
    assert early.final["psnr"] != pytest.approx(early.history[-1]["psnr"], abs=1e-4)  # not the last state's
    with torch.no_grad():
        again = Projector(scan.geometry[held])(early.field.render(scan.geometry.volume))
    target = torch.as_tensor(spoiled_projections[held])
    scale = float(np.abs(np.delete(spoiled_projections, held, axis=0)).max())
    residual = (again - target) / scale
    response, _ = filter_response(scan.geometry.nDetector[1], scan.geometry.dDetector[1] * scan.geometry.DSO
                                  / scan.geometry.DSD)
    ramp_weighted = (residual * filter_projections(residual, scan.geometry)).mean() / np.sqrt(np.mean(response ** 2))
    assert float(ramp_weighted) == pytest.approx(losses[best], rel=1e-4)


def test_ramp_weighted_error_measures_the_volume_error_at_every_frequency():
    """Volume errors of equal energy, smooth to fine: the plain mean squared projection residual falls
    more than 10× from the smoothest to the finest, the ramp-weighted one stays within 2× (Fourier slice)."""
    n = 32
    grid = VolumeGeometry((n,) * 3, (1.0,) * 3)
    geometry = ConeBeamGeometry.covering(grid, n_views=90)
    z, y, x = np.meshgrid(*[np.arange(n) - (n - 1) / 2] * 3, indexing="ij")
    envelope = np.exp(-(x ** 2 + y ** 2 + z ** 2) / (2 * 5.0 ** 2))
    plain, weighted = [], []
    for frequency in (0.0, 0.1, 0.2):  # cycles per voxel along x + y
        error = envelope * np.cos(2 * np.pi * frequency * (x + y))
        residual = Projector(geometry)(torch.as_tensor(error / np.linalg.norm(error), dtype=torch.float32))
        plain.append(float((residual ** 2).mean()))
        weighted.append(ramp_weighted_error(residual, geometry))
    assert plain[0] / plain[-1] > 10 and plain == sorted(plain, reverse=True)
    assert max(weighted) / min(weighted) < 2


@pytest.mark.parametrize("changes, message", [
    ({"validation_views": 16}, "at least half"),
    ({"validation_views": 10, "views_per_iter": 25}, "exceeds the scan's 20 views left after holding out 10"),
])
def test_held_out_views_must_leave_enough_to_fit(scan, changes, message):
    with pytest.raises(InputError, match=message):
        reconstruct(scan, init="fbp", config=small_config(**changes), seed=0)


def test_a_grid_beyond_the_memory_is_refused_before_any_work(scan_file, tmp_path, monkeypatch):
    monkeypatch.setenv("CTRECON_MEMORY_BYTES", str(4 * 2 * N_VOXELS ** 3 - 1))  # less than two volumes
    for command, what in ((["reconstruct", scan_file, "--out", tmp_path / "run"], "3DGR-CT"),
                          (["reconstruct", scan_file, "--method", "cgls", "--iters", 2, "--out", tmp_path / "run"],
                           "cgls"),
                          (["fdk", scan_file, "--out", tmp_path / "fdk.nii.gz"], "FDK")):
        code, _, err = run_cli(command)
        assert code == 2 and err.startswith(f"ctrecon: error: {what}") and "16x16x16 voxel grid" in err, err
        assert err.count("\n") == 1 and "coarser grid" in err
    assert list(tmp_path.iterdir()) == []


def test_the_default_tv_keeps_the_preconditioned_step_from_fitting_noise():
    """Noisy projections (σ 2 % of the largest): without TV the filtered step peaks and then fits the noise;
    with the method's default TV it keeps rising and ends well above."""
    grid = VolumeGeometry((24,) * 3, (2.0,) * 3)
    geometry = ConeBeamGeometry.covering(grid, n_views=40)
    truth = ellipsoid_volume([Ellipsoid((0.0, 0.0, 0.0), (17.0, 14.0, 15.0), 0.25),
                              Ellipsoid((4.0, 3.0, 1.0), (6.0, 4.5, 6.5), 0.2),
                              Ellipsoid((-6.0, -4.0, -3.0), (4.0, 4.5, 4.0), -0.1)], grid)
    clean = Projector(geometry)(torch.as_tensor(truth)).numpy()
    noisy = clean + np.random.default_rng(0).normal(0, 0.02 * clean.max(), clean.shape).astype(np.float32)
    scan = Scan(noisy, geometry.angles, geometry, truth)
    settings = {"method": "preconditioned", "iterations": 200, "n_gaussians": 1500, "eval_every": 50,
                "views_per_iter": 0}
    config = ReconstructConfig.from_dict(settings)
    assert config.optimizer.lambda_tv == "auto"
    assert [config.for_initializer(name).optimizer.lambda_tv for name in ("fbp", "medgmae", "medgmae-star")] == \
        [1e-3, 3e-4, 1e-3]
    assert ReconstructConfig.from_dict({**settings, "lambda_tv": 0.01}).for_initializer("medgmae").optimizer.lambda_tv \
        == 0.01                                                           # explicit wins
    curves = {}
    for name, extra in (("default", {}), ("no tv", {"lambda_tv": 0.0})):
        result = reconstruct(scan, init="fbp", config=ReconstructConfig.from_dict({**settings, **extra}), seed=0)
        curves[name] = [h["psnr"] for h in result.history[1:]]  # iterations 50 ... 200
    assert curves["no tv"][-1] < max(curves["no tv"]) - 0.5              # it fits the noise
    assert all(b > a - 0.05 for a, b in zip(curves["default"], curves["default"][1:]))  # no dips
    assert curves["default"][-1] > curves["no tv"][-1] + 1.5


def test_stages_before_the_first_iteration_report_progress():
    """FDK reports its views and a prior its windows (the CLI shows them as progress bars with an ETA)."""
    from ctrecon.core.phantoms import shepp_logan_3d

    grid = VolumeGeometry((16, 32, 32), (3.0, 3.0, 3.0))
    truth = ellipsoid_volume(shepp_logan_3d(grid, fill=0.8, scale=1.0), grid).astype(np.float32)
    geometry = ConeBeamGeometry.covering(grid, n_views=20)
    scan = Scan(Projector(geometry)(torch.from_numpy(truth)).numpy(), geometry.angles, geometry, truth)
    config = ReconstructConfig.from_dict({"method": "preconditioned", "iterations": 1, "n_gaussians": 500})
    for init, stages in (("fbp", {"FDK"}), ("medgmae-star", {"FDK", "medgmae-star windows"})):
        events = []
        reconstruct(scan, init=init, config=config, stage_progress=lambda *event: events.append(event))
        assert {stage for stage, _, _ in events} == stages
        for stage in stages:
            done = [(d, t) for s, d, t in events if s == stage]
            assert done[-1][0] == done[-1][1] and all(a[0] <= b[0] for a, b in zip(done, done[1:]))
        assert ("FDK", 20, 20) in events


def test_auto_gaussian_budget_grows_with_the_grid():
    config = ReconstructConfig.from_dict({"method": "preconditioned"})
    assert config.gaussians.n_gaussians == "auto"
    assert config.gaussian_budget(48 * 96 * 96) == 50_000                  # the figures' budget
    assert config.gaussian_budget(128 * 256 * 256) == 83_887
    assert config.gaussian_budget(512 * 512 * 512) == config.density.max_gaussians
    assert ReconstructConfig.from_dict({"method": "preconditioned", "n_gaussians": 1234}).gaussian_budget(10 ** 9) == 1234
    assert ReconstructConfig.from_dict({"method": "3dgr"}).gaussian_budget(10 ** 9) == 50_000   # 3DGR-CT's own
    with pytest.raises(InputError, match='n_gaussians must be a positive integer or "auto"'):
        ReconstructConfig.from_dict({"n_gaussians": "many"})
