"""The Gaussian field: a torch Module holding N anisotropic 3-D Gaussians in world coordinates.

Parameters (raw, optimised): ``means`` [N, 3] (x, y, z; mm), ``log_scales`` [N, 3] (σ = exp, mm, body
axes), ``quats`` [N, 4] (w, x, y, z; unnormalised, normalised by :attr:`rotations`) and
``raw_intensities`` [N] mapped through the field's ``intensity_activation``:

* ``"softplus"`` (default, as R²-Gaussian's densities): I = log(1 + eᶻ) ≥ 0, unbounded above. An
  additive field needs non-negative attenuation but no upper cap: small Gaussians may need I > 1.
* ``"sigmoid"`` (3DGR-CT's choice): I ∈ (0, 1).
* ``"identity"``: I = z (signed; for priors that predict intensities directly).

The activation is stored with the field (``save``/``load``). Optimiser groups are named
:data:`GROUP_NAMES` ("means", "log_scales", "quats", "intensities"); :meth:`GaussianField.parameter_groups`
builds them, and ``densify.QuantileSplitCloneStrategy`` relies on the names.
"""
from __future__ import annotations

import json
import math
import os
import zipfile
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctrecon.core.errors import InputError
from ctrecon.core.geometry import VolumeGeometry
from ctrecon.operators.voxelize import DEFAULT_K_SIGMA, covariance_matrices, quaternion_to_rotation, render_points, voxelize

__all__ = ["GaussianField", "GROUP_NAMES", "INTENSITY_ACTIVATIONS"]

FORMAT = "ctrecon.gaussians"
FORMAT_VERSION = 1
#: Optimiser group name → attribute holding the raw Parameter.
GROUP_NAMES = {"means": "means", "log_scales": "log_scales", "quats": "quats", "intensities": "raw_intensities"}
_TAIL = {"means": (3,), "log_scales": (3,), "quats": (4,), "intensities": ()}


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    y = y.clamp(min=torch.finfo(y.dtype).tiny ** 0.5)
    return y + torch.log(-torch.expm1(-y))


INTENSITY_ACTIVATIONS = {
    "softplus": (F.softplus, _inverse_softplus),
    "sigmoid": (torch.sigmoid, torch.logit),
    "identity": (lambda z: z, lambda y: y),
}


def _activation(name: str):
    if name not in INTENSITY_ACTIVATIONS:
        raise InputError(f"unknown intensity activation {name!r} (use {', '.join(INTENSITY_ACTIVATIONS)})")
    return INTENSITY_ACTIVATIONS[name]


def _check_finite(arrays: dict, what: str) -> None:
    """InputError when a parameter array (name → numpy array) holds NaN or ±Inf."""
    for attr, values in arrays.items():
        finite_rows = np.isfinite(values).reshape(len(values), -1).all(axis=1)
        if not finite_rows.all():
            raise InputError(f"{what}: {int(np.count_nonzero(~finite_rows))} Gaussian(s) have non-finite {attr} "
                             "(NaN or Inf)")


class GaussianField(nn.Module):
    """N Gaussians; value at x is Σ I·exp(−½ (x−μ)ᵀ Σ⁻¹ (x−μ)), Σ = R S Sᵀ Rᵀ (see ``render.py``).

    ``metadata``: a JSON-serialisable dict carried through ``save``/``load`` (initialiser, volume, ...).
    """

    def __init__(self, means: torch.Tensor, log_scales: torch.Tensor, quats: torch.Tensor,
                 raw_intensities: torch.Tensor, *, intensity_activation: str = "softplus",
                 metadata: Mapping | None = None):
        super().__init__()
        _activation(intensity_activation)
        raw = {"means": means, "log_scales": log_scales, "quats": quats, "intensities": raw_intensities}
        n = _check_rows(raw)
        dtype = means.dtype if means.is_floating_point() else torch.get_default_dtype()
        for group, attr in GROUP_NAMES.items():
            setattr(self, attr, nn.Parameter(torch.as_tensor(raw[group]).detach().to(dtype).clone().reshape(
                n, *_TAIL[group])))
        self.intensity_activation = intensity_activation
        self.metadata = dict(metadata or {})
        json.dumps(self.metadata)  # fail early on non-serialisable metadata

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_values(cls, means, scales, quats, intensities, *, intensity_activation: str = "softplus",
                    metadata: Mapping | None = None) -> "GaussianField":
        """Build from physical values: scales σ > 0 (mm), any non-zero quats, activated intensities."""
        means = torch.as_tensor(means)
        dtype = means.dtype if means.is_floating_point() else torch.get_default_dtype()
        as_t = lambda v: torch.as_tensor(v, dtype=dtype, device=means.device).detach()  # noqa: E731
        scales, quats, intensities = as_t(scales), as_t(quats), as_t(intensities)
        if scales.numel() and not bool((scales > 0).all() & torch.isfinite(scales).all()):
            raise InputError("Gaussian scales must be positive and finite")
        if quats.numel() and not bool((quats.norm(dim=-1) > 0).all()):
            raise InputError("Gaussian quaternions must be non-zero")
        if intensity_activation in ("softplus", "sigmoid") and intensities.numel():
            if not bool((intensities >= 0).all()):
                raise InputError(f"intensities must be >= 0 for the {intensity_activation} activation")
            if intensity_activation == "sigmoid" and not bool((intensities < 1).all()):
                raise InputError("intensities must be < 1 for the sigmoid activation")
        inverse = _activation(intensity_activation)[1]
        return cls(means.to(dtype), torch.log(scales), quats, inverse(intensities),
                   intensity_activation=intensity_activation, metadata=metadata)

    # ----------------------------------------------------------------- activated values
    @property
    def scales(self) -> torch.Tensor:
        """σ along the body axes, ``[N, 3]`` mm."""
        return torch.exp(self.log_scales)

    @property
    def rotations(self) -> torch.Tensor:
        """Unit quaternions ``[N, 4]`` (w, x, y, z)."""
        return self.quats / self.quats.norm(dim=-1, keepdim=True)

    @property
    def intensities(self) -> torch.Tensor:
        """Activated intensities ``[N]``."""
        return _activation(self.intensity_activation)[0](self.raw_intensities)

    def raw_from_intensities(self, intensities: torch.Tensor) -> torch.Tensor:
        """Inverse of the intensity activation (raw parameter values giving ``intensities``)."""
        return _activation(self.intensity_activation)[1](intensities)

    def rotation_matrices(self) -> torch.Tensor:
        """``[N, 3, 3]`` rotation of each Gaussian's body axes."""
        return quaternion_to_rotation(self.quats)

    def covariances(self) -> torch.Tensor:
        """Σ = R S Sᵀ Rᵀ, ``[N, 3, 3]`` mm²."""
        return covariance_matrices(self.scales, self.quats)

    def __len__(self) -> int:
        return int(self.means.shape[0])

    @property
    def num_gaussians(self) -> int:
        return len(self)

    # ----------------------------------------------------------------- rendering
    def render(self, volume: VolumeGeometry, k_sigma: float = DEFAULT_K_SIGMA, **kwargs) -> torch.Tensor:
        """Voxelise into ``volume``: ``[Z, Y, X]`` (see :func:`render.voxelize`)."""
        return voxelize(self.means, self.scales, self.quats, self.intensities, volume, k_sigma, **kwargs)

    def render_points(self, points: torch.Tensor, k_sigma: float = DEFAULT_K_SIGMA, **kwargs) -> torch.Tensor:
        """Field values ``[M]`` at world points ``[M, 3]``."""
        return render_points(self.means, self.scales, self.quats, self.intensities, points, k_sigma, **kwargs)

    # ----------------------------------------------------------------- optimisation helpers
    def raw_parameters(self) -> dict:
        """Group name → raw Parameter (``means``, ``log_scales``, ``quats``, ``intensities``)."""
        return {group: getattr(self, attr) for group, attr in GROUP_NAMES.items()}

    def parameter_groups(self, lrs: Mapping[str, float]) -> list:
        """Named optimiser groups, e.g. ``torch.optim.Adam(field.parameter_groups({...}), eps=1e-15)``.

        ``lrs`` gives a learning rate per group name; missing names are left out of the optimiser.
        """
        unknown = set(lrs) - set(GROUP_NAMES)
        if unknown:
            raise InputError(f"unknown parameter group(s) {sorted(unknown)} (use {', '.join(GROUP_NAMES)})")
        return [{"params": [param], "lr": float(lrs[group]), "name": group}
                for group, param in self.raw_parameters().items() if group in lrs]

    def select(self, index: torch.Tensor) -> None:
        """Keep only the rows ``index`` (bool mask ``[N]`` or integer indices), in place.

        The Parameters are replaced by new ones (gradients dropped); an optimiser must be updated
        (``densify.QuantileSplitCloneStrategy`` does it).
        """
        index = torch.as_tensor(index, device=self.means.device)
        if index.dtype == torch.bool and index.shape != (len(self),):
            raise InputError(f"select mask must have shape [{len(self)}], got {list(index.shape)}")
        for attr in GROUP_NAMES.values():
            setattr(self, attr, nn.Parameter(getattr(self, attr).detach()[index].clone()))

    def append(self, raw: Mapping[str, torch.Tensor]) -> None:
        """Append Gaussians given as raw parameter rows keyed by group name, in place (see :meth:`select`)."""
        missing = set(GROUP_NAMES) - set(raw)
        if missing:
            raise InputError(f"append needs raw rows for {sorted(missing)}")
        rows = {group: torch.as_tensor(raw[group], dtype=self.means.dtype, device=self.means.device)
                for group in GROUP_NAMES}
        _check_rows(rows)
        for group, attr in GROUP_NAMES.items():
            old = getattr(self, attr).detach()
            setattr(self, attr, nn.Parameter(torch.cat([old, rows[group].detach().reshape(-1, *_TAIL[group])])))

    # ----------------------------------------------------------------- files
    def save(self, path) -> None:
        """Write an ``.npz`` (float32 raw parameters + a JSON ``metadata`` string; no pickles), atomically."""
        from ctrecon.core.io import atomic_output

        meta = {"format": FORMAT, "version": FORMAT_VERSION, "intensity_activation": self.intensity_activation,
                "num_gaussians": len(self), "metadata": self.metadata}
        arrays = {attr: getattr(self, attr).detach().cpu().numpy().astype(np.float32)
                  for attr in GROUP_NAMES.values()}
        _check_finite(arrays, f"the field to write to {path}")
        with atomic_output(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, metadata=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path, *, device=None, dtype=torch.float32) -> "GaussianField":
        """Read a file written by :meth:`save` (never unpickles)."""
        if not os.path.isfile(path):
            raise InputError(f"Gaussian file not found: {path}")
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("one .npy array, not an .npz archive")
            with data:
                meta = json.loads(str(data["metadata"]))
                arrays = {attr: np.array(data[attr]) for attr in GROUP_NAMES.values()}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise InputError(f"{path} is not a ctrecon Gaussian file ({err})") from None
        if not isinstance(meta, dict):
            raise InputError(f"{path} is not a ctrecon Gaussian file (its metadata is not an object)")
        if meta.get("format") != FORMAT:
            raise InputError(f"{path} is not a ctrecon Gaussian file (format {meta.get('format')!r})")
        if int(meta.get("version", 0)) > FORMAT_VERSION:
            raise InputError(f"{path} was written by a newer ctrecon (format version {meta['version']})")
        _check_finite(arrays, str(path))
        tensors = {attr: torch.as_tensor(a, dtype=dtype, device=device) for attr, a in arrays.items()}
        return cls(tensors["means"], tensors["log_scales"], tensors["quats"], tensors["raw_intensities"],
                   intensity_activation=meta["intensity_activation"], metadata=meta.get("metadata"))

    def to_ply(self, path) -> None:
        """Binary little-endian PLY in the 3D Gaussian-splatting layout, for splat viewers.

        Properties (float32): x y z, nx ny nz (0), f_dc_0..2 (grey level of the intensity as a
        degree-0 spherical harmonic), opacity (logit of intensity / max intensity), scale_0..2
        (log σ, as 3DGS stores them), rot_0..3 (unit quaternion w, x, y, z), intensity (activated).
        """
        from ctrecon.core.io import atomic_output

        with torch.no_grad():
            intensity = self.intensities.detach().cpu().double().numpy()
            means = self.means.detach().cpu().double().numpy()
            log_scales = self.log_scales.detach().cpu().double().numpy()
            rotations = self.rotations.detach().cpu().double().numpy()
        peak = float(np.max(np.abs(intensity))) if intensity.size else 1.0
        grey = np.clip(intensity / (peak or 1.0), 1e-6, 1 - 1e-6)
        sh_c0 = 0.5 / math.sqrt(math.pi)  # degree-0 SH constant: colour = 0.5 + C0·f_dc
        columns = {"x": means[:, 0], "y": means[:, 1], "z": means[:, 2],
                   "nx": np.zeros_like(grey), "ny": np.zeros_like(grey), "nz": np.zeros_like(grey)}
        for c in range(3):
            columns[f"f_dc_{c}"] = (grey - 0.5) / sh_c0
        columns["opacity"] = np.log(grey / (1 - grey))
        for c in range(3):
            columns[f"scale_{c}"] = log_scales[:, c]
        for c in range(4):
            columns[f"rot_{c}"] = rotations[:, c]
        columns["intensity"] = intensity
        record = np.dtype([(name, "<f4") for name in columns])
        body = np.empty(len(self), dtype=record)
        for name, values in columns.items():
            body[name] = values
        header = ["ply", "format binary_little_endian 1.0", f"comment ctrecon Gaussian field ({FORMAT})",
                  f"element vertex {len(self)}"] + [f"property float {name}" for name in columns] + ["end_header"]
        with atomic_output(path) as tmp, open(tmp, "wb") as handle:
            handle.write(("\n".join(header) + "\n").encode("ascii"))
            handle.write(body.tobytes())

    def extra_repr(self) -> str:
        return f"num_gaussians={len(self)}, intensity_activation={self.intensity_activation!r}"


def _check_rows(raw: Mapping) -> int:
    """All groups must have the same number of rows with the right trailing shape; returns it."""
    means = torch.as_tensor(raw["means"])
    if means.dim() != 2 or means.shape[1] != 3:
        raise InputError(f"means must be [N, 3], got {list(means.shape)}")
    n = int(means.shape[0])
    for group, tail in _TAIL.items():
        shape = tuple(torch.as_tensor(raw[group]).shape)
        if shape != (n, *tail):
            raise InputError(f"{group} must be {[n, *tail]}, got {list(shape)}")
    return n
