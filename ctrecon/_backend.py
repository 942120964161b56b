"""Device selection and lazy loading of compiled kernels; the torch reference is used where they are absent."""
from __future__ import annotations

import torch

from .errors import InputError


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
