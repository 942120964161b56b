"""Intensity units shared by every layer: Hounsfield units <-> unit attenuation (DESIGN §2).

Reconstruction runs on unit attenuation ``u = (clip(HU, -1024, 3071) + 1024) / 4095``: air 0, water
about 0.25, linear in the attenuation coefficient μ, so line integrals stay physical.
"""
import numpy as np
import torch

__all__ = ["HU_MIN", "HU_MAX", "HU_SPAN", "MU_WATER", "hu_to_unit", "unit_to_hu", "attenuation_scale"]

HU_MIN, HU_MAX = -1024.0, 3071.0
HU_SPAN = HU_MAX - HU_MIN
MU_WATER = 0.0192  # mm⁻¹, water at an effective energy near 70 keV


def hu_to_unit(hu):
    """Hounsfield units → unit attenuation ``(clip(HU, -1024, 3071) + 1024) / 4095`` (numpy or torch)."""
    if torch.is_tensor(hu):
        return (hu.clamp(HU_MIN, HU_MAX) - HU_MIN) / HU_SPAN
    return (np.clip(hu, HU_MIN, HU_MAX) - HU_MIN) / HU_SPAN


def attenuation_scale(mu_water: float = MU_WATER) -> float:
    """κ = μ_water·4095/1024: the attenuation coefficient (mm⁻¹) per unit attenuation, μ = κ·u (HU −1024 is
    μ = 0, water u = 1024/4095 is μ_water); physical line integrals are κ times those of unit attenuation."""
    return mu_water * HU_SPAN / -HU_MIN


def unit_to_hu(unit):
    """Unit attenuation → Hounsfield units ``u·4095 - 1024`` (the inverse of :func:`hu_to_unit` on its range)."""
    return unit * HU_SPAN + HU_MIN
