"""Memory estimates before allocation: work this machine cannot hold is refused at once, with its size and
the option that makes it smaller, instead of running until the memory is gone.

    check_memory(n_voxels * 4 * 3, "the simulated volume", "use a smaller --shape or a larger --spacing")
"""
from __future__ import annotations

import math
import os

from ctrecon.core.errors import InputError

__all__ = ["physical_memory", "check_memory", "check_grid_memory"]


def physical_memory() -> int:
    """Bytes of physical memory of this machine (``CTRECON_MEMORY_BYTES`` overrides it)."""
    override = os.environ.get("CTRECON_MEMORY_BYTES")
    if override:
        return int(float(override))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(n_bytes: float, what: str, remedy: str) -> None:
    """InputError when ``n_bytes`` (an estimate of what ``what`` allocates) exceed the physical memory."""
    available = physical_memory()
    if n_bytes > available:
        raise InputError(f"{what} needs about {n_bytes / 2 ** 30:.3g} GiB, more than this machine's "
                         f"{available / 2 ** 30:.3g} GiB; {remedy}")


def check_grid_memory(n_voxels, copies: int, what: str) -> None:
    """InputError when ``copies`` float32 volumes of the grid ``n_voxels`` (Z, Y, X) exceed the memory (a
    lower bound of what ``what`` allocates on the scan's reconstruction grid)."""
    check_memory(4 * copies * math.prod(int(n) for n in n_voxels),
                 f"{what} on the scan's {'x'.join(str(int(n)) for n in n_voxels)} voxel grid",
                 "use a coarser grid (reconstruct --grid-spacing MM, or simulate --spacing / --shape)")
