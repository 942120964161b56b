"""Classical solvers: CGLS against SciPy's LSQR on an explicit matrix, SART / OS-SART convergence (full and
offset short scans), MFISTA-TV monotonicity, the TV prox against scikit-image, and bad settings."""
import math

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import lsqr
from skimage.restoration import denoise_tv_chambolle

from ctrecon.core import phantoms
from ctrecon.core.errors import InputError
from ctrecon.core.geometry import ConeBeamGeometry, VolumeGeometry, short_scan_arc
from ctrecon.methods.classical import (CGLS, FISTATV, OSSART, SART, SOLVERS, gradient, gradient_adjoint,
                                       make_solver, power_norm, tv, tv_prox)
from ctrecon.operators.projector import Projector


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def explicit_system():
    """A tiny projector (volume 6×8×8, 5 views, detector 8×12), its dense matrix [rays, voxels] and a
    consistent-plus-noise right-hand side."""
    volume = VolumeGeometry((6, 8, 8), (1.0, 1.0, 1.0))
    geometry = ConeBeamGeometry.covering(volume, n_views=5, nDetector=(8, 12))
    A = Projector(geometry)
    n_voxels = math.prod(volume.shape)
    units = torch.eye(n_voxels, dtype=torch.float64).reshape(n_voxels, *volume.shape)
    matrix = A(units).reshape(n_voxels, -1).T.numpy()
    rng = np.random.default_rng(0)
    b = matrix @ rng.uniform(0.0, 1.0, n_voxels)
    b += 0.05 * np.abs(b).max() * rng.standard_normal(b.shape)
    return A, matrix, b


def shepp_logan_case(geometry):
    """Projector, voxelised Shepp–Logan (float64) and its noiseless projections A x."""
    A = Projector(geometry)
    x_true = torch.from_numpy(phantoms.ellipsoid_volume(phantoms.shepp_logan_3d(geometry.volume),
                                                        geometry.volume)).double()
    return A, x_true, A(x_true)


@pytest.fixture(scope="module")
def full_scan():
    return shepp_logan_case(ConeBeamGeometry.covering(VolumeGeometry((16, 20, 20), (1.0, 1.0, 1.0)), n_views=40))


@pytest.fixture(scope="module")
def offset_short_scan():
    """Short scan (π + fan) with a detector shifted by (1.5, 2.5) pixels, still wide enough for the object."""
    DSD, n_detector, d_detector, offset = 90.0, (20, 30), (2.0, 2.0), (3.0, 5.0)
    geometry = ConeBeamGeometry.circular(DSO=60.0, DSD=DSD, nDetector=n_detector, dDetector=d_detector,
                                         nVoxel=(16, 20, 20), dVoxel=(1.0, 1.0, 1.0), n_views=40,
                                         arc=short_scan_arc(DSD, n_detector, d_detector, offset),
                                         offDetector=offset)
    assert geometry.is_short_scan() and geometry.arc < 1.3 * math.pi
    A, x_true, b = shepp_logan_case(geometry)
    assert b[:, [0, -1]].abs().max() == 0 and b[:, :, [0, -1]].abs().max() == 0  # the object's shadow fits
    return A, x_true, b


def relative(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------- CGLS
def test_cgls_iterates_equal_lsqr_and_residuals_never_grow(explicit_system):
    A, matrix, b = explicit_system
    solver = CGLS(A, torch.from_numpy(b).reshape(A.projection_shape))
    previous = np.linalg.norm(b)
    for k in range(1, 9):
        loss = solver.step()
        reference = lsqr(matrix, b, iter_lim=k, atol=0.0, btol=0.0, conlim=0.0)[0]
        x = solver.x.reshape(-1).numpy()
        assert np.linalg.norm(x - reference) <= 1e-9 * np.linalg.norm(reference), k
        residual = np.linalg.norm(b - matrix @ x)
        assert loss == pytest.approx(residual ** 2 / b.size, rel=1e-9)
        assert residual <= previous * (1 + 1e-12)
        previous = residual
    assert solver.iteration == 8 and previous < 0.5 * np.linalg.norm(b)


def test_cgls_stops_cleanly_at_an_exact_solution(explicit_system):
    A, _, _ = explicit_system
    solver = make_solver("cgls", A, torch.zeros(A.projection_shape, dtype=torch.float64))
    assert solver.converged
    assert solver.run(3) == [0.0, 0.0, 0.0]
    assert torch.count_nonzero(solver.x) == 0 and torch.isfinite(solver.x).all()


# ---------------------------------------------------------------------------------- SART / OS-SART
def converge(solver, x_true, passes):
    """Relative residual ‖Ax − b‖/‖b‖ and relative error to x_true after each pass."""
    A, b = solver.projector, solver.b
    history = []
    for _ in range(passes):
        solver.step()
        assert solver.x.min() >= 0
        history.append((relative(A(solver.x), b), relative(solver.x, x_true)))
    return np.array(history)


@pytest.mark.parametrize("case", ["full_scan", "offset_short_scan"])
@pytest.mark.parametrize("name, settings", [("sart", {}), ("os-sart", {"subsets": 8})])
def test_sart_fits_noiseless_projections(request, case, name, settings):
    A, x_true, b = request.getfixturevalue(case)
    solver = make_solver(name, A, b, **settings)
    assert solver.subsets == (A.n_views if name == "sart" else 8)
    history = converge(solver, x_true, 12)
    residuals, errors = history[:, 0], history[:, 1]
    assert residuals[-1] < 0.03 and residuals[-1] < 0.5 * residuals[0]
    assert np.all(np.diff(errors) < 0), errors
    assert errors[-1] < 0.8 * errors[0]


def test_os_sart_follows_its_formula_on_the_explicit_matrix(explicit_system):
    """Two passes against a dense numpy transcription of the documented update, weights and loss."""
    A, matrix, b = explicit_system
    n_views, subsets, relaxation = A.n_views, 2, 1.5
    solver = OSSART(A, torch.from_numpy(b).reshape(A.projection_shape), subsets=subsets, relaxation=relaxation,
                    relaxation_decay=0.9, order="random", seed=5)
    rays = np.arange(b.size).reshape(n_views, -1)
    x = np.zeros(matrix.shape[1])
    order = torch.Generator().manual_seed(5)
    for _ in range(2):
        squared = 0.0
        for block in torch.randperm(subsets, generator=order).tolist():
            rows = rays[block::subsets].reshape(-1)
            A_S = matrix[rows]
            lengths, coverage = A_S.sum(1), A_S.sum(0)
            W = np.where(lengths > 0.5, 1.0 / np.maximum(lengths, 1e-300), 0.0)  # half a 1 mm voxel
            V = np.where(coverage > 1e-6 * coverage.max(), 1.0 / np.maximum(coverage, 1e-300), 0.0)
            residual = b[rows] - A_S @ x
            squared += np.sum(residual ** 2)
            x = np.maximum(x + relaxation * V * (A_S.T @ (W * residual)), 0.0)
        relaxation *= 0.9
        assert solver.step() == pytest.approx(squared / b.size, rel=1e-10)
        np.testing.assert_allclose(solver.x.reshape(-1).numpy(), x, rtol=1e-10, atol=1e-12)
    assert solver.relaxation == pytest.approx(relaxation) and np.any(x == 0) and np.any(x > 0)


def test_golden_order_spreads_consecutive_blocks_and_visits_each_once(full_scan):
    A, _, b = full_scan
    for subsets in (8, 13, 30):
        order = OSSART(A, b, subsets=subsets)._golden.tolist()
        assert sorted(order) == list(range(subsets))
        gaps = [min(abs(a - c), subsets - abs(a - c)) for a, c in zip(order, order[1:])]
        assert min(gaps) >= subsets // 5  # never a neighbouring block next (angles k::subsets are adjacent)


def test_sart_is_deterministic_for_a_seed_and_caching_does_not_matter(full_scan):
    A, x_true, b = full_scan

    def run(**settings):
        solver = OSSART(A, b, subsets=8, order="random", **settings)
        solver.run(2)
        return solver

    cached, again, other_seed = run(seed=3), run(seed=3), run(seed=4)
    assert cached._volume_weights is not None
    assert torch.equal(cached.x, again.x)
    assert not torch.equal(cached.x, other_seed.x)
    recomputed = run(seed=3, memory_budget=1)
    assert recomputed._volume_weights is None
    torch.testing.assert_close(recomputed.x, cached.x, rtol=1e-12, atol=1e-14)
    assert cached.relaxation == pytest.approx(0.99 ** 2)


def test_os_sart_defaults_and_float32():
    volume = VolumeGeometry((8, 10, 10), (1.0, 1.0, 1.0))
    few, many = (Projector(ConeBeamGeometry.covering(volume, n_views=n)) for n in (12, 30))
    assert OSSART(few, torch.zeros(few.projection_shape)).subsets == 12
    assert OSSART(many, torch.zeros(many.projection_shape)).subsets == 20
    b = few(torch.ones(volume.shape))
    solver = make_solver("os-sart", few, b, subsets=4)
    losses = solver.run(3)
    assert solver.x.dtype == torch.float32 and losses[-1] < 0.1 * losses[0]


# ---------------------------------------------------------------------------------- FISTA-TV
def test_fista_tv_objective_never_increases(full_scan):
    A, x_true, b = full_scan
    solver = FISTATV(A, b, tv_weight=0.02, tv_iterations=10)
    start = solver.objective(solver.x)
    values = solver.run(20)
    assert values[0] <= start and values[-1] < 0.05 * start
    assert np.all(np.diff(values) <= 0), values
    assert values[-1] == pytest.approx(solver.objective(solver.x), rel=1e-12)
    assert solver.x.min() >= 0
    data = 0.5 * float((A(solver.x) - b).square().mean()) / float(b.abs().max()) ** 2
    assert values[-1] == pytest.approx(data + 0.02 * tv(solver.x), rel=1e-12)
    assert 0.02 * tv(solver.x) > 0.1 * values[-1]  # the TV term matters at this weight


def test_mfista_rejects_steps_that_would_increase_the_objective(full_scan):
    """With half the Lipschitz bound plain FISTA overshoots; the monotone variant keeps x_{k-1} instead."""
    A, x_true, b = full_scan
    bound = FISTATV(A, b, tv_weight=0.02, tv_iterations=10).lipschitz
    solver = FISTATV(A, b, tv_weight=0.02, tv_iterations=10, lipschitz=0.5 * bound)
    values, kept = [], 0
    for _ in range(15):
        previous = solver.x
        values.append(solver.step())
        kept += solver.x is previous
    assert np.all(np.diff(values) <= 0), values
    assert kept >= 3 and values[-1] < 0.5 * values[0]


def test_fista_without_tv_approaches_the_least_squares_fit(full_scan):
    A, x_true, b = full_scan
    fista = make_solver("fista-tv", A, b, tv_weight=0.0, nonnegative=False)
    cgls = make_solver("cgls", A, b)
    start = fista.objective(fista.x)
    for _ in range(30):
        fista.step()
        cgls.step()
    fista_residual, cgls_residual = relative(A(fista.x), b), relative(A(cgls.x), b)
    assert fista.objective(fista.x) < 1e-3 * start
    assert fista_residual < 3 * cgls_residual, (fista_residual, cgls_residual)


def test_power_norm_and_given_lipschitz(explicit_system):
    A, matrix, b = explicit_system
    exact = np.linalg.norm(matrix, 2) ** 2
    estimate = power_norm(A, 15)
    assert 0.95 * exact <= estimate <= exact * (1 + 1e-12)
    projections = torch.from_numpy(b).reshape(A.projection_shape)
    solver = FISTATV(A, projections)
    assert solver.lipschitz == pytest.approx(1.05 * estimate / (b.size * np.abs(b).max() ** 2), rel=1e-12)
    assert FISTATV(A, projections, lipschitz=2.5).lipschitz == 2.5


# ---------------------------------------------------------------------------------- TV prox
def noisy_image(shape=(10, 12, 14), seed=0):
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    image = (x ** 2 + y ** 2 + z ** 2 < 0.5).astype(np.float64) + 0.3 * (x > 0.2)
    return image + 0.3 * rng.standard_normal(shape)


def rof_objective(x, v, weight):
    """½‖x − v‖² + weight·Σ|∇x| (forward differences, zero at the far border), computed in numpy."""
    x = np.asarray(x, dtype=np.float64)
    differences = [np.diff(x, axis=axis, append=np.take(x, [-1], axis=axis)) for axis in range(3)]
    return 0.5 * np.sum((x - v) ** 2) + weight * np.sum(np.sqrt(sum(d ** 2 for d in differences)))


def test_gradient_adjoint_is_the_transpose():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((4, 5, 6), generator=generator, dtype=torch.float64)
    p = torch.randn((3, 4, 5, 6), generator=generator, dtype=torch.float64)
    assert float((gradient(x) * p).sum()) == pytest.approx(float((x * gradient_adjoint(p)).sum()), rel=1e-12)
    assert torch.count_nonzero(gradient(x)[0, -1]) == 0 and torch.count_nonzero(gradient(x)[2, :, :, -1]) == 0


@pytest.mark.parametrize("weight", [0.05, 0.3])
def test_tv_prox_matches_scikit_image(weight):
    v = noisy_image()
    ours, _ = tv_prox(torch.from_numpy(v), weight, iterations=400, nonnegative=False)
    theirs = denoise_tv_chambolle(v, weight=weight, eps=1e-10, max_num_iter=3000)
    ours_value, theirs_value, start = (rof_objective(x, v, weight) for x in (ours.numpy(), theirs, v))
    assert ours_value <= theirs_value + 1e-6 * theirs_value
    assert ours_value == pytest.approx(theirs_value, rel=1e-4)
    assert ours_value < 0.9 * start
    assert np.linalg.norm(ours.numpy() - theirs) <= 1e-2 * np.linalg.norm(theirs)
    assert tv(ours) == pytest.approx(np.mean(np.sqrt(sum(
        np.diff(ours.numpy(), axis=a, append=np.take(ours.numpy(), [-1], axis=a)) ** 2 for a in range(3)))))


def test_tv_prox_respects_nonnegativity_and_warm_starts():
    v = noisy_image(seed=1) - 0.6
    weight = 0.1
    constrained, dual = tv_prox(torch.from_numpy(v), weight, iterations=300, nonnegative=True)
    assert constrained.min() >= 0 and (v < 0).any()
    clipped = np.maximum(denoise_tv_chambolle(v, weight=weight, eps=1e-10, max_num_iter=3000), 0.0)
    assert rof_objective(constrained.numpy(), v, weight) < rof_objective(clipped, v, weight)
    assert dual.shape == (3, *v.shape) and float(dual.square().sum(0).max()) <= 1 + 1e-12
    cold, _ = tv_prox(torch.from_numpy(v), weight, iterations=5, nonnegative=True)
    warm, _ = tv_prox(torch.from_numpy(v), weight, iterations=5, nonnegative=True, dual=dual)
    assert relative(warm, constrained) < 0.1 * relative(cold, constrained)
    zero_weight, _ = tv_prox(torch.from_numpy(v), 0.0)
    assert torch.equal(zero_weight, torch.from_numpy(v).clamp(min=0))


# ---------------------------------------------------------------------------------- settings
def test_bad_settings_are_input_errors(explicit_system):
    A, _, b = explicit_system
    projections = torch.from_numpy(b).reshape(A.projection_shape)
    cases = [
        (lambda: make_solver("art", A, projections), "unknown solver 'art'.*sart, os-sart, cgls, fista-tv"),
        (lambda: make_solver("os-sart", A, projections, subsets=6), r"subsets \(6\) cannot exceed .* \(5\)"),
        (lambda: make_solver("os-sart", A, projections, subsets=0), "subsets must be a positive integer"),
        (lambda: make_solver("sart", A, projections, relaxation=0.0), r"relaxation must lie in \(0, 2\)"),
        (lambda: make_solver("sart", A, projections, relaxation=2.0), r"relaxation must lie in \(0, 2\)"),
        (lambda: make_solver("sart", A, projections, relaxation_decay=1.5), "relaxation_decay"),
        (lambda: make_solver("sart", A, projections, subsets=2), "unknown setting.*subsets for sart.*relaxation"),
        (lambda: make_solver("cgls", A, projections, tv_weight=1.0), "tv_weight for cgls .known: none"),
        (lambda: make_solver("fista-tv", A, projections, tv_weight=-1e-3), "tv_weight must be .* >= 0"),
        (lambda: make_solver("fista-tv", A, projections, tv_iterations=0), "tv_iterations must be a positive"),
        (lambda: make_solver("fista-tv", A, projections, lipschitz=0.0), "lipschitz must be"),
        (lambda: make_solver("cgls", A, projections, x0=torch.zeros(6, 8, 7)), r"x0 must have shape .*\(6, 8, 8\)"),
        (lambda: make_solver("cgls", A, projections[:4]), "projections must have shape"),
        (lambda: make_solver("cgls", A, projections.to(torch.int64)), "float32 or float64"),
        (lambda: make_solver("cgls", A, projections * float("nan")), "finite"),
        (lambda: make_solver("cgls", A, projections).run(0), "iterations must be a positive integer"),
    ]
    for build, message in cases:
        with pytest.raises(InputError, match=message):
            build()
    assert set(SOLVERS) == {"sart", "os-sart", "cgls", "fista-tv"} and SOLVERS["sart"] is SART
