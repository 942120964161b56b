"""Gaussian voxel renderer: brute-force oracle, gradients, integrals, truncation, points, batches, backends."""
import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from ctrecon.operators import _backend
from ctrecon.core.errors import InputError
from ctrecon.operators.voxelize import (BOX_SLACK, _cpu_grid, bounding_half_widths, cpu_voxelizer, precision_entries,
                                        render_points, voxelize, voxelize_batch)
from ctrecon.core.geometry import VolumeGeometry

BACKENDS = ["reference", "cpu"]
VOLUME = VolumeGeometry((6, 7, 8), (1.0, 1.2, 0.9), (0.5, -0.3, 0.2))


@pytest.fixture(scope="module")
def compiled():
    if cpu_voxelizer.get() is None:
        pytest.fail(f"compiled CPU voxelizer failed to build: {cpu_voxelizer.error}")


def random_gaussians(n, volume=VOLUME, seed=0, dtype=torch.float64, batch=None):
    g = torch.Generator().manual_seed(seed)
    lead = (n,) if batch is None else (batch, n)
    span = torch.tensor(volume.sVoxel[::-1], dtype=dtype)
    centre = torch.tensor(volume.offOrigin[::-1], dtype=dtype)
    means = centre + (torch.rand(*lead, 3, generator=g, dtype=dtype) - 0.5) * span * 1.1
    scales = 0.3 + 1.5 * torch.rand(*lead, 3, generator=g, dtype=dtype)
    quats = torch.randn(*lead, 4, generator=g, dtype=dtype)
    intensities = torch.rand(*lead, generator=g, dtype=dtype) + 0.1
    return means, scales, quats, intensities


def brute_force(means, scales, quats, intensities, points, k_sigma):
    """All Gaussians × all points in float64 numpy, Σ⁻¹ by matrix inversion, scipy's quaternion convention."""
    means, scales, quats, intensities = (t.detach().double().numpy() for t in (means, scales, quats, intensities))
    rot = Rotation.from_quat(quats[:, [1, 2, 3, 0]]).as_matrix()  # scipy wants (x, y, z, w)
    cov = rot @ (scales[:, :, None] ** 2 * np.swapaxes(rot, 1, 2))
    inv = np.linalg.inv(cov)
    d = points[None, :, :] - means[:, None, :]
    q = np.einsum("gpi,gij,gpj->gp", d, inv, d)
    return np.where(q <= k_sigma ** 2, intensities[:, None] * np.exp(-0.5 * q), 0.0).sum(0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k_sigma", [2.0, 3.0])
def test_voxelize_matches_brute_force(backend, dtype, k_sigma, compiled):
    params = random_gaussians(25, dtype=dtype)
    out = voxelize(*params, VOLUME, k_sigma, backend=backend)
    assert out.shape == VOLUME.shape and out.dtype == dtype
    expect = brute_force(*params, VOLUME.voxel_centres().reshape(-1, 3), k_sigma).reshape(VOLUME.shape)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    np.testing.assert_allclose(out.numpy(), expect, atol=tol, rtol=tol)
    assert np.count_nonzero(expect) > 50  # the case is not trivially empty


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_all_parameters(backend, compiled):
    volume = VolumeGeometry((4, 5, 6), (1.0, 0.8, 0.9))
    means, scales, quats, intensities = random_gaussians(4, volume, seed=3)
    scales = scales * 0.7
    inputs = tuple(t.clone().requires_grad_(True) for t in (means, scales, quats, intensities))
    weights = torch.randn(volume.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def fn(m, s, q, i):
        return (voxelize(m, s, q, i, volume, 2.5, backend=backend) * weights).sum()

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_render_points():
    volume = VolumeGeometry((4, 5, 6), (1.0, 0.8, 0.9))
    params = random_gaussians(3, volume, seed=4)
    inputs = tuple(t.clone().requires_grad_(True) for t in params)
    points = torch.as_tensor(volume.voxel_centres().reshape(-1, 3)[::3]) + 0.1
    assert torch.autograd.gradcheck(lambda *a: render_points(*a, points, 2.5), inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integral_of_one_gaussian(backend, compiled):
    volume = VolumeGeometry((60, 64, 68), (0.25, 0.25, 0.25), (0.1, -0.2, 0.3))
    scales = torch.tensor([[1.1, 0.8, 1.6]], dtype=torch.float64)
    quats = torch.tensor([[0.9, 0.2, -0.3, 0.25]], dtype=torch.float64)
    means = torch.tensor([[0.2, -0.1, 0.3]], dtype=torch.float64)
    out = voxelize(means, scales, quats, torch.tensor([0.7], dtype=torch.float64), volume, 6.0, backend=backend)
    integral = float(out.sum()) * 0.25 ** 3
    expect = 0.7 * (2 * math.pi) ** 1.5 * float(scales.prod())
    assert integral == pytest.approx(expect, rel=1e-4)


def test_bounding_box_is_exact_for_rotated_gaussians():
    """k·sqrt(diag Σ) equals the extent of the ellipsoid q = k² (sampled on its surface)."""
    scales = torch.tensor([[3.0, 0.4, 1.0]], dtype=torch.float64)
    quats = torch.tensor(Rotation.from_euler("zyx", [35, 20, -50], degrees=True).as_quat()[[3, 0, 1, 2]])[None]
    half = bounding_half_widths(scales, quats, 3.0)[0].numpy()
    u = np.random.default_rng(0).normal(size=(200_000, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    rot = Rotation.from_quat(quats[0, [1, 2, 3, 0]].numpy()).as_matrix()
    surface = (3.0 * u * scales[0].numpy()) @ rot.T
    np.testing.assert_allclose(np.abs(surface).max(0), half, rtol=2e-3)
    assert np.all(np.abs(surface).max(0) <= half * (1 + 1e-12))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotated_needle_is_not_clipped(backend, compiled):
    """A long thin rotated Gaussian reaches voxels far along its diagonal axis, exactly as brute force."""
    volume = VolumeGeometry((24, 24, 24), (1.0, 1.0, 1.0))
    scales = torch.tensor([[4.0, 0.5, 0.5]], dtype=torch.float64)
    axis = np.array([1.0, 1.0, 1.0]) / math.sqrt(3)
    rot = Rotation.align_vectors([axis], [[1.0, 0.0, 0.0]])[0]
    quats = torch.tensor(rot.as_quat()[[3, 0, 1, 2]])[None]
    means = torch.tensor([[-6.3, -6.6, -6.1]], dtype=torch.float64)  # the tail reaches the far side of the centre
    intens = torch.tensor([1.0], dtype=torch.float64)
    out = voxelize(means, scales, quats, intens, volume, 3.0, backend=backend)
    expect = brute_force(means, scales, quats, intens, volume.voxel_centres().reshape(-1, 3), 3.0)
    np.testing.assert_allclose(out.reshape(-1).numpy(), expect, atol=1e-12)
    far = means[0].numpy() + 11.0 * axis  # 2.75 σ along the long axis
    index = np.rint(volume.world_to_index(far)).astype(int)
    assert out[index[2], index[1], index[0]] > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncation_is_inclusive_at_k_sigma(backend, compiled):
    """A voxel exactly k σ away along an axis counts (q ≤ k², not <)."""
    volume = VolumeGeometry((1, 1, 9), (1.0, 1.0, 1.0))
    args = (torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([[1.0, 0, 0, 0]]),
            torch.tensor([1.0]))
    out = voxelize(*args, volume, 3.0, backend=backend)[0, 0]
    assert out[1] == pytest.approx(math.exp(-4.5)) and out[0] == 0.0  # x = -3 counts, x = -4 does not


def test_compiled_matches_reference_forward_and_backward(compiled):
    volume = VolumeGeometry((20, 22, 24), (1.0, 1.0, 1.0), (0.0, 0.5, -0.5))
    params = random_gaussians(300, volume, seed=5, dtype=torch.float32)
    weights = torch.rand(volume.shape, generator=torch.Generator().manual_seed(2))
    results = {}
    for name in ("reference", "cpu"):
        inputs = [t.clone().requires_grad_(True) for t in params]
        out = voxelize(*inputs, volume, backend=name)
        (out * weights).sum().backward()
        results[name] = [out.detach()] + [t.grad for t in inputs]
    for ref, other in zip(results["reference"], results["cpu"]):
        scale = float(ref.abs().max())
        torch.testing.assert_close(other, ref, atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_precision_is_the_reference_bit_for_bit(dtype, compiled):
    """The CPU kernel forms P with the operations of precision_entries, so every truncation test agrees exactly."""
    means, scales, quats, intensities = random_gaussians(2000, seed=12, dtype=dtype)
    prec = cpu_voxelizer.get().forward(means, scales, quats, intensities, *_cpu_grid(VOLUME, dtype), 1, 3.0,
                                       BOX_SLACK)[1]
    assert torch.equal(prec, precision_entries(scales, quats))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_precision_backward_is_the_chain_of_precision_entries(dtype, compiled):
    _, scales, quats, _ = random_gaussians(200, seed=13, dtype=dtype)
    quats = quats * 3.0  # not normalised
    grad = torch.randn(200, 6, dtype=dtype, generator=torch.Generator().manual_seed(3))
    inputs = [t.clone().requires_grad_(True) for t in (scales, quats)]
    expected = torch.autograd.grad(precision_entries(*inputs), inputs, grad)
    got = cpu_voxelizer.get().precision_backward(scales, quats, grad)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for value, reference in zip(got, expected):
        torch.testing.assert_close(value, reference, atol=tol * float(reference.abs().max()), rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_at_the_end_of_the_grid_and_wide_rows(dtype, compiled):
    """Gaussians over the last rows of the last slice (a pack reads past a row's end) and rows wider than a
    pack (cut to their x-interval), forward and backward against the reference."""
    volume = VolumeGeometry((5, 6, 19), (1.0, 1.0, 1.0))
    corner = torch.tensor([9.0, 2.5, 2.0], dtype=dtype)  # the centre of the last voxel (x, y, z)
    g = torch.Generator().manual_seed(14)
    means = corner + torch.rand(12, 3, generator=g, dtype=dtype) * torch.tensor([-18.0, -3.0, -2.0], dtype=dtype)
    means[0] = corner
    scales = torch.rand(12, 3, generator=g, dtype=dtype) * 0.8 + 0.4
    scales[::3, 0] = 3.5  # boxes 21 voxels wide
    quats = torch.randn(12, 4, generator=g, dtype=dtype)
    intensities = torch.rand(12, generator=g, dtype=dtype) + 0.5
    weights = torch.rand(volume.shape, generator=g, dtype=dtype)
    results = {}
    for name in ("reference", "cpu"):
        inputs = [t.clone().requires_grad_(True) for t in (means, scales, quats, intensities)]
        out = voxelize(*inputs, volume, backend=name)
        (out * weights).sum().backward()
        results[name] = [out.detach()] + [t.grad for t in inputs]
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for reference, value in zip(results["reference"], results["cpu"]):
        torch.testing.assert_close(value, reference, atol=tol * float(reference.abs().max()), rtol=tol)
    assert float(results["reference"][0][-1, -1, -1]) > 0.1


@pytest.mark.parametrize("batch_path", ["reference", "cpu", "points"])
def test_batch_equals_loop(batch_path, compiled):
    volume = VolumeGeometry((7, 8, 9), (1.0, 1.0, 1.0))
    params = random_gaussians(12, volume, seed=7, batch=3)
    inputs = [t.clone().requires_grad_(True) for t in params]
    if batch_path == "points":
        points = torch.rand(3, 50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 8 - 4
        batched = render_points(*inputs, points, 3.0)
        looped = torch.stack([render_points(*(t[b] for t in inputs), points[b], 3.0) for b in range(3)])
    else:
        batched = voxelize_batch(*inputs, volume, 3.0, backend=batch_path)
        looped = torch.stack([voxelize(*(t[b] for t in inputs), volume, 3.0, backend=batch_path) for b in range(3)])
    assert batched.shape[0] == 3
    torch.testing.assert_close(batched, looped)
    grads_batched = torch.autograd.grad(batched.square().sum(), inputs)
    grads_looped = torch.autograd.grad(looped.square().sum(), inputs)
    for a, b in zip(grads_batched, grads_looped):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("chunk_size", [5, 37, 1 << 20])
def test_render_points_equals_voxelize(chunk_size):
    params = random_gaussians(30, seed=9)
    dense = voxelize(*params, VOLUME, 3.0, backend="reference", chunk_size=chunk_size).reshape(-1)
    centres = torch.as_tensor(VOLUME.voxel_centres().reshape(-1, 3))
    subset = torch.randperm(centres.shape[0], generator=torch.Generator().manual_seed(0))[:150]
    sparse = render_points(*params, centres[subset], 3.0, chunk_size=chunk_size)
    torch.testing.assert_close(sparse, dense[subset], atol=1e-12, rtol=0)
    torch.testing.assert_close(render_points(*params, centres, 3.0), dense, atol=1e-12, rtol=0)


def test_unit_block_coordinates_for_the_prior(compiled):
    """The renderer is unit-agnostic: a [0,1]³ block grid gives the same image as the mm grid it maps."""
    mm = VolumeGeometry((10, 10, 10), (2.0, 2.0, 2.0))
    unit = VolumeGeometry((10, 10, 10), (0.1, 0.1, 0.1), (0.5, 0.5, 0.5))
    means, scales, quats, intens = random_gaussians(20, mm, seed=11)
    to_unit = lambda x: (x + 10.0) / 20.0  # noqa: E731
    a = voxelize(means, scales, quats, intens, mm)
    b = voxelize(to_unit(means), scales / 20.0, quats, intens, unit)
    torch.testing.assert_close(a, b)


def test_gaussians_outside_and_empty_inputs(compiled):
    volume = VolumeGeometry((4, 4, 4), (1.0, 1.0, 1.0))
    far = (torch.tensor([[100.0, 0.0, 0.0]]), torch.ones(1, 3), torch.tensor([[1.0, 0, 0, 0]]), torch.ones(1))
    for backend in BACKENDS:
        assert float(voxelize(*far, volume, backend=backend).abs().sum()) == 0.0
    empty = (torch.zeros(0, 3), torch.ones(0, 3), torch.ones(0, 4), torch.ones(0))
    assert voxelize(*empty, volume).shape == (4, 4, 4)
    assert render_points(*empty, torch.zeros(5, 3)).shape == (5,)


def test_force_reference_environment(monkeypatch):
    monkeypatch.setenv("CTRECON_FORCE_REFERENCE", "1")
    assert _backend.select("auto", "cpu", torch.float32, operator="voxelizer", cpu=cpu_voxelizer).backend == "reference"


def test_failed_build_falls_back_to_the_reference(monkeypatch):
    monkeypatch.setattr(cpu_voxelizer, "error", "no compiler")
    monkeypatch.setattr(cpu_voxelizer, "_module", None)
    params = random_gaussians(5, dtype=torch.float32)
    assert _backend.select("auto", params[0].device, params[0].dtype, operator="voxelizer",
                           cpu=cpu_voxelizer).backend == "reference"
    torch.testing.assert_close(voxelize(*params, VOLUME), voxelize(*params, VOLUME, backend="reference"))
    with pytest.raises(RuntimeError, match="no compiler"):
        voxelize(*params, VOLUME, backend="cpu")


def test_bad_inputs_raise_input_error():
    means, scales, quats, intens = random_gaussians(3)
    with pytest.raises(InputError, match="scales"):
        voxelize(means, scales[:2], quats, intens, VOLUME)
    with pytest.raises(InputError, match="k_sigma"):
        voxelize(means, scales, quats, intens, VOLUME, k_sigma=0)
    with pytest.raises(InputError, match="points"):
        render_points(means, scales, quats, intens, torch.zeros(4, 2))
    with pytest.raises(InputError, match="backend"):
        voxelize(means, scales, quats, intens, VOLUME, backend="gpu")
