"""ctrecon: sparse-view cone-beam CT reconstruction with pretrained Gaussian priors.

Public API (imported lazily so that ``import ctrecon`` stays cheap and never compiles anything)::

    geom = ctrecon.ConeBeamGeometry.covering(ctrecon.VolumeGeometry((64, 128, 128), (2, 1, 1)), n_views=120)
    A = ctrecon.Projector(geom)          # A(x): [*, Z, Y, X] -> [*, A, V, U];  A.T(y): the exact adjoint
    scan = ctrecon.load_scan("scan.npz") # .projections, .angles, .geometry, .ground_truth
    volume, spacing = ctrecon.load_volume("ct.nii.gz")
"""
from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "VolumeGeometry": "core.geometry",
    "ConeBeamGeometry": "core.geometry",
    "ConeVecGeometry": "core.geometry",
    "InputError": "core.errors",
    "Projector": "operators.projector",
    "load_scan": "core.io",
    "save_scan": "core.io",
    "load_volume": "core.io",
    "save_volume": "core.io",
    "Scan": "core.io",
    "simulate_scan": "pipeline.simulate",
    "import_scan": "pipeline.importer",
    "psnr": "pipeline.metrics",
    "ssim3d": "pipeline.metrics",
    "ssim_slice": "pipeline.metrics",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ctrecon' has no attribute {name!r}")
