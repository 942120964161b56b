"""Initial Gaussian fields from an FDK volume: initialisers, by name or as objects.

Every initialiser has the signature
``fn(fdk_volume [Z, Y, X] tensor, volume_geometry, n_gaussians=50_000, generator=None, **options)
-> GaussianField`` (centres in world mm, on the FDK tensor's device, float32). ``generator`` is a
``torch.Generator`` for the random choices (None: torch's global RNG). Wherever an initialiser name
is taken, the initialiser itself may be given instead (:func:`get_initializer` returns it as it is;
:func:`initializer_name` is the label runs record). Others plug in by name with
:func:`register_initializer`.

The learned priors' "medgmae" and "medgmae-star" (:class:`priors.zero_shot.PriorInit`) come through
**the prior hook**, :func:`_register_prior_initializers`, the one place ctrecon reaches ``priors``
(DESIGN §3, checked by tests/test_layering.py): the first time a name is looked up that is not
registered, or the names are listed, it imports :mod:`priors.zero_shot` and lets
:func:`priors.zero_shot.register_initializers` fill the registry (names registered before are kept).
Importing ctrecon never imports ``priors``.

Built in:

* ``"fbp"`` — 3DGR-CT (``GaussianModel.create_from_fbp``): FDK values below ``threshold`` (0.05) are
  set to 0; voxels are ranked by the magnitude of the forward-difference gradient (voxel units) of
  that thresholded volume; the top ``skip_fraction`` (3DGR-CT: ``start=0.15``) of the ranking is
  skipped (sharp edges and streaks) and the next ``n_gaussians`` voxels seed isotropic Gaussians.
  Deviations, each because the original relies on its own normalised [0,1]³ frame or fixed sizes:
  the candidates are the voxels above the threshold and the skipped band is a fraction of *them*
  (3DGR-CT: of all voxels, which skips every candidate when the object is small); σ is
  ``scale_factor`` × the mean distance (mm) to the ``neighbours`` nearest seeds (3DGR-CT:
  ``ini_sigma / count of seeds in the 5³ neighbourhood``, a sub-voxel size in its normalised frame);
  intensity is ``a·FDK + intensity_offset`` as in 3DGR-CT (``ini_intensity·FBP + 0.001``), but ``a``
  defaults to ``"auto"``: the least-squares factor that makes the rendered initial field match the
  thresholded FDK (with overlapping Gaussians a fixed factor is off by the overlap).
* ``"r2"`` — R²-Gaussian (``initialize_pcd.py``): ``n_gaussians`` distinct voxels drawn uniformly
  among those with FDK > ``threshold`` (0.05), intensity ``density_rescale`` (0.15) × FDK, isotropic
  σ = root-mean-square distance to the 3 nearest seeds (simple-knn's ``distCUDA2``) clamped to
  [0.0005, 0.5] × the largest volume extent (its scale bounds); softplus activation.

When fewer candidate voxels than ``n_gaussians`` exist, candidates are reused with a uniform
sub-voxel jitter so that the count is always exactly ``n_gaussians``.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import torch

from ctrecon.core.errors import InputError
from ctrecon.core.geometry import VolumeGeometry
from ctrecon.methods.gaussians.field import GaussianField
from ctrecon.operators.voxelize import DEFAULT_K_SIGMA, voxelize

__all__ = ["get_initializer", "register_initializer", "available_initializers", "initializer_name",
           "fbp_initializer", "r2_initializer"]

DEFAULT_N_GAUSSIANS = 50_000
_REGISTRY: dict[str, Callable[..., GaussianField]] = {}


def register_initializer(name: str, fn: Callable[..., GaussianField] | None = None, *, replace: bool = False):
    """Register ``fn`` under ``name`` (also usable as a decorator: ``@register_initializer("x")``)."""
    if not isinstance(name, str) or not name:
        raise InputError("initializer name must be a non-empty string")

    def add(func):
        if not callable(func):
            raise InputError(f"initializer {name!r} must be callable")
        if name in _REGISTRY and not replace and _REGISTRY[name] is not func:
            raise InputError(f"initializer {name!r} is already registered (pass replace=True)")
        _REGISTRY[name] = func
        return func

    return add if fn is None else add(fn)


def get_initializer(init) -> Callable[..., GaussianField]:
    """The initialiser ``init``: the one registered under a name, or ``init`` itself when it is an
    initialiser (a callable); an :class:`InputError` listing the known names otherwise."""
    if callable(init):
        return init
    if init not in _REGISTRY:
        _register_prior_initializers()
    if init not in _REGISTRY:
        raise InputError(f"unknown initializer {init!r} (available: {', '.join(available_initializers())})")
    return _REGISTRY[init]


def available_initializers() -> list:
    """Names of the registered initialisers, the priors' included."""
    _register_prior_initializers()
    return sorted(_REGISTRY)


def initializer_name(init) -> str:
    """The label of ``init`` in runs and reports: a name as it is; an initialiser's ``name`` attribute
    (e.g. :class:`priors.zero_shot.PriorInit`'s), else its ``__name__``."""
    if isinstance(init, str):
        return init
    return getattr(init, "name", None) or getattr(init, "__name__", type(init).__name__)


@functools.cache  # once: the registry keeps what it registered
def _register_prior_initializers() -> None:
    """The prior hook (see the module docstring): the learned priors register their initialisers."""
    from priors.zero_shot import register_initializers

    register_initializers(lambda name, fn: _REGISTRY.setdefault(name, fn))


# --------------------------------------------------------------------------- shared pieces
def _fdk_tensor(fdk_volume, volume: VolumeGeometry) -> torch.Tensor:
    if not isinstance(volume, VolumeGeometry):
        raise InputError(f"volume_geometry must be a VolumeGeometry, got {type(volume).__name__}")
    fdk = torch.as_tensor(fdk_volume)
    if tuple(fdk.shape) != tuple(volume.nVoxel):
        raise InputError(f"FDK volume shape {tuple(fdk.shape)} does not match the geometry {tuple(volume.nVoxel)}")
    fdk = fdk.detach().float()
    if not bool(torch.isfinite(fdk).all()):
        raise InputError("FDK volume has non-finite values")
    return fdk


def _check_count(n_gaussians) -> int:
    n = int(n_gaussians)
    if n < 1 or n != n_gaussians:
        raise InputError(f"n_gaussians must be a positive integer, got {n_gaussians!r}")
    return n


def _seed_positions(flat_indices: torch.Tensor, n: int, volume: VolumeGeometry, generator) -> torch.Tensor:
    """World positions ``[n, 3]`` (float64, CPU) of ``n`` seeds taken in order from ``flat_indices``.

    Voxel centres; when there are fewer candidates than ``n`` they are cycled and every reuse gets a
    uniform jitter within its voxel.
    """
    if flat_indices.numel() == 0:
        raise InputError("no voxel of the FDK volume is above the initialisation threshold")
    reps = math.ceil(n / flat_indices.numel())
    chosen = flat_indices.cpu().repeat(reps)[:n]
    Z, Y, X = volume.nVoxel
    k, rest = chosen // (Y * X), chosen % (Y * X)
    j, i = rest // X, rest % X
    xyz = torch.stack([torch.as_tensor(volume.axis_centres(2))[i], torch.as_tensor(volume.axis_centres(1))[j],
                       torch.as_tensor(volume.axis_centres(0))[k]], dim=-1)
    if reps > 1:
        jitter = torch.rand(n, 3, generator=generator, dtype=torch.float64) - 0.5
        jitter[: flat_indices.numel()] = 0.0
        xyz = xyz + jitter * torch.tensor(volume.dVoxel[::-1], dtype=torch.float64)
    return xyz


def _neighbour_distances(xyz: torch.Tensor, k: int) -> np.ndarray:
    """``[n, k]`` distances (mm) from each seed to its k nearest other seeds (scipy cKDTree)."""
    from scipy.spatial import cKDTree

    points = xyz.numpy()
    k_eff = min(k, len(points) - 1)
    if k_eff < 1:
        return np.zeros((len(points), 1))
    dist, _ = cKDTree(points).query(points, k=k_eff + 1)
    return dist[:, 1:]


def _identity_quats(n: int) -> torch.Tensor:
    quats = torch.zeros(n, 4)
    quats[:, 0] = 1.0
    return quats


def _options_metadata(name: str, volume: VolumeGeometry, **options) -> dict:
    return {"initializer": name, "volume": volume.to_dict(), "options": options}


# --------------------------------------------------------------------------- 3DGR-CT
def fbp_initializer(fdk_volume, volume_geometry: VolumeGeometry, n_gaussians: int = DEFAULT_N_GAUSSIANS,
                    generator: torch.Generator | None = None, *, threshold: float = 0.05,
                    skip_fraction: float = 0.15, intensity_scale: float | str = "auto",
                    intensity_offset: float = 0.001, neighbours: int = 3, scale_factor: float = 0.75,
                    max_scale_voxels: float = 5.0, intensity_activation: str = "softplus",
                    k_sigma: float = DEFAULT_K_SIGMA) -> GaussianField:
    """3DGR-CT's FBP-driven initialisation (see the module docstring for the rule and deviations).

    σ is clamped to [0.25, ``max_scale_voxels``] × the voxel size (largest axis for the cap, smallest
    for the floor). ``k_sigma`` is only used by the ``"auto"`` intensity fit.
    """
    volume = volume_geometry
    fdk = _fdk_tensor(fdk_volume, volume)
    n = _check_count(n_gaussians)
    if not 0.0 <= float(skip_fraction) < 1.0:
        raise InputError(f"skip_fraction must be in [0, 1), got {skip_fraction}")
    device = fdk.device
    thresholded = torch.where(fdk >= threshold, fdk, torch.zeros((), device=device)).cpu()
    grad_sq = torch.zeros_like(thresholded)
    for axis in range(3):
        diff = torch.diff(thresholded, dim=axis, append=thresholded.narrow(axis, thresholded.shape[axis] - 1, 1))
        grad_sq += diff * diff
    flat_grad = grad_sq.sqrt().reshape(-1)
    candidates = torch.nonzero(thresholded.reshape(-1) > 0).squeeze(1)
    order = torch.sort(flat_grad[candidates], descending=True, stable=True).indices
    ranked = candidates[order]
    skip = min(int(skip_fraction * ranked.numel()), max(0, ranked.numel() - n))
    xyz = _seed_positions(ranked[skip: skip + n], n, volume, generator)

    spacing = volume.dVoxel
    distances = _neighbour_distances(xyz, neighbours).mean(axis=1)
    sigma = np.clip(scale_factor * distances, 0.25 * min(spacing), max_scale_voxels * max(spacing))
    seed_values = _voxel_values_at(thresholded, xyz, volume)

    scales = torch.as_tensor(sigma, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    means = xyz.float()
    if intensity_scale == "auto":
        scale = _fit_intensity_scale(means, scales, seed_values, float(intensity_offset), thresholded, volume,
                                     k_sigma)
    else:
        scale = float(intensity_scale)
        if not math.isfinite(scale) or scale <= 0:
            raise InputError(f"intensity_scale must be 'auto' or a positive number, got {intensity_scale!r}")
    intensities = scale * seed_values + float(intensity_offset)
    meta = _options_metadata("fbp", volume, threshold=threshold, skip_fraction=skip_fraction,
                             intensity_scale=scale, intensity_offset=intensity_offset, neighbours=neighbours,
                             scale_factor=scale_factor, max_scale_voxels=max_scale_voxels)
    return GaussianField.from_values(means, scales, _identity_quats(n), intensities,
                                     intensity_activation=intensity_activation, metadata=meta).to(device)


def _voxel_values_at(volume_values: torch.Tensor, xyz: torch.Tensor, volume: VolumeGeometry) -> torch.Tensor:
    """Value of the voxel containing each seed (nearest voxel centre), float32 ``[n]``."""
    index = np.rint(volume.world_to_index(xyz.numpy())).astype(np.int64)
    Z, Y, X = volume.nVoxel
    index = np.clip(index, 0, np.array([X - 1, Y - 1, Z - 1]))
    return volume_values[index[:, 2], index[:, 1], index[:, 0]].float()


def _fit_intensity_scale(means, scales, seed_values, offset, target, volume, k_sigma) -> float:
    """Least-squares a ≥ 0 in ``render(a·v + offset) ≈ target`` (one batched render of v and of 1)."""
    quats = _identity_quats(means.shape[0])
    batch = lambda t: torch.stack([t, t])  # noqa: E731
    with torch.no_grad():
        rendered = voxelize(batch(means), batch(scales), batch(quats),
                            torch.stack([seed_values, torch.ones_like(seed_values)]), volume, k_sigma).double()
    by_value, by_one = rendered[0].reshape(-1), rendered[1].reshape(-1)
    residual = target.double().reshape(-1) - offset * by_one
    denom = float(by_value @ by_value)
    scale = float(by_value @ residual) / denom if denom > 0 else 1.0
    return max(scale, 1e-6)


# --------------------------------------------------------------------------- R²-Gaussian
def r2_initializer(fdk_volume, volume_geometry: VolumeGeometry, n_gaussians: int = DEFAULT_N_GAUSSIANS,
                   generator: torch.Generator | None = None, *, threshold: float = 0.05,
                   density_rescale: float = 0.15, neighbours: int = 3, scale_bounds=(0.0005, 0.5),
                   intensity_activation: str = "softplus") -> GaussianField:
    """R²-Gaussian's FDK initialisation (see the module docstring)."""
    volume = volume_geometry
    fdk = _fdk_tensor(fdk_volume, volume)
    n = _check_count(n_gaussians)
    device = fdk.device
    values = fdk.cpu()
    candidates = torch.nonzero(values.reshape(-1) > threshold).squeeze(1)
    if candidates.numel() > n:
        candidates = candidates[torch.randperm(candidates.numel(), generator=generator)[:n]]
    xyz = _seed_positions(candidates, n, volume, generator)
    rms = np.sqrt(np.mean(_neighbour_distances(xyz, neighbours) ** 2, axis=1))
    extent = max(volume.sVoxel)
    sigma = np.clip(rms, scale_bounds[0] * extent, scale_bounds[1] * extent)
    seed_values = _voxel_values_at(values, xyz, volume)
    scales = torch.as_tensor(sigma, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    meta = _options_metadata("r2", volume, threshold=threshold, density_rescale=density_rescale,
                             neighbours=neighbours, scale_bounds=list(scale_bounds))
    return GaussianField.from_values(xyz.float(), scales, _identity_quats(n), density_rescale * seed_values,
                                     intensity_activation=intensity_activation, metadata=meta).to(device)


register_initializer("fbp", fbp_initializer)
register_initializer("r2", r2_initializer)
