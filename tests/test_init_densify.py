"""Initialisers (fbp, r2, registry) and density control (clone / split / prune, optimiser state, cap, σ floor)."""
import math

import numpy as np
import pytest
import torch

from ctrecon.core.errors import InputError
from ctrecon.methods.gaussians import (AdditiveDensityStrategy, GaussianField, QuantileSplitCloneStrategy,
                                       available_initializers, get_initializer, register_initializer)
from ctrecon.methods.gaussians.init import fbp_initializer, r2_initializer
from ctrecon.core.geometry import ConeBeamGeometry, VolumeGeometry
from ctrecon.core.phantoms import Ellipsoid, ellipsoid_volume, rotation_z
from ctrecon.operators.projector import Projector
from ctrecon.pipeline.reconstruct import ReconstructConfig

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


# --------------------------------------------------------------------------- additive density control
GRID = VolumeGeometry((20, 20, 20), (1.0, 1.0, 1.0))


def random_field(seed, n=40):
    """Anisotropic, rotated, overlapping Gaussians; the first 5 so small that densifying them clones."""
    gen = torch.Generator().manual_seed(seed)
    scales = 0.7 + 2.3 * torch.rand(n, 3, generator=gen)
    scales[:5] = 0.55
    return GaussianField.from_values((torch.rand(n, 3, generator=gen) - 0.5) * 10, scales,
                                     torch.randn(n, 4, generator=gen), 0.1 + 0.4 * torch.rand(n, generator=gen))


def densify_all(field, strategy, optimizer=None):
    """One pass of ``strategy`` in which every Gaussian is a candidate."""
    field.means.grad = torch.ones(len(field), 3)
    strategy.step_post_backward(field, optimizer, 0)
    return strategy.densify_and_prune(field, optimizer)


def relative_change(before, field):
    with torch.no_grad():
        return float((field.render(GRID) - before).norm() / before.norm())


class ProjectionProblem:
    """The Trainer's data term on a small scan: projections of ``truth`` (12 views), divided by their maximum."""

    def __init__(self, truth: GaussianField, grid=GRID, units=1.0):
        self.grid = grid
        self.projector = Projector(ConeBeamGeometry.covering(grid, n_views=12))
        with torch.no_grad():
            measured = units * self.projector(truth.render(grid))
        self.scale = float(measured.abs().max())
        self.target = measured / self.scale
        self.units = units

    def loss(self, field, views=slice(None)):
        predicted = self.units * self.projector.subset(views)(field.render(self.grid)) / self.scale
        return torch.nn.functional.mse_loss(predicted, self.target[views])

    def record_gradients(self, field, strategy, batches=4):
        """``batches`` iterations of the loss over disjoint view subsets, each followed by the strategy's hook."""
        for views in np.array_split(np.arange(12), batches):
            field.means.grad = None
            self.loss(field, views).backward()
            strategy.step_post_backward(field, None, 0)


def two_blobs(scale=1.0):
    """Truth: two unequal blobs 7 mm apart; ``coarse``: one Gaussian with their mass, mean and spread."""
    truth = GaussianField.from_values(scale * torch.tensor([[-4.0, 0.5, 0.0], [3.0, -0.5, 0.5]]),
                                      scale * torch.full((2, 3), 1.5), torch.tensor([[1.0, 0, 0, 0]] * 2),
                                      torch.tensor([0.3, 0.15]))
    coarse = GaussianField.from_values(scale * torch.tensor([[-5.0 / 3.0, 1.0 / 6.0, 1.0 / 6.0]]),
                                       scale * torch.tensor([[3.6, 1.6, 1.55]]), torch.tensor([[1.0, 0, 0, 0]]),
                                       torch.tensor([0.45 * 1.5 ** 3 / (3.6 * 1.6 * 1.55)]))
    return truth, coarse


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_additive_pass_keeps_the_rendered_field(seed):
    field = random_field(seed)
    with torch.no_grad():
        before = field.render(GRID)
    stats = densify_all(field, AdditiveDensityStrategy(GRID, grad_threshold=0.0))
    assert stats == {"cloned": 5, "split": 35, "pruned": 0, "total": 80}
    assert relative_change(before, field) <= 0.05
    # the rule it replaces changes the same field by far more than deleting the densified Gaussians would
    field = random_field(seed)
    densify_all(field, QuantileSplitCloneStrategy(grad_threshold=0.0, scene_extent=20.0, percent_dense=0.0,
                                                  min_scale=0.01, generator=torch.Generator().manual_seed(0)))
    assert relative_change(before, field) > 0.5


def test_additive_split_moments_and_clone_copies():
    field = GaussianField.from_values(torch.tensor([[0.3, -0.2, 0.1], [5.0, 5.0, 5.0]]),
                                      torch.tensor([[1.2, 2.4, 1.6], [0.6, 0.58, 0.55]]),
                                      torch.tensor([[0.9, 0.3, -0.2, 0.1], [0.7, 0.1, 0.5, -0.2]]),
                                      torch.tensor([0.4, 0.2]))
    parent_cov, parent_mass = field.covariances()[0], 0.4 * torch.prod(field.scales[0])
    stats = densify_all(field, AdditiveDensityStrategy(GRID, grad_threshold=0.0, split_offset=0.6))
    assert stats == {"cloned": 1, "split": 1, "pruned": 0, "total": 4}
    # rows: the small Gaussian and its clone (both at half its intensity, in place), then the two children
    torch.testing.assert_close(field.intensities[:2], torch.tensor([0.1, 0.1]))
    torch.testing.assert_close(field.means[1], torch.tensor([5.0, 5.0, 5.0]))
    children = slice(2, 4)
    weights = field.intensities[children] * torch.prod(field.scales[children], dim=1)
    torch.testing.assert_close(weights.sum(), parent_mass)  # mass kept
    centre = field.means[children].mean(0)
    torch.testing.assert_close(centre, torch.tensor([0.3, -0.2, 0.1]))
    spread = field.means[children] - centre
    mixture_cov = (field.covariances()[children] + spread[:, :, None] * spread[:, None, :]).mean(0)
    torch.testing.assert_close(mixture_cov, parent_cov, rtol=1e-5, atol=1e-5)  # covariance kept
    torch.testing.assert_close(field.scales[children].max(dim=1).values, torch.full((2,), 2.4 * 0.8))


def test_additive_pass_does_not_raise_the_data_loss():
    truth = random_field(7)
    problem = ProjectionProblem(truth)
    field = random_field(7)  # a rough fit of the same scan: the same Gaussians, moved and brightened
    with torch.no_grad():
        field.means.mul_(0.95)
        field.raw_intensities.copy_(field.raw_from_intensities(1.1 * truth.intensities))
        before = float(problem.loss(field))
    densify_all(field, AdditiveDensityStrategy(GRID, grad_threshold=0.0))
    with torch.no_grad():
        assert float(problem.loss(field)) <= before * 1.01
        truth_loss = float(problem.loss(truth))
    assert truth_loss == 0.0
    densify_all(truth, AdditiveDensityStrategy(GRID, grad_threshold=0.0))
    with torch.no_grad():
        assert float(problem.loss(truth)) < 1e-2 * before  # an exact fit stays (nearly) exact


@pytest.mark.parametrize("name", ["3dgr", "additive"])
def test_densify_under_sigmoid_stays_finite(name):
    field = GaussianField.from_values(torch.zeros(2, 3), torch.tensor([[3.0, 2.0, 2.5], [0.55, 0.55, 0.55]]),
                                      torch.tensor([[1.0, 0, 0, 0]] * 2), torch.tensor([0.8, 0.9]),
                                      intensity_activation="sigmoid")
    strategy = (AdditiveDensityStrategy(GRID, grad_threshold=0.0) if name == "additive" else
                QuantileSplitCloneStrategy(grad_threshold=0.0, percent_dense=0.1, scene_extent=10.0, min_scale=0.01))
    stats = densify_all(field, strategy)
    assert stats == {"cloned": 1, "split": 1, "pruned": 0, "total": 4}  # nothing lost to NaN
    assert all(torch.isfinite(p).all() for p in field.raw_parameters().values())
    assert torch.all((field.intensities > 0) & (field.intensities < 1))


def test_absolute_criterion_follows_the_data():
    truth, coarse = two_blobs()
    strategy = AdditiveDensityStrategy(GRID)
    # no gradients, zero gradients, and an exact fit densify nothing
    assert strategy.densify_and_prune(coarse, None)["total"] == 1
    coarse.means.grad = torch.zeros(1, 3)
    strategy.step_post_backward(coarse, None, 0)
    assert strategy.densify_and_prune(coarse, None)["total"] == 1
    strategy.reset()
    ProjectionProblem(truth).record_gradients(truth, strategy)
    assert float(strategy.scores(truth).max()) < 1e-3 * strategy.grad_threshold
    assert strategy.densify_and_prune(truth, None)["total"] == 2
    # a fit off by 1e-5 (relative intensity, and 1e-5 mm): still nothing
    near = GaussianField.from_values(truth.means.detach() + 1e-5, truth.scales.detach(), truth.quats.detach(),
                                     truth.intensities.detach() * (1 + 1e-5))
    strategy.reset()
    ProjectionProblem(truth).record_gradients(near, strategy)
    assert strategy.densify_and_prune(near, None)["total"] == 2
    # one Gaussian standing for both blobs is too coarse: split along its major axis (x)
    strategy.reset()
    ProjectionProblem(truth).record_gradients(coarse, strategy)
    assert float(strategy.scores(coarse)[0]) > 3 * strategy.grad_threshold
    assert strategy.densify_and_prune(coarse, None)["split"] == 1 and len(coarse) == 2
    assert abs(float(coarse.means.detach()[0, 0] - coarse.means.detach()[1, 0])) == pytest.approx(
        2 * strategy.split_offset * 3.6, rel=1e-5)


def test_scores_do_not_depend_on_object_size_or_projection_units():
    scores = []
    for scale, units in ((1.0, 1.0), (10.0, 1000.0)):
        truth, coarse = two_blobs(scale)
        grid = VolumeGeometry(GRID.nVoxel, tuple(scale * d for d in GRID.dVoxel))
        strategy = AdditiveDensityStrategy(grid)
        ProjectionProblem(truth, grid, units).record_gradients(coarse, strategy)
        scores.append(strategy.scores(coarse))
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-3, atol=0.0)


def test_scale_floor_holds():
    grid = VolumeGeometry((8, 8, 8), (2.0, 1.0, 1.0))  # floor: 0.5 × the largest voxel side = 1 mm
    field = GaussianField.from_values(torch.zeros(3, 3), torch.tensor([[0.2, 3.0, 1.0], [1.1, 1.1, 1.1],
                                                                      [1.2, 1.0, 1.5]]),
                                      torch.tensor([[1.0, 0, 0, 0]] * 3), torch.tensor([0.3, 0.3, 0.3]))
    optimizer = torch.optim.Adam(field.parameter_groups({"log_scales": 0.1}), eps=1e-15)
    strategy = AdditiveDensityStrategy(grid, grad_threshold=0.0, densify_every=5, start=5)
    for iteration in range(1, 11):
        field.log_scales.grad = torch.ones_like(field.log_scales)  # every step shrinks every σ
        field.means.grad = torch.ones_like(field.means)
        strategy.step_post_backward(field, optimizer, iteration)
        optimizer.step()
        strategy.step_post_update(field, optimizer, iteration)
        assert float(field.scales.detach().min()) >= 1.0 * (1 - 1e-6)
    assert len(field) == 12  # two passes densified every Gaussian, and the children respect the floor too


def test_additive_cap_keeps_the_largest_scores():
    field = random_field(0)
    strategy = AdditiveDensityStrategy(GRID, grad_threshold=0.0, max_gaussians=45)
    field.means.grad = torch.zeros(40, 3)
    field.means.grad[:, 0] = torch.arange(40, dtype=torch.float32) + 1.0  # rows 35..39 score highest
    strategy.step_post_backward(field, None, 0)
    assert strategy.densify_and_prune(field, None) == {"cloned": 0, "split": 5, "pruned": 0, "total": 45}
    field.means.grad = torch.ones(45, 3)
    strategy.step_post_backward(field, None, 0)
    assert strategy.densify_and_prune(field, None)["total"] == 45  # at the cap: nothing more


def test_additive_schedule_and_settings():
    strategy = AdditiveDensityStrategy(GRID, grad_threshold=0.0)
    assert (strategy.densify_every, strategy.start, strategy.stop) == (100, 200, 10_000)
    field = random_field(0)
    field.means.grad = torch.ones(40, 3)
    strategy.step_post_backward(field, None, 99)
    assert strategy.step_post_update(field, None, 100) is None  # before start: no pass, but a new window
    assert float(strategy.mean_gradients(field).abs().sum()) == 0.0
    strategy.step_post_backward(field, None, 199)
    assert strategy.step_post_update(field, None, 199) is None and strategy.step_post_update(field, None, 200)
    built = ReconstructConfig.from_dict({"strategy": "additive", "split_offset": 0.5, "max_gaussians": 300_000}
                                        ).density.build(GRID, torch.Generator())
    assert isinstance(built, AdditiveDensityStrategy) and (built.split_offset, built.max_gaussians) == (0.5, 300_000)
    assert (built.densify_every, built.start, built.stop) == (100, 200, 10_000)
    default = ReconstructConfig.from_dict({"densify_from": 50}).density.build(GRID, torch.Generator())
    assert isinstance(default, QuantileSplitCloneStrategy) and (default.start, default.stop) == (50, 7_500)
    for bad in ({"split_offset": 1.0}, {"min_scale_voxels": 0.0}, {"densify_grad_threshold": -1.0},
                {"densify_every": 0}):
        with pytest.raises(InputError, match=next(iter(bad))):
            ReconstructConfig.from_dict({"strategy": "additive", **bad})
    with pytest.raises(InputError, match="split_offset"):
        AdditiveDensityStrategy(GRID, split_offset=0.0)
