"""Device selection and lazy loading of compiled kernels; the torch reference is used where they are absent."""
from __future__ import annotations

import hashlib
import os
import sys
import threading
import warnings
from typing import Sequence

import torch

from ctrecon.core.errors import InputError


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


class LazyExtension:
    """A C++ extension built from ``ctrecon/csrc`` with ``torch.utils.cpp_extension.load`` on first use.

    Nothing is compiled at import time. The build is cached in ``$TORCH_EXTENSIONS_DIR`` when set,
    else in ``~/.cache/ctrecon/extensions`` (``$XDG_CACHE_HOME`` honoured), under a name that hashes
    the sources (their content and their paths: torch's build file names the source paths, so two
    checkouts sharing one folder rebuilt it each time the other had used it last), the flags and the
    torch/python versions, so a later run loads it in well under a second.
    ``CTRECON_FORCE_REFERENCE=1`` disables it. A failed build (no compiler, bad toolchain) warns once
    and :meth:`get` then returns None: callers fall back to the torch reference.
    """

    def __init__(self, name: str, sources: Sequence[str], extra_cflags: Sequence[str] = ("-O3",),
                 extra_ldflags: Sequence[str] = ()):
        self.name = name
        self.sources = [os.path.join(_CSRC, s) for s in sources]
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
        if os.environ.get("CTRECON_FORCE_REFERENCE", "") not in ("", "0"):
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

    @property
    def module_name(self) -> str:
        """``ctrecon_<name>_<hash>``: the build's cache key (see the class docstring)."""
        digest = hashlib.sha1()
        for path in self.sources:
            digest.update(os.path.abspath(path).encode())
            with open(path, "rb") as handle:
                digest.update(handle.read())
        digest.update(" ".join([*self.extra_cflags, *self.extra_ldflags, torch.__version__, sys.version]).encode())
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
                                  extra_ldflags=self.extra_ldflags, build_directory=build_directory, verbose=False)


_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")

#: Compiler/linker flags for OpenMP. at::parallel_for (a header template) runs in parallel only in an
#: extension compiled with OpenMP, which then shares torch's OpenMP runtime and torch.set_num_threads.
#: Apple's clang has no OpenMP: there the CPU extensions build without it and run on one thread.
OPENMP_FLAGS = {"linux": ("-fopenmp",), "win32": ("/openmp",)}.get(sys.platform, ())

#: Joseph forward / adjoint projector for CPU tensors (ctrecon/csrc/projector.cpp).
cpu_projector = LazyExtension("cpu_projector", ["projector.cpp"], extra_cflags=("-O3", *OPENMP_FLAGS),
                              extra_ldflags=OPENMP_FLAGS)

#: Gaussian voxelizer for CPU tensors (ctrecon/csrc/voxelize_cpu.cpp), OpenMP over slices / Gaussians.
cpu_voxelizer = LazyExtension("cpu_voxelizer", ["voxelize_cpu.cpp"], extra_cflags=("-O3", *OPENMP_FLAGS),
                              extra_ldflags=OPENMP_FLAGS)
