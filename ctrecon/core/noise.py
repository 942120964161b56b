"""The noise model of simulated scans (``simulate --dose``; also the corrupted inputs of pre-training).

Unit attenuation is not a physical attenuation coefficient, so photon statistics use ``μ = κ·u`` with
``κ = μ_water·4095/1024`` (water, u = 1024/4095, gets ``μ_water``, 0.0192 mm⁻¹ by default: water at an
effective energy near 70 keV; air gets 0). A line integral p (unit × mm) thus attenuates the beam by
``exp(-κ·p)``. Each detector pixel receives ``I0`` incident photons; the detected count is
``N = Poisson(I0·exp(-κ·p)) + Normal(0, σ_e²)`` (σ_e: electronic noise, in counts), clipped at ``N ≥ 1``
(no log of zero), and the noisy line integral is ``-log(N / I0) / κ``. Randomness comes from
``numpy.random.default_rng(seed)`` on the CPU, so a seed gives the same scan on every device.
"""
from __future__ import annotations

import math

import numpy as np

from ctrecon.core.errors import InputError
from ctrecon.core.units import MU_WATER, attenuation_scale

__all__ = ["add_noise"]

#: The largest fraction of detector readings below one photon (clipped to 1) that a noisy scan may have.
_MAX_STARVED_FRACTION = 0.5


def add_noise(projections, dose_i0: float, electronic_sigma: float = 0.0, seed: int = 0,
              mu_water: float = MU_WATER) -> np.ndarray:
    """Noisy line integrals (unit × mm, float32) by the model of the module docstring.

    ``p_noisy = -log(N / I0) / κ`` with ``N = max(1, Poisson(I0·e^{-κp}) + Normal(0, σ_e²))`` and
    ``κ = mu_water·4095/1024`` (mm⁻¹ per unit attenuation). InputError when more than half the readings
    fall below one photon (a dose far too low: the scan would be the clip value, not a measurement).
    """
    i0 = _positive_number(dose_i0, "dose (incident photons per pixel)")
    kappa = attenuation_scale(_positive_number(mu_water, "mu_water (mm^-1)"))
    sigma = float(electronic_sigma)
    if not math.isfinite(sigma) or sigma < 0:
        raise InputError(f"electronic noise sigma must be >= 0 counts, got {electronic_sigma}")
    rng = np.random.default_rng(seed)
    expected = i0 * np.exp(-kappa * np.asarray(projections, dtype=np.float64))
    counts = rng.poisson(expected).astype(np.float64)
    if sigma > 0:
        counts += rng.normal(0.0, sigma, size=counts.shape)
    starved = float(np.mean(counts < 1.0)) if counts.size else 0.0
    if starved > _MAX_STARVED_FRACTION:
        raise InputError(f"a dose of {i0:g} photons per pixel is too low for this object: {100 * starved:.0f} % of the "
                         "detector readings are below one photon, so the projections would be mostly the clip value; "
                         "raise --dose")
    return (-np.log(np.maximum(counts, 1.0) / i0) / kappa).astype(np.float32)


def _positive_number(value, name: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(out) or out <= 0:
        raise InputError(f"{name} must be a positive number, got {value!r}")
    return out
