"""CUDA kernels (cuda/) and their glue in the operators (ctrecon/operators/).

Three layers, so that a machine without a GPU still checks most of the code:

* build: every torch-free ``cuda/*.cu`` compiles with nvcc (when nvcc is on PATH);
* emulation: the kernels' per-thread code (the CTRECON_HD functions of ``cuda/*.cuh``) compiled as plain
  C++ (tests/cuda_emulation.cpp) and run serially over every thread of each launch, behind the real glue
  of ctrecon/operators/ and the real dispatch of Projector, fdk and the renderer, against the torch
  references. Not covered there: the block-level code of the .cu files (launch geometry, shared memory,
  barriers, warp reductions, atomics);
* GPU: the compiled extension against the torch reference on the same device (skipped without one).
"""
import ctypes
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from ctrecon.operators import _backend
from ctrecon.operators.fdk import angular_weights, backproject, fdk
from ctrecon.operators.voxelize import _TileLists, render_points, voxelize
from ctrecon.core.geometry import ConeBeamGeometry, VolumeGeometry
from ctrecon.operators.projector import Projector

TESTS = Path(__file__).resolve().parent
CT_VOLUME = TESTS.parents[1] / "shared" / "data" / "ct" / "abdomen_ts_example_small.nii.gz"
HAS_GPU = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device (none on this machine)")
TOLERANCE = 1e-4  # relative L2 error, float32 kernels against the float32 torch reference


def relative_error(value, reference) -> float:
    """‖value - reference‖ / ‖reference‖ (the absolute error when the reference is exactly zero)."""
    value, reference = value.detach().double().cpu(), reference.detach().double().cpu()
    scale = float(reference.norm())
    return float((value - reference).norm()) / (scale if scale > 0 else 1.0)


# --------------------------------------------------------------------------- fixtures
def real_ct(shape) -> np.ndarray:
    """The shared abdomen CT resampled to ``shape``, unit attenuation (skips when the data is absent)."""
    if not CT_VOLUME.exists():
        pytest.skip(f"real CT not available ({CT_VOLUME})")
    from ctrecon.core.io import load_volume
    from ctrecon.core.units import hu_to_unit
    from ctrecon.pipeline.simulate import resample_volume

    hu, spacing = load_volume(CT_VOLUME)
    return resample_volume(hu_to_unit(hu), spacing, shape=shape)[0]


def steep_geometry(n_views=6, volume_shape=(40, 14, 16)) -> ConeBeamGeometry:
    """Anisotropic voxels, offsets, and the source so close to a tall volume that many rays through it are
    z-dominant (as well as x- and y-dominant ones)."""
    return ConeBeamGeometry.circular(DSO=25.0, DSD=40.0, nDetector=(24, 26), dDetector=(5.0, 3.0),
                                     nVoxel=volume_shape, dVoxel=(1.1, 0.9, 1.0), offOrigin=(0.7, -1.3, 0.4),
                                     offDetector=(1.5, -2.0), n_views=n_views, start_angle=0.3)


def volume_data(kind: str, shape, device="cpu") -> torch.Tensor:
    if kind == "ct":
        data = torch.from_numpy(np.ascontiguousarray(real_ct(shape)))
    else:
        data = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    return data.to(device=device, dtype=torch.float32)


def random_gaussians(n, volume, batch=None, seed=0, device="cpu"):
    """Rotated Gaussians, some straddling or outside the grid, some spanning several tiles."""
    g = torch.Generator().manual_seed(seed)
    lead = (n,) if batch is None else (batch, n)
    span = torch.tensor(volume.sVoxel[::-1])
    centre = torch.tensor(volume.offOrigin[::-1])
    means = centre + (torch.rand(*lead, 3, generator=g) - 0.5) * span * 1.2
    scales = (0.4 + 2.5 * torch.rand(*lead, 3, generator=g)) * min(volume.dVoxel)
    quats = torch.randn(*lead, 4, generator=g)
    intensities = torch.rand(*lead, generator=g) + 0.1
    return [t.to(device=device, dtype=torch.float32).requires_grad_() for t in (means, scales, quats, intensities)]


def ct_field(shape, volume, n_gaussians, device="cpu"):
    """FBP-initialised Gaussians of the real CT, made anisotropic and rotated so that every parameter has a
    gradient (the initialiser's are isotropic)."""
    from ctrecon.methods.gaussians import get_initializer

    field = get_initializer("fbp")(volume_data("ct", shape, device), volume, n_gaussians,
                                   torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(7)
    stretch = (0.6 + 0.8 * torch.rand(field.scales.shape, generator=g)).to(device)
    quats = torch.randn(field.quats.shape, generator=g).to(device)
    params = (field.means, field.scales * stretch, quats, field.intensities)
    return [t.detach().float().requires_grad_() for t in params]


def rendered_with_gradients(render, params, seed=3):
    out = render(*params)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    grads = torch.autograd.grad((out * weights).sum(), params)
    return out, grads


# --------------------------------------------------------------------------- sources and build
def test_kernel_sources_are_present_and_torch_free():
    directory = Path(_backend.source_dir())
    for name in (*_backend.CUDA_SOURCES, *_backend.CUDA_HEADERS):
        assert (directory / name).is_file(), f"missing kernel source {name}"
    torch_include = re.compile(r'#\s*include\s*[<"](torch|ATen|c10|pybind11)/')
    for name in (*_backend.CUDA_SOURCES, *_backend.CUDA_HEADERS):
        text = (directory / name).read_text()
        if name == "ext.cpp":
            assert torch_include.search(text), "the binding includes torch"
            assert "cuda_runtime" not in text, "the binding must not need CUDA headers"
        else:
            assert not torch_include.search(text), f"{name} must not include torch headers"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_kernels_compile_with_nvcc(tmp_path):
    sources = [Path(_backend.source_dir()) / name for name in _backend.CUDA_SOURCES if name.endswith(".cu")]

    def compile_one(source):
        command = ["nvcc", "-c", "-arch=sm_90", "-std=c++17", str(source), "-o", str(tmp_path / f"{source.stem}.o")]
        return source.name, subprocess.run(command, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for name, result in pool.map(compile_one, sources):
            assert result.returncode == 0, f"nvcc failed on {name}:\n{result.stderr}"
            assert (tmp_path / f"{Path(name).stem}.o").stat().st_size > 0


def test_no_kernels_for_cpu_or_float64_and_nothing_built():
    assert _backend.kernels_for("cpu") is None
    assert _backend.kernels_for("cuda", torch.float64) is None
    if not HAS_GPU:
        assert _backend.kernels_for("cuda") is None
        assert _backend._cuda_extension._module is None and not _backend._cuda_extension._failed  # never tried to build


def test_force_reference_wins_over_the_kernels(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CTRECON_FORCE_REFERENCE", "1")
    assert _backend.kernels_for("cuda") is None


# --------------------------------------------------------------------------- CPU emulation
def _pointer(tensor, dtype):
    assert tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.dtype == dtype, \
        (tensor.device, tensor.dtype, dtype, tensor.is_contiguous())
    return ctypes.c_void_p(tensor.data_ptr())


def f32(t):
    return _pointer(t, torch.float32)


def f64(t):
    return _pointer(t, torch.float64)


def i32(t):
    return _pointer(t, torch.int32)


def i64(t):
    return _pointer(t, torch.int64)


def _array(ctype, values):
    return (ctype * len(values))(*values)


class EmulatedKernels:
    """The functions of the binding (cuda/ext.cpp), same arguments minus the stream, over CPU tensors."""

    def __init__(self, library):
        self.library = library
        self.calls = []

    def __getattr__(self, name):
        function = getattr(self.library, name)
        wrapper = getattr(self, f"_{name}")

        def call(*args):
            self.calls.append(name)
            return wrapper(function, *args)

        return call

    @staticmethod
    def _project_forward(fn, volume, views, spacing, out):
        fn(f32(volume), *map(ctypes.c_int64, volume.shape), f64(views), *map(ctypes.c_int64, out.shape),
           _array(ctypes.c_double, spacing), f32(out))

    @staticmethod
    def _project_adjoint(fn, projections, views, spacing, out):
        fn(f32(projections), *map(ctypes.c_int64, projections.shape), f64(views), _array(ctypes.c_double, spacing),
           *map(ctypes.c_int64, out.shape), f32(out))

    @staticmethod
    def _fdk_backproject(fn, filtered, xs, ys, zs, cos, sin, weights, scan, out):
        assert out.shape == (zs.numel(), ys.numel(), xs.numel())
        size = ctypes.c_int64
        fn(f32(filtered), *map(size, filtered.shape), f32(xs), size(xs.numel()), f32(ys), size(ys.numel()), f32(zs),
           size(zs.numel()), f32(cos), f32(sin), f32(weights), _array(ctypes.c_double, scan), f32(out))

    @staticmethod
    def _tile_counts(fn, lo, hi, lattice, counts):
        fn(i32(lo), i32(hi), ctypes.c_int64(counts.numel()), _array(ctypes.c_int64, lattice), i64(counts))

    @staticmethod
    def _tile_pairs(fn, lo, hi, ends, lattice, keys, ids):
        fn(i32(lo), i32(hi), i64(ends), ctypes.c_int64(ends.numel()), ctypes.c_int64(keys.numel()),
           _array(ctypes.c_int64, lattice), i32(keys), i32(ids))

    @staticmethod
    def _point_tile_keys(fn, cells, points_per_item, lattice, keys):
        fn(i32(cells), ctypes.c_int64(keys.numel()), ctypes.c_int64(points_per_item), _array(ctypes.c_int64, lattice),
           i32(keys))

    @staticmethod
    def _gaussians(means, prec, intensities, lo, hi, ids, tile_ends, lattice):
        return (f32(means), f32(prec), f32(intensities), i32(lo), i32(hi), i32(ids), i64(tile_ends),
                ctypes.c_int64(tile_ends.numel()), _array(ctypes.c_int64, lattice))

    def _dense_forward(self, fn, means, prec, intensities, lo, hi, ids, tile_ends, lattice, xs, ys, zs, k2, out):
        fn(*self._gaussians(means, prec, intensities, lo, hi, ids, tile_ends, lattice), f32(xs), f32(ys), f32(zs),
           ctypes.c_float(k2), f32(out), ctypes.c_int64(out.numel()))

    def _dense_backward(self, fn, means, prec, intensities, lo, hi, ids, tile_ends, lattice, xs, ys, zs, k2, grad,
                        moments):
        fn(*self._gaussians(means, prec, intensities, lo, hi, ids, tile_ends, lattice), f32(xs), f32(ys), f32(zs),
           ctypes.c_float(k2), f32(grad), f32(moments), ctypes.c_int64(means.shape[0]))

    def _points_forward(self, fn, means, prec, intensities, lo, hi, ids, tile_ends, lattice, points, cells, order,
                        point_ends, k2, out):
        fn(*self._gaussians(means, prec, intensities, lo, hi, ids, tile_ends, lattice), f32(points), i32(cells),
           i64(order), i64(point_ends), ctypes.c_float(k2), f32(out), ctypes.c_int64(out.numel()))

    def _points_backward(self, fn, means, prec, intensities, lo, hi, ids, tile_ends, lattice, points, cells, order,
                         point_ends, k2, grad, moments):
        fn(*self._gaussians(means, prec, intensities, lo, hi, ids, tile_ends, lattice), f32(points), i32(cells),
           i64(order), i64(point_ends), ctypes.c_float(k2), f32(grad), f32(moments), ctypes.c_int64(means.shape[0]))


@pytest.fixture(scope="module")
def emulation_library(tmp_path_factory):
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler for the CPU emulation of the kernels")
    library = tmp_path_factory.mktemp("cuda_emulation") / "cuda_emulation.so"
    command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", f"-I{_backend.source_dir()}",
               str(TESTS / "cuda_emulation.cpp"), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"emulation build failed:\n{result.stderr}"
    return ctypes.CDLL(str(library))


@pytest.fixture
def emulated(emulation_library, monkeypatch):
    """Routes CPU float32 tensors through the operators' CUDA glue onto the emulated kernels."""
    kernels = EmulatedKernels(emulation_library)
    monkeypatch.delenv("CTRECON_FORCE_REFERENCE", raising=False)
    monkeypatch.setattr(_backend, "kernels_for", lambda device, dtype=torch.float32: (
        kernels if torch.device(device).type == "cpu" and dtype == torch.float32 else None))
    return kernels


def reference(monkeypatch):
    """Forces the torch reference (as a user would) for the calls that follow."""
    monkeypatch.setenv("CTRECON_FORCE_REFERENCE", "1")


@pytest.mark.parametrize("kind", ["random", "ct"])
def test_emulated_projector_matches_reference(kind, emulated):
    geometry = steep_geometry()
    x = volume_data(kind, geometry.nVoxel).requires_grad_()
    y = torch.rand(geometry.projection_shape, generator=torch.Generator().manual_seed(2))
    expected = Projector(geometry, backend="reference")
    forward = Projector(geometry)(x)
    assert emulated.calls == ["project_forward"]
    assert relative_error(forward, expected(x)) < 1e-5
    (grad,) = torch.autograd.grad((forward * y).sum(), x)  # backward of A is Aᵀ
    assert emulated.calls[-1] == "project_adjoint"
    assert relative_error(grad, expected.T(y)) < 1e-5
    batch = torch.stack([x.detach(), 2 * x.detach()])
    assert relative_error(Projector(geometry).subset([1, 4])(batch), expected.subset([1, 4])(batch)) < 1e-5


def test_emulated_adjoint_identity(emulated):
    geometry = steep_geometry(n_views=5)
    A = Projector(geometry)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(geometry.nVoxel, generator=g)
    y = torch.rand(geometry.projection_shape, generator=g)
    lhs = float((A(x).double() * y.double()).sum())
    rhs = float((x.double() * A.T(y).double()).sum())
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)
    assert set(emulated.calls) == {"project_forward", "project_adjoint"}


def test_emulated_projection_of_a_ray_missing_the_volume_is_zero(emulated):
    geometry = steep_geometry(n_views=2).replace(offDetector=(400.0, 0.0))
    assert float(Projector(geometry)(torch.ones(geometry.nVoxel)).abs().max()) == 0.0


@pytest.mark.parametrize("kind", ["random", "ct"])
def test_emulated_fdk_backprojection_matches_reference(kind, emulated, monkeypatch):
    geometry = steep_geometry(n_views=7, volume_shape=(10, 13, 17))
    filtered = volume_data(kind, geometry.projection_shape) - 0.3
    weights = angular_weights(geometry)
    value = backproject(filtered, geometry, weights)
    assert emulated.calls == ["fdk_backproject"]
    reference(monkeypatch)
    assert relative_error(value, backproject(filtered, geometry, weights)) < 1e-5


def test_emulated_tile_lists_hold_every_overlap_once(emulated):
    lattice = [11, 9, 7, 4, 4, 2, 5]  # cells (x, y, z), tile, Gaussians per item
    g = torch.Generator().manual_seed(5)
    lo = torch.stack([torch.randint(0, n, (10,), generator=g) for n in lattice[:3]], 1)
    hi = torch.minimum(lo + torch.randint(-1, 6, (10, 3), generator=g), torch.tensor(lattice[:3]) - 1)
    lo, hi = lo.int().contiguous(), hi.int().contiguous()  # some boxes empty (hi < lo)
    tiles = [-(-n // t) for n, t in zip(lattice[:3], lattice[3:6])]
    n_keys = 2 * tiles[0] * tiles[1] * tiles[2]
    lists = _TileLists(emulated, lo, hi, lattice, n_keys)
    expected = [[] for _ in range(n_keys)]
    for gaussian in range(10):
        if (hi[gaussian] < lo[gaussian]).any():
            continue
        first = (lo[gaussian] // torch.tensor(lattice[3:6])).tolist()
        last = (hi[gaussian] // torch.tensor(lattice[3:6])).tolist()
        for tz in range(first[2], last[2] + 1):
            for ty in range(first[1], last[1] + 1):
                for tx in range(first[0], last[0] + 1):
                    item = gaussian // lattice[6]
                    expected[((item * tiles[2] + tz) * tiles[1] + ty) * tiles[0] + tx].append(gaussian)
    ends = lists.ends.tolist()
    got = [lists.ids[(ends[k - 1] if k else 0):ends[k]].tolist() for k in range(n_keys)]
    assert got == expected


def test_emulated_voxelize_matches_reference_forward_and_backward(emulated):
    volume = VolumeGeometry((11, 19, 21), (1.0, 0.8, 1.2), (0.5, -1.0, 0.3))  # not a multiple of the tile
    params = random_gaussians(24, volume, batch=2)
    value, grads = rendered_with_gradients(lambda *p: voxelize(*p, volume, k_sigma=2.5), params)
    assert emulated.calls == ["tile_counts", "tile_pairs", "dense_forward", "dense_backward"]
    expected, expected_grads = rendered_with_gradients(lambda *p: voxelize(*p, volume, 2.5, backend="reference"),
                                                       params)
    assert value.shape == (2, 11, 19, 21)
    assert relative_error(value, expected) < 1e-5
    for grad, expected_grad in zip(grads, expected_grads):
        assert relative_error(grad, expected_grad) < 1e-5


def test_emulated_voxelize_of_a_real_ct_field(emulated):
    shape = (16, 20, 20)
    volume = VolumeGeometry(shape, (3.0, 3.0, 3.0))
    params = ct_field(shape, volume, 300)
    value, grads = rendered_with_gradients(lambda *p: voxelize(*p, volume), params)
    expected, expected_grads = rendered_with_gradients(lambda *p: voxelize(*p, volume, backend="reference"), params)
    assert "dense_forward" in emulated.calls
    assert relative_error(value, expected) < 1e-5
    for grad, expected_grad in zip(grads, expected_grads):
        assert relative_error(grad, expected_grad) < 1e-5


def test_emulated_render_points_matches_reference(emulated, monkeypatch):
    volume = VolumeGeometry((14, 16, 18), (1.0, 1.0, 1.0))
    params = random_gaussians(30, volume, batch=2)
    g = torch.Generator().manual_seed(6)
    centres = torch.from_numpy(volume.voxel_centres().reshape(-1, 3)).float()  # (x, y, z) of every voxel
    points = torch.stack([centres[torch.randperm(centres.shape[0], generator=g)[:900]] for _ in range(2)])
    value, grads = rendered_with_gradients(lambda *p: render_points(*p, points), params)
    assert "points_forward" in emulated.calls and "points_backward" in emulated.calls
    reference(monkeypatch)
    expected, expected_grads = rendered_with_gradients(lambda *p: render_points(*p, points), params)
    assert relative_error(value, expected) < 1e-5
    for grad, expected_grad in zip(grads, expected_grads):
        assert relative_error(grad, expected_grad) < 1e-5


# --------------------------------------------------------------------------- GPU
@requires_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["random", "ct"])
def test_gpu_projector_matches_reference(kind):
    geometry = ConeBeamGeometry.covering(VolumeGeometry((48, 64, 64), (2.0, 1.5, 1.5)), n_views=24)
    x = volume_data(kind, geometry.nVoxel, "cuda").requires_grad_()
    y = torch.rand(geometry.projection_shape, device="cuda")
    A, expected = Projector(geometry), Projector(geometry, backend="reference")
    assert A.uses_compiled("cuda")
    forward = A(x)
    assert relative_error(forward, expected(x)) < TOLERANCE
    (grad,) = torch.autograd.grad((forward * y).sum(), x)
    assert relative_error(grad, expected.T(y)) < TOLERANCE
    steep = steep_geometry()
    z = volume_data(kind, steep.nVoxel, "cuda")
    assert relative_error(Projector(steep)(z), Projector(steep, backend="reference")(z)) < TOLERANCE


@requires_gpu
@pytest.mark.cuda
def test_gpu_adjoint_identity():
    geometry = steep_geometry(n_views=9)
    A = Projector(geometry)
    x = torch.rand(geometry.nVoxel, device="cuda")
    y = torch.rand(geometry.projection_shape, device="cuda")
    lhs = float((A(x).double() * y.double()).sum())
    rhs = float((x.double() * A.T(y).double()).sum())
    assert abs(lhs - rhs) <= 1e-5 * abs(lhs)


@requires_gpu
@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["random", "ct"])
def test_gpu_fdk_matches_reference(kind, monkeypatch):
    geometry = ConeBeamGeometry.covering(VolumeGeometry((40, 56, 56), (2.5, 2.0, 2.0)), n_views=60)
    truth = volume_data(kind, geometry.nVoxel, "cuda")
    projections = Projector(geometry)(truth)
    value = fdk(projections, geometry)
    reference(monkeypatch)
    assert relative_error(value, fdk(projections, geometry)) < TOLERANCE


@requires_gpu
@pytest.mark.cuda
def test_gpu_voxelize_matches_reference_forward_and_backward():
    volume = VolumeGeometry((37, 45, 51), (1.0, 0.8, 1.2), (0.5, -1.0, 0.3))
    params = random_gaussians(400, volume, batch=3, device="cuda")
    value, grads = rendered_with_gradients(lambda *p: voxelize(*p, volume), params)
    expected, expected_grads = rendered_with_gradients(lambda *p: voxelize(*p, volume, backend="reference"), params)
    assert relative_error(value, expected) < TOLERANCE
    for grad, expected_grad in zip(grads, expected_grads):
        assert relative_error(grad, expected_grad) < TOLERANCE


@requires_gpu
@pytest.mark.cuda
def test_gpu_voxelize_of_a_real_ct_field():
    shape = (30, 64, 64)
    volume = VolumeGeometry(shape, (3.0, 1.6, 1.6))
    params = ct_field(shape, volume, 4000, "cuda")
    value, grads = rendered_with_gradients(lambda *p: voxelize(*p, volume), params)
    expected, expected_grads = rendered_with_gradients(lambda *p: voxelize(*p, volume, backend="reference"), params)
    assert relative_error(value, expected) < TOLERANCE
    for grad, expected_grad in zip(grads, expected_grads):
        assert relative_error(grad, expected_grad) < TOLERANCE


@requires_gpu
@pytest.mark.cuda
def test_gpu_render_points_matches_reference(monkeypatch):
    volume = VolumeGeometry((32, 32, 32), (1.0, 1.0, 1.0))
    params = random_gaussians(200, volume, batch=2, device="cuda")
    centres = torch.from_numpy(volume.voxel_centres().reshape(-1, 3)).float()
    g = torch.Generator().manual_seed(6)
    points = torch.stack([centres[torch.randperm(centres.shape[0], generator=g)[:8000]] for _ in range(2)]).cuda()
    value, grads = rendered_with_gradients(lambda *p: render_points(*p, points), params)
    reference(monkeypatch)
    expected, expected_grads = rendered_with_gradients(lambda *p: render_points(*p, points), params)
    assert relative_error(value, expected) < TOLERANCE
    for grad, expected_grad in zip(grads, expected_grads):
        assert relative_error(grad, expected_grad) < TOLERANCE
