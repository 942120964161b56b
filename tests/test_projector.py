"""Cone-beam projector: exact adjoint, gradients, accuracy against analytic line integrals, compiled
vs reference parity, view subsets, chunking, and the lazy loading of the compiled path."""
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ctrecon.operators import _backend
from ctrecon.core import phantoms
from ctrecon.core.errors import InputError
from ctrecon.core.geometry import ConeBeamGeometry, VolumeGeometry, full_scan_angles
from ctrecon.operators.projector import Projector, cpu_projector


@pytest.fixture(scope="module")
def extension():
    """The compiled CPU projector, built once for the whole module; skip where it cannot be built."""
    module = cpu_projector.get()
    if module is None:
        pytest.skip("compiled CPU projector unavailable (no compiler, failed build or CTRECON_FORCE_REFERENCE)")
    return module


@pytest.fixture(params=["reference", "cpu"])
def backend(request):
    if request.param == "cpu":
        request.getfixturevalue("extension")
    return request.param


def steep_geometry(n_views=5):
    """Tiny anisotropic grid, offsets, and a tall detector close to the source: the rays' dominant
    axes (in voxel-index space) include x, y and z."""
    return ConeBeamGeometry(DSO=40.0, DSD=70.0, nDetector=(26, 18), dDetector=(6.0, 3.0), nVoxel=(9, 7, 8),
                            dVoxel=(1.5, 2.0, 1.7), angles=full_scan_angles(n_views) + 0.3,
                            offOrigin=(2.0, -1.5, 1.0), offDetector=(3.0, -2.0))


def dominant_axes(geometry):
    """Dominant axis (0 = x, 1 = y, 2 = z) of every ray in voxel-index space, from the world geometry."""
    direction = geometry.pixel_positions() - geometry.source_positions()[:, None, None, :]
    return np.argmax(np.abs(direction / np.array(geometry.dVoxel[::-1])), axis=-1)


def oblique_geometry(n_views=6):
    """A covering scan of an anisotropic, off-centre grid with a shifted detector."""
    volume = VolumeGeometry((40, 48, 44), (1.2, 1.0, 0.9), (2.0, -3.0, 1.5))
    return ConeBeamGeometry.covering(volume, n_views=n_views).replace(
        offDetector=(1.5, -2.0), angles=full_scan_angles(n_views) + 0.4)


def relative_error(estimate, exact):
    estimate, exact = np.asarray(estimate, dtype=np.float64), np.asarray(exact, dtype=np.float64)
    return np.linalg.norm(estimate - exact) / np.linalg.norm(exact)


# ---------------------------------------------------------------------------------- adjoint, gradients
def test_steep_geometry_has_every_dominant_axis():
    assert set(np.unique(dominant_axes(steep_geometry()))) == {0, 1, 2}


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_adjoint_is_exact_transpose(backend, dtype, tolerance):
    geometry = steep_geometry()
    A = Projector(geometry, backend=backend)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((2, *geometry.nVoxel), generator=generator, dtype=dtype)
    y = torch.rand((2, *geometry.projection_shape), generator=generator, dtype=dtype)
    lhs = float((A(x).double() * y.double()).sum())
    rhs = float((x.double() * A.T(y).double()).sum())
    assert lhs > 0
    assert abs(lhs - rhs) <= tolerance * abs(lhs)


def test_gradients_are_the_other_direction(backend):
    geometry = steep_geometry(n_views=2).replace(nVoxel=(4, 3, 5), nDetector=(5, 4), dDetector=(25.0, 9.0))
    A = Projector(geometry, backend=backend)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(geometry.nVoxel, generator=generator, dtype=torch.float64, requires_grad=True)
    y = torch.rand(geometry.projection_shape, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(A, (x,))
    assert torch.autograd.gradcheck(A.T, (y,))
    assert torch.autograd.gradgradcheck(A, (x,))
    weights = torch.rand(geometry.projection_shape, generator=generator, dtype=torch.float64)
    (grad,) = torch.autograd.grad((A(x) * weights).sum(), x)
    torch.testing.assert_close(grad, A.T(weights), rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------- accuracy
def test_smooth_phantom_matches_analytic_line_integrals(backend):
    geometry = oblique_geometry()
    blobs = phantoms.random_gaussian_blobs(geometry.volume, n=8, seed=3, sigma_range=(0.06, 0.14))
    volume = torch.from_numpy(phantoms.gaussian_volume(blobs, geometry.volume))
    projections = Projector(geometry, backend=backend)(volume)
    assert projections.dtype == torch.float32 and projections.shape == geometry.projection_shape
    assert relative_error(projections, phantoms.gaussian_projections(blobs, geometry)) <= 0.01


@pytest.fixture(scope="module")
def shepp_logan_128():
    volume = VolumeGeometry((128, 128, 128), (1.6, 1.5, 1.4), (3.0, -2.0, 4.0))
    ellipsoids = phantoms.shepp_logan_3d(volume)
    geometry = ConeBeamGeometry.covering(volume, n_views=3).replace(
        offDetector=(2.0, -3.0), angles=np.array([0.3, 1.4, 2.9]))
    voxels = torch.from_numpy(phantoms.ellipsoid_volume(ellipsoids, volume, supersample=2))
    return geometry, voxels, phantoms.ellipsoid_projections(ellipsoids, geometry)


def test_shepp_logan_128_matches_analytic_line_integrals(backend, shepp_logan_128):
    geometry, voxels, exact = shepp_logan_128
    assert relative_error(Projector(geometry, backend=backend)(voxels), exact) <= 0.05


def test_rays_that_miss_the_volume_give_zero(backend):
    geometry = oblique_geometry(n_views=3).replace(offDetector=(4.0, 25.0))
    projections = Projector(geometry, backend=backend)(torch.ones(geometry.nVoxel, dtype=torch.float64)).numpy()
    volume = geometry.volume
    margin = np.array(volume.dVoxel[::-1])  # nonzero samples lie within one voxel of the centres' box
    source = geometry.source_positions()[:, None, None, :]
    direction = geometry.pixel_positions() - source
    with np.errstate(divide="ignore", invalid="ignore"):
        def crosses(box):  # slab test of every ray against an axis-aligned box (x, y, z rows)
            t0, t1 = (box[0] - source) / direction, (box[1] - source) / direction
            return np.nanmax(np.minimum(t0, t1), axis=-1) < np.nanmin(np.maximum(t0, t1), axis=-1)
        outer = crosses(volume.bounds() + np.stack([-margin, margin]) / 2)
        inner = crosses(volume.bounds() + np.stack([margin, -margin]))
    assert 0 < (~outer).sum() and 0 < inner.sum()
    assert np.all(projections[~outer] == 0)
    assert np.all(projections[inner] > 0)


# ---------------------------------------------------------------------------------- compiled path
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("make_geometry", [steep_geometry, oblique_geometry])
def test_compiled_matches_reference(extension, make_geometry, dtype, tolerance):
    geometry = make_geometry()
    reference = Projector(geometry, backend="reference")
    compiled = Projector(geometry, backend="cpu")
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(geometry.nVoxel, generator=generator, dtype=dtype)
    y = torch.rand(geometry.projection_shape, generator=generator, dtype=dtype)
    assert relative_error(compiled(x), reference(x)) <= tolerance
    assert relative_error(compiled.T(y), reference.T(y)) <= tolerance


def test_compiled_adjoint_does_not_depend_on_threads(extension):
    geometry = oblique_geometry()
    A = Projector(geometry, backend="cpu")
    y = torch.rand(geometry.projection_shape, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = A.T(y)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(A.T(y), single)
    finally:
        torch.set_num_threads(threads)


def test_auto_backend_uses_compiled_path_on_cpu(extension):
    assert Projector(steep_geometry()).uses_compiled("cpu")
    assert not Projector(steep_geometry(), backend="reference").uses_compiled("cpu")


def test_force_reference_environment_variable(monkeypatch, extension):
    monkeypatch.setenv("CTRECON_FORCE_REFERENCE", "1")
    assert cpu_projector.get() is None
    assert not Projector(steep_geometry()).uses_compiled("cpu")
    with pytest.raises(RuntimeError, match="no compiled projector"):
        Projector(steep_geometry(), backend="cpu")(torch.zeros(steep_geometry().nVoxel))


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    from torch.utils import cpp_extension

    def broken_load(**kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.delenv("CTRECON_FORCE_REFERENCE", raising=False)
    monkeypatch.setattr(cpp_extension, "load", broken_load)
    lazy = _backend.LazyExtension("cpu_projector", ["projector.cpp"])
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        assert lazy.get() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lazy.get() is None


def test_build_cache_key_follows_content_path_and_flags(tmp_path):
    source = Path(_backend._CSRC) / "projector.cpp"
    copy = tmp_path / "projector.cpp"
    copy.write_bytes(source.read_bytes())
    key = _backend.LazyExtension("cpu_projector", ["projector.cpp"]).module_name
    assert key == _backend.LazyExtension("cpu_projector", [str(source)]).module_name
    assert key != _backend.LazyExtension("cpu_projector", [str(copy)]).module_name  # another checkout
    assert key != _backend.LazyExtension("cpu_projector", ["projector.cpp"], extra_cflags=("-O2",)).module_name
    copied = _backend.LazyExtension("cpu_projector", [str(copy)]).module_name
    copy.write_bytes(source.read_bytes() + b"\n// edited\n")
    assert copied != _backend.LazyExtension("cpu_projector", [str(copy)]).module_name


def test_importing_compiles_nothing():
    code = ("import sys, ctrecon, ctrecon.operators.projector, ctrecon.operators._backend; "
            "print('torch.utils.cpp_extension' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------------------------- API
def test_subset_gives_the_rows_of_those_views(backend):
    geometry = steep_geometry(n_views=7)
    A = Projector(geometry, backend=backend)
    x = torch.rand(geometry.nVoxel, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    full = A(x)
    for views in ([5, 0, 3], torch.tensor([6, 2]), slice(1, None, 2), np.arange(7) % 3 == 0):
        expected = full[torch.as_tensor(np.arange(7)[views])]
        subset = A.subset(views)
        assert subset.projection_shape == tuple(expected.shape)
        torch.testing.assert_close(subset(x), expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(Projector(geometry[[5, 0, 3]], backend=backend)(x), full[[5, 0, 3]],
                               rtol=1e-14, atol=0)
    with pytest.raises(InputError, match="out of range"):
        A.subset([7])
    with pytest.raises(InputError, match="at least one view"):
        A.subset([])


def test_batch_dimensions(backend):
    geometry = steep_geometry(n_views=3)
    A = Projector(geometry, backend=backend)
    x = torch.rand((2, 3, *geometry.nVoxel), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = A(x)
    assert y.shape == (2, 3, *geometry.projection_shape)
    torch.testing.assert_close(y[1, 2], A(x[1, 2]), rtol=1e-14, atol=0)
    torch.testing.assert_close(A.T(y)[0, 1], A.T(y[0, 1]), rtol=1e-14, atol=0)


def test_reference_chunking_does_not_change_the_result():
    geometry = oblique_geometry(n_views=2)
    x = torch.rand(geometry.nVoxel, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y = torch.rand(geometry.projection_shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    rows = Projector(geometry, backend="reference")  # blocks of rows
    columns = Projector(geometry, backend="reference", memory_budget=10 * max(geometry.nVoxel) * 192)
    assert rows.memory_budget is None
    torch.testing.assert_close(columns(x), rows(x), rtol=1e-13, atol=0)
    torch.testing.assert_close(columns.T(y), rows.T(y), rtol=1e-13, atol=1e-13)


def test_bad_input_is_rejected():
    A = Projector(steep_geometry())
    with pytest.raises(InputError, match="shape"):
        A(torch.zeros(9, 7, 7))
    with pytest.raises(InputError, match="float32 or float64"):
        A(torch.zeros(steep_geometry().nVoxel, dtype=torch.int64))
    with pytest.raises(InputError, match="shape"):
        A.T(torch.zeros(9, 7, 8))
    with pytest.raises(InputError, match="ScanGeometry"):
        Projector(steep_geometry().volume)
    with pytest.raises(InputError, match="backend"):
        Projector(steep_geometry(), backend="gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_reference_on_cuda_matches_cpu():
    geometry = oblique_geometry(n_views=3)
    x = torch.rand(geometry.nVoxel, generator=torch.Generator().manual_seed(8))
    y = torch.rand(geometry.projection_shape, generator=torch.Generator().manual_seed(9))
    A = Projector(geometry, backend="reference")
    assert relative_error(A(x.cuda()).cpu(), A(x)) <= 1e-5
    assert relative_error(A.T(y.cuda()).cpu(), A.T(y)) <= 1e-5
