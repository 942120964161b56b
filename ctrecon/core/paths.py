"""Where the shipped non-Python files are: top-level folders of a checkout, installed as package data.

setup.py ships the top-level ``data/`` (demo case, priors) as ``ctrecon/_data`` and ``cuda/`` (kernel
sources) as ``ctrecon/_cuda_src``; :func:`shipped_folder` finds either in an installed package or in a
checkout (and an editable install, which runs from the checkout).
"""
from pathlib import Path

__all__ = ["shipped_folder", "data_file"]

_PACKAGE = Path(__file__).resolve().parents[1]  # ctrecon/


def shipped_folder(checkout_name: str, installed_name: str) -> Path:
    """``ctrecon/<installed_name>`` when that folder exists (an installed package), else the checkout's
    top-level ``<checkout_name>``."""
    installed = _PACKAGE / installed_name
    return installed if installed.is_dir() else _PACKAGE.parent / checkout_name


def data_file(*parts: str) -> Path:
    """The shipped file ``data/<parts>`` (e.g. ``data_file("priors", "medgmae.pt")``).

    The path is returned whether or not the file is there; callers say what is missing.
    """
    return shipped_folder("data", "_data").joinpath(*parts)
