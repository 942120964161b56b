"""Initialisers (fbp, r2, registry) and density control (clone / split / prune, optimiser state, cap)."""
import math

import numpy as np
import pytest
import torch

from ctrecon.core.errors import InputError
from ctrecon.methods.gaussians import (GaussianField, QuantileSplitCloneStrategy, available_initializers,
                                       get_initializer, register_initializer)
from ctrecon.methods.gaussians.init import fbp_initializer, r2_initializer
from ctrecon.core.geometry import VolumeGeometry
from ctrecon.core.phantoms import Ellipsoid, ellipsoid_volume, rotation_z

VOLUME = VolumeGeometry((24, 36, 40), (1.5, 1.0, 1.0), (2.0, -1.0, 0.5))


@pytest.fixture(scope="module")
def phantom():
    """A torso-like stand-in for an FDK volume: water body, two lungs, a spine, an organ, plus noise."""
    origin, half = np.array(VOLUME.offOrigin[::-1]), np.array(VOLUME.sVoxel[::-1]) / 2
    parts = [((0, 0, 0), (0.85, 0.7, 0.9), 0.25, 0.0), ((-0.35, 0.1, 0), (0.25, 0.35, 0.6), -0.17, 0.0),
             ((0.35, 0.1, 0), (0.25, 0.35, 0.6), -0.17, 0.0), ((0, -0.45, 0), (0.12, 0.12, 0.8), 0.35, 0.0),
             ((0.1, 0.2, -0.3), (0.2, 0.15, 0.3), 0.05, 0.5)]
    body = [Ellipsoid(tuple(origin + half * np.array(c)), tuple(half * np.array(a)), v, rotation_z(phi))
            for c, a, v, phi in parts]
    clean = ellipsoid_volume(body, VOLUME, supersample=2)
    noise = np.random.default_rng(0).normal(scale=0.01, size=clean.shape).astype(np.float32)
    return torch.from_numpy(clean + noise)


def correlation(a, b):
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


def seed_voxel_values(field, fdk):
    index = np.rint(VOLUME.world_to_index(field.means.detach().double().numpy())).astype(int)
    assert np.allclose(VOLUME.world_to_index(field.means.detach().double().numpy()), index, atol=1e-4)
    return fdk.numpy()[index[:, 2], index[:, 1], index[:, 0]], index


# --------------------------------------------------------------------------- initialisers
@pytest.mark.parametrize("name", ["fbp", "r2"])
def test_initializer_counts_positions_and_rendering(name, phantom):
    field = get_initializer(name)(phantom, VOLUME, 4000, torch.Generator().manual_seed(0))
    assert isinstance(field, GaussianField) and len(field) == 4000
    assert field.metadata["initializer"] == name and field.metadata["volume"] == VOLUME.to_dict()
    values, index = seed_voxel_values(field, phantom)
    assert np.all(values >= 0.05)  # every seed sits on a voxel centre above the threshold
    assert len(np.unique(index, axis=0)) == 4000  # distinct voxels
    bounds = VOLUME.bounds()
    assert np.all(field.means.detach().numpy() >= bounds[0]) and np.all(field.means.detach().numpy() <= bounds[1])
    assert torch.all(field.scales > 0) and torch.allclose(field.scales[:, 0], field.scales[:, 2])  # isotropic
    with torch.no_grad():
        rendered = field.render(VOLUME)
    assert correlation(rendered, phantom) > 0.8


def test_fbp_skips_the_top_gradient_band_and_fits_the_scale(phantom):
    field = fbp_initializer(phantom, VOLUME, 3000, skip_fraction=0.15)
    thresholded = np.where(phantom.numpy() >= 0.05, phantom.numpy(), 0.0)
    grad = np.zeros_like(thresholded)
    for axis in range(3):
        grad += np.diff(thresholded, axis=axis, append=np.take(thresholded, [-1], axis=axis)) ** 2
    grad = np.sqrt(grad)
    candidates = np.sort(grad[thresholded > 0])[::-1]
    skip = int(0.15 * candidates.size)
    _, index = seed_voxel_values(field, phantom)
    seed_grad = grad[index[:, 2], index[:, 1], index[:, 0]]
    assert seed_grad.max() <= candidates[skip] + 1e-6  # nothing from the skipped band
    assert seed_grad.min() >= candidates[skip + 3000 - 1] - 1e-6  # the next n in the ranking
    # "auto": the rendered field has the least-squares scale of the thresholded FDK
    with torch.no_grad():
        rendered = field.render(VOLUME).double().reshape(-1)
    target = torch.from_numpy(thresholded).double().reshape(-1)
    assert float(rendered @ target / (rendered @ rendered)) == pytest.approx(1.0, abs=0.02)
    fixed = fbp_initializer(phantom, VOLUME, 3000, intensity_scale=0.25)
    values, _ = seed_voxel_values(fixed, phantom)
    np.testing.assert_allclose(fixed.intensities.detach().numpy(), 0.25 * np.where(values >= 0.05, values, 0) + 0.001,
                               rtol=1e-4)


def test_r2_is_deterministic_with_a_seed_and_follows_its_density_rule(phantom):
    a = r2_initializer(phantom, VOLUME, 2000, torch.Generator().manual_seed(3))
    b = r2_initializer(phantom, VOLUME, 2000, torch.Generator().manual_seed(3))
    c = r2_initializer(phantom, VOLUME, 2000, torch.Generator().manual_seed(4))
    for name, param in a.raw_parameters().items():
        torch.testing.assert_close(param, b.raw_parameters()[name])
    assert not torch.equal(a.means, c.means)
    values, _ = seed_voxel_values(a, phantom)
    np.testing.assert_allclose(a.intensities.detach().numpy(), 0.15 * values, rtol=1e-4)
    from scipy.spatial import cKDTree
    points = a.means.detach().double().numpy()
    dist, _ = cKDTree(points).query(points, k=4)
    np.testing.assert_allclose(a.scales[:, 0].detach().numpy(), np.sqrt((dist[:, 1:] ** 2).mean(1)), rtol=1e-5)


def test_fbp_is_deterministic(phantom):
    a = fbp_initializer(phantom, VOLUME, 1500)
    b = fbp_initializer(phantom, VOLUME, 1500)
    torch.testing.assert_close(a.means, b.means)
    torch.testing.assert_close(a.raw_intensities, b.raw_intensities)


def test_more_gaussians_than_candidates_reuses_voxels_with_jitter():
    volume = VolumeGeometry((6, 6, 6), (1.0, 1.0, 1.0))
    fdk = torch.zeros(volume.shape)
    fdk[2:4, 2:4, 2:4] = 0.3  # 8 candidate voxels
    for fn in (fbp_initializer, r2_initializer):
        field = fn(fdk, volume, 20, torch.Generator().manual_seed(0))
        assert len(field) == 20
        index = volume.world_to_index(field.means.detach().double().numpy())
        assert np.all((index >= 1.5 - 1e-6) & (index <= 3.5 + 1e-6))  # within the candidate voxels


def test_initializer_input_errors(phantom):
    with pytest.raises(InputError, match="does not match"):
        fbp_initializer(phantom[:-1], VOLUME, 100)
    with pytest.raises(InputError, match="above the initialisation threshold"):
        r2_initializer(torch.zeros(VOLUME.shape), VOLUME, 100)
    with pytest.raises(InputError, match="n_gaussians"):
        r2_initializer(phantom, VOLUME, 0)


def test_registry():
    assert {"fbp", "r2"} <= set(available_initializers())
    with pytest.raises(InputError, match="unknown initializer 'nope'.*fbp"):
        get_initializer("nope")

    def custom(fdk, volume, n_gaussians=10, generator=None):
        return r2_initializer(fdk, volume, n_gaussians, generator)

    register_initializer("test-custom", custom)
    try:
        assert get_initializer("test-custom") is custom
        with pytest.raises(InputError, match="already registered"):
            register_initializer("test-custom", r2_initializer)
    finally:
        register_initializer("test-custom", r2_initializer, replace=True)


# --------------------------------------------------------------------------- density control
def make_setup(n=10):
    means = torch.zeros(n, 3)
    means[:, 0] = torch.arange(n, dtype=torch.float32) * 10.0
    scales = torch.full((n, 3), 0.5)
    scales[2:4] = 3.0  # large: split candidates
    intensities = torch.full((n,), 0.5)
    intensities[9] = 1e-7  # prunable
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(n, 1)
    field = GaussianField.from_values(means, scales, quats, intensities)
    optimizer = torch.optim.Adam(field.parameter_groups({"means": 0.01, "log_scales": 0.01, "quats": 0.01,
                                                         "intensities": 0.01}), eps=1e-15)
    return field, optimizer


def fake_step(field, optimizer, strategy, hot):
    """One optimiser step whose position gradients are 1 on the ``hot`` rows and 1e-3 elsewhere."""
    volume = VolumeGeometry((8, 8, 8), (1.0, 1.0, 1.0))
    field.render(volume).sum().backward()
    grad = torch.full((len(field), 3), 1e-3 / math.sqrt(3))
    grad[hot] = 1.0 / math.sqrt(3)
    field.means.grad = grad
    strategy.step_post_backward(field, optimizer, 0)
    optimizer.step()


def test_clone_split_prune_counts_and_optimizer_state():
    field, optimizer = make_setup()
    strategy = QuantileSplitCloneStrategy(densify_every=10, grad_threshold=0.5, percent_dense=0.1, scene_extent=20.0,
                                          start=0, min_scale=0.01, generator=torch.Generator().manual_seed(0))
    fake_step(field, optimizer, strategy, hot=[0, 1, 2, 3])
    old_state = {g["name"]: optimizer.state[g["params"][0]]["exp_avg"].clone() for g in optimizer.param_groups}
    old_means = field.means.detach().clone()
    old_intensities = field.intensities.detach().clone()
    assert strategy.step_post_update(field, optimizer, 5) is None  # not due
    stats = strategy.step_post_update(field, optimizer, 10)
    assert stats == {"cloned": 2, "split": 2, "pruned": 1, "total": 10 + 2 + 2 - 1}
    assert len(field) == 13
    params = field.raw_parameters()
    for group in optimizer.param_groups:
        param = group["params"][0]
        assert param is params[group["name"]]
        state = optimizer.state[param]
        assert state["exp_avg"].shape == param.shape and state["exp_avg_sq"].shape == param.shape
        # survivors (rows 0, 1, 4..8 in order) keep their moments; appended rows start at zero
        torch.testing.assert_close(state["exp_avg"][:7], old_state[group["name"]][[0, 1, 4, 5, 6, 7, 8]])
        assert torch.all(state["exp_avg"][7:] == 0)
    torch.testing.assert_close(field.means[:7], old_means[[0, 1, 4, 5, 6, 7, 8]])
    torch.testing.assert_close(field.means[7:9], old_means[[0, 1]])  # clones at their parents
    halves = old_intensities[[0, 1]] / 2
    torch.testing.assert_close(field.intensities[[0, 1, 7, 8]], torch.cat([halves, halves]))  # both halved
    torch.testing.assert_close(field.scales[9:], torch.full((4, 3), 3.0 / 1.6))  # split children
    assert strategy.mean_gradients(field).abs().sum() == 0  # statistics reset
    fake_step(field, optimizer, strategy, hot=[])  # the optimiser still works on the new Parameters
    assert all(torch.isfinite(p).all() for p in field.raw_parameters().values())


def test_cap_keeps_the_largest_gradients():
    field, optimizer = make_setup()
    strategy = QuantileSplitCloneStrategy(densify_every=1, grad_threshold=0.5, percent_dense=0.1, scene_extent=20.0,
                                          start=0, max_gaussians=11, min_scale=0.01)
    volume = VolumeGeometry((4, 4, 4), (1.0, 1.0, 1.0))
    field.render(volume).sum().backward()
    grad = torch.zeros(10, 3)
    grad[[0, 1, 2, 3], 0] = torch.tensor([1.0, 3.0, 2.0, 0.9])
    field.means.grad = grad
    strategy.step_post_backward(field, optimizer, 0)
    stats = strategy.step_post_update(field, optimizer, 1)
    assert stats["cloned"] == 1 and stats["split"] == 0 and len(field) <= 11  # only row 1 (largest)
    assert stats["total"] == 10
    # the quantile rule also respects the cap
    strategy = QuantileSplitCloneStrategy(densify_every=1, scene_extent=20.0, start=0, max_gaussians=len(field),
                                          min_scale=0.01)
    field.render(volume).sum().backward()
    field.means.grad = torch.rand(len(field), 3)
    strategy.step_post_backward(field, optimizer, 0)
    assert strategy.step_post_update(field, optimizer, 1)["total"] <= 10


def test_split_and_clone_preserve_rendered_mass():
    volume = VolumeGeometry((64, 64, 64), (0.5, 0.5, 0.5))
    quats = torch.tensor([[0.9, 0.3, -0.2, 0.1]])
    field = GaussianField.from_values(torch.tensor([[0.3, -0.2, 0.1]]), torch.tensor([[2.0, 1.2, 1.6]]), quats,
                                      torch.tensor([0.4]))
    with torch.no_grad():
        before = float(field.render(volume, 5.0).sum())
    strategy = QuantileSplitCloneStrategy(grad_threshold=0.1, percent_dense=0.01, scene_extent=32.0, min_scale=0.01,
                                          generator=torch.Generator().manual_seed(1))
    field.means.grad = torch.ones(1, 3)
    strategy.step_post_backward(field, None, 0)
    assert strategy.densify_and_prune(field, None)["split"] == 1 and len(field) == 2
    with torch.no_grad():
        after = float(field.render(volume, 5.0).sum())
    assert after == pytest.approx(before, rel=2e-3)
    strategy = QuantileSplitCloneStrategy(grad_threshold=0.1, percent_dense=1.0, scene_extent=32.0, min_scale=0.01)
    field.means.grad = torch.ones(2, 3)
    strategy.step_post_backward(field, None, 0)
    assert strategy.densify_and_prune(field, None)["cloned"] == 2 and len(field) == 4
    with torch.no_grad():
        assert float(field.render(volume, 5.0).sum()) == pytest.approx(after, rel=1e-5)


def test_prune_rules():
    field, _ = make_setup()
    with torch.no_grad():
        field.log_scales[4, 1] = math.log(0.001)  # degenerate
        field.log_scales[5, 0] = math.log(50.0)  # too large
    strategy = QuantileSplitCloneStrategy(scene_extent=20.0, max_scale=10.0, min_scale=0.01)
    stats = strategy.densify_and_prune(field, None)
    assert stats == {"cloned": 0, "split": 0, "pruned": 3, "total": 7}
    assert torch.equal(field.means[:, 0], torch.tensor([0.0, 10, 20, 30, 60, 70, 80]))


def test_controller_rejects_bad_settings():
    with pytest.raises(InputError):
        QuantileSplitCloneStrategy(densify_every=0)
    with pytest.raises(InputError):
        QuantileSplitCloneStrategy(grad_quantile=1.5)
