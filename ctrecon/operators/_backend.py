"""What the operators share: the backend vocabulary and its resolver, lazily built kernels, the CUDA extension.

Every operator (:class:`~ctrecon.operators.projector.Projector`, :func:`~ctrecon.operators.fdk.backproject`,
:func:`~ctrecon.operators.voxelize.voxelize`, :func:`~ctrecon.operators.voxelize.render_points`) takes
``backend``, and :func:`select` turns it into the kernels that run:

    "auto"       CUDA kernels for CUDA float32 tensors, the operator's compiled CPU kernel for CPU
                 tensors, the torch reference otherwise (other dtypes, no kernel for the operator, a
                 failed build, or ``CTRECON_FORCE_REFERENCE=1``)
    "reference"  the operator's pure-PyTorch reference (the test oracle)
    "cpu"        its compiled CPU kernel; "cuda": the CUDA kernels. An :class:`InputError` for tensors
                 these kernels do not take (another device or dtype, or no such kernel for the operator),
                 a RuntimeError when the kernels cannot be built or are forced off.

Compiled kernels are :class:`LazyExtension`\\ s built with ``torch.utils.cpp_extension`` on first use and
cached; importing ctrecon never compiles. The CPU kernels live in ``ctrecon/operators/csrc`` and include
the per-thread headers of the CUDA kernels; the CUDA kernels (``cuda/*.cu``, torch-free) and their torch
binding (``cuda/ext.cpp``) form one extension, found by :func:`source_dir` (``ctrecon/_cuda_src`` in an
installed package, see setup.py) and launched through :func:`kernels_for`. Each operator's glue for these
kernels (argument tables, tile binning, autograd) lives in that operator's module.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from typing import Any, NamedTuple, Sequence

import torch

from ctrecon.core.errors import InputError
from ctrecon.core.paths import shipped_folder

__all__ = ["BACKENDS", "Kernels", "select", "check_backend", "resolve_device", "LazyExtension", "cpu_extension",
           "kernels_for", "source_dir", "OPENMP_FLAGS"]

BACKENDS = ("auto", "reference", "cpu", "cuda")
#: Dtypes that the compiled CPU kernels take.
CPU_DTYPES = (torch.float32, torch.float64)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA when available else CPU; ``cuda`` without a GPU is an :class:`InputError`."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r} (use auto, cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {name!r} (use auto, cpu or cuda)")
    return dev


# --------------------------------------------------------------------------- lazy builds
class LazyExtension:
    """A C++ extension built with ``torch.utils.cpp_extension.load`` on first use.

    ``sources`` are paths, relative ones within ``ctrecon/operators/csrc``; ``headers`` the files they
    include (from ``include_dirs``), hashed into the cache key with the sources. Nothing is compiled at
    import time. The build is cached in ``$TORCH_EXTENSIONS_DIR`` when set, else in
    ``~/.cache/ctrecon/extensions`` (``$XDG_CACHE_HOME`` honoured), under a name that hashes the sources and
    headers (their content and their paths: torch's build file names the source paths, so two checkouts
    sharing one folder rebuilt it each time the other had used it last), the flags, the include folders and
    the torch/python versions, so a later run loads it in well under a second.
    ``CTRECON_FORCE_REFERENCE=1`` disables it. A failed build (no compiler, bad toolchain) warns once
    and :meth:`get` then returns None: callers fall back to the torch reference.
    """

    def __init__(self, name: str, sources: Sequence[str], *, headers: Sequence[str] = (),
                 include_dirs: Sequence[str] = (), extra_cflags: Sequence[str] = ("-O3",),
                 extra_ldflags: Sequence[str] = ()):
        self.name = name
        self.sources = [os.path.join(_CSRC, s) for s in sources]
        self.headers = list(headers)
        self.include_dirs = list(include_dirs)
        self.extra_cflags = list(extra_cflags)
        self.extra_ldflags = list(extra_ldflags)
        self._module = None
        self.error: str | None = None  # why the build failed, once it has
        self._lock = threading.Lock()

    @property
    def _failed(self) -> bool:
        return self.error is not None

    def get(self):
        """The loaded module, or None (forced reference, or the build failed)."""
        if forced_reference():
            return None
        if self._module is not None or self._failed:
            return self._module
        with self._lock:
            if self._module is None and not self._failed:
                try:
                    self._module = self._build()
                except Exception as err:  # any toolchain failure means "use the reference"
                    self.error = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
                    warnings.warn(f"ctrecon: could not build the compiled {self.name} ({self.error}); "
                                  "using the slower PyTorch reference", RuntimeWarning, stacklevel=3)
        return self._module

    def unavailable(self) -> str:
        """Why :meth:`get` returns None (after it has)."""
        return "CTRECON_FORCE_REFERENCE is set" if forced_reference() else f"its build failed: {self.error}"

    @property
    def module_name(self) -> str:
        """``ctrecon_<name>_<hash>``: the build's cache key (see the class docstring)."""
        digest = hashlib.sha1()
        for path in (*self.sources, *self.headers):
            digest.update(os.path.abspath(path).encode())
            with open(path, "rb") as handle:
                digest.update(handle.read())
        digest.update(" ".join([*self.extra_cflags, *self.extra_ldflags, *map(os.path.abspath, self.include_dirs),
                                torch.__version__, sys.version]).encode())
        return f"ctrecon_{self.name}_{digest.hexdigest()[:12]}"

    def _build(self):
        from torch.utils import cpp_extension

        module_name = self.module_name
        build_directory = None
        if not os.environ.get("TORCH_EXTENSIONS_DIR"):
            cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            build_directory = os.path.join(cache, "ctrecon", "extensions", module_name)
            os.makedirs(build_directory, exist_ok=True)
        return cpp_extension.load(name=module_name, sources=self.sources, extra_cflags=self.extra_cflags,
                                  extra_ldflags=self.extra_ldflags, extra_include_paths=self.include_dirs,
                                  build_directory=build_directory, verbose=False)


def forced_reference() -> bool:
    """``CTRECON_FORCE_REFERENCE`` is set (to anything but 0): no compiled kernel is used."""
    return os.environ.get("CTRECON_FORCE_REFERENCE", "") not in ("", "0")


_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")

#: Compiler/linker flags for OpenMP. at::parallel_for (a header template) runs in parallel only in an
#: extension compiled with OpenMP, which then shares torch's OpenMP runtime and torch.set_num_threads.
#: Apple's clang has no OpenMP: there the CPU extensions build without it and run on one thread.
OPENMP_FLAGS = {"linux": ("-fopenmp",), "win32": ("/openmp",)}.get(sys.platform, ())


def source_dir() -> str:
    """The CUDA kernel sources: ``ctrecon/_cuda_src`` in an installed package, the top-level ``cuda/`` in a checkout."""
    return str(shipped_folder("cuda", "_cuda_src"))


def cpu_extension(name: str, source: str, headers: Sequence[str]) -> LazyExtension:
    """The OpenMP CPU kernel ``csrc/<source>``, which includes ``headers`` of the CUDA kernel sources."""
    cuda = source_dir()
    return LazyExtension(name, [source], headers=[os.path.join(cuda, h) for h in headers], include_dirs=[cuda],
                         extra_cflags=("-O3", *OPENMP_FLAGS), extra_ldflags=OPENMP_FLAGS)


# --------------------------------------------------------------------------- the CUDA extension
#: Compiled sources of the CUDA extension (in :func:`source_dir`) and the headers they include.
CUDA_SOURCES = ("ext.cpp", "projector.cu", "fdk.cu", "voxelize.cu")
CUDA_HEADERS = ("kernels.h", "common.cuh", "projector.cuh", "fdk.cuh", "voxelize.cuh")

_cuda_extension = LazyExtension("cuda_kernels", [os.path.join(source_dir(), name) for name in CUDA_SOURCES],
                                headers=[os.path.join(source_dir(), name) for name in CUDA_HEADERS])


class _Launcher:
    """Calls a function of the extension on the device of its first tensor argument, on that device's current
    stream (appended as the last argument, an integer)."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        function = getattr(self._module, name)

        def launch(*args):
            device = next(arg.device for arg in args if isinstance(arg, torch.Tensor))
            with torch.cuda.device(device):
                return function(*args, torch.cuda.current_stream(device).cuda_stream)

        return launch


def kernels_for(device, dtype=torch.float32):
    """Launcher of the CUDA kernels for tensors of ``device`` and ``dtype``, or None: only CUDA float32 tensors
    qualify; builds the extension on the first call. Tests substitute an emulated launcher
    (tests/test_cuda.py) to run the operators' CUDA glue on the CPU."""
    if torch.device(device).type != "cuda" or dtype != torch.float32 or not torch.cuda.is_available():
        return None
    module = _cuda_extension.get()
    return None if module is None else _Launcher(module)


# --------------------------------------------------------------------------- backend resolution
class Kernels(NamedTuple):
    """What runs: ``backend`` "reference", "cpu" or "cuda", and ``module`` the CPU extension or the CUDA
    launcher (None for the reference)."""

    backend: str
    module: Any = None


_REFERENCE = Kernels("reference")


def check_backend(backend: str, operator: str) -> str:
    """``backend`` if it is one of :data:`BACKENDS`, else an :class:`InputError`."""
    if backend not in BACKENDS:
        raise InputError(f"{operator} backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def select(backend: str, device, dtype: torch.dtype, *, operator: str,
           cpu: LazyExtension | None = None) -> Kernels:
    """The kernels of ``operator`` (a name for messages) for tensors of ``device`` and ``dtype`` under ``backend``
    (see the module docstring); ``cpu`` is the operator's compiled CPU kernel, None where it has none."""
    check_backend(backend, operator)
    device = torch.device(device)
    if backend == "reference":
        return _REFERENCE
    if backend == "auto":
        launcher = kernels_for(device, dtype)
        if launcher is not None:
            return Kernels("cuda", launcher)
        usable = cpu is not None and device.type == "cpu" and dtype in CPU_DTYPES
        module = cpu.get() if usable else None
        return _REFERENCE if module is None else Kernels("cpu", module)
    if device.type != backend:
        raise InputError(f"{operator} backend {backend!r} needs {backend.upper()} tensors, got {device.type} ones")
    if backend == "cuda":
        if dtype != torch.float32:
            raise InputError(f"the CUDA {operator} takes float32 tensors, got {dtype}")
        launcher = kernels_for(device, dtype)
        if launcher is None:
            raise RuntimeError(f"no CUDA {operator}: {_cuda_extension.unavailable()}")
        return Kernels("cuda", launcher)
    if cpu is None:
        raise InputError(f"the {operator} has no compiled CPU kernel (use backend auto, reference or cuda)")
    if dtype not in CPU_DTYPES:
        raise InputError(f"the compiled CPU {operator} takes float32 or float64 tensors, got {dtype}")
    module = cpu.get()
    if module is None:
        raise RuntimeError(f"no compiled {operator} for CPU tensors: {cpu.unavailable()}")
    return Kernels("cpu", module)
