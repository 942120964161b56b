"""The one conversion between the prior's crop-unit Gaussians and world-mm Gaussians (DESIGN.md §2).

A crop (block) is a ``VolumeGeometry`` of ``(D, D, D)`` voxels in the world. Its crop-unit frame maps
[0, 1]³ onto the block's outer faces, (x, y, z) ordered: ``world = lower_corner + p ⊙ size`` with
``size = (X·dx, Y·dy, Z·dz)`` mm, so the crop-unit voxel centres ``((i+½)/X, (j+½)/Y, (k+½)/Z)`` land on
the block's voxel centres. Under that affine map a Gaussian's covariance becomes exactly
``Σ_world = D Σ_crop D`` with ``D = diag(size)``, which for anisotropic blocks is re-decomposed by
``eigh`` into scales (σ, mm) and a rotation quaternion. Intensities are values of the field and do not
change; the field value at a world point equals the crop field's value at the mapped point.
"""
from __future__ import annotations

import torch

from ctrecon.core.geometry import VolumeGeometry
from ctrecon.operators.voxelize import covariance_matrices

__all__ = ["block_to_world", "world_to_block", "matrix_to_quaternion"]


def matrix_to_quaternion(rot: torch.Tensor) -> torch.Tensor:
    """Unit quaternions ``[..., 4]`` (w, x, y, z; w ≥ 0) of proper rotation matrices ``[..., 3, 3]``, the
    inverse of :func:`ctrecon.operators.voxelize.quaternion_to_rotation`.

    Uses the largest of the four candidate denominators (Shepperd's method), stable for every rotation.
    """
    m = rot
    trace = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    candidates = torch.stack([
        torch.stack([1 + trace, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
        torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2],
                     m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
        torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0],
                     1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], m[..., 1, 2] + m[..., 2, 1]], -1),
        torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1],
                     1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]], -1),
    ], dim=-2)  # [..., 4 candidates, 4]; candidate c has component c equal to 4·q_c²
    diag = torch.stack([1 + trace, 1 + m[..., 0, 0] - m[..., 1, 1] - m[..., 2, 2],
                        1 - m[..., 0, 0] + m[..., 1, 1] - m[..., 2, 2], 1 - m[..., 0, 0] - m[..., 1, 1] + m[..., 2, 2]], -1)
    best = diag.argmax(-1)
    q = torch.gather(candidates, -2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    q = torch.nn.functional.normalize(q, dim=-1)
    return torch.where(q[..., :1] < 0, -q, q)


def _block_frame(block: VolumeGeometry, like: torch.Tensor):
    """Lower corner (x, y, z) and size (x, y, z) in mm of the block's voxel faces."""
    bounds = torch.as_tensor(block.bounds(), dtype=like.dtype, device=like.device)
    return bounds[0], bounds[1] - bounds[0]


def _transform(scales, quats, factor):
    """Scales and quaternions of ``F R S² Rᵀ F`` for ``F = diag(factor)`` (exact; eigh for anisotropy)."""
    if torch.allclose(factor, factor[0].expand_as(factor)):
        return scales * factor[0], torch.nn.functional.normalize(quats, dim=-1)
    cov = factor[:, None] * covariance_matrices(scales, quats) * factor[None, :]
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    eigvals, eigvecs = torch.linalg.eigh(cov)
    det = torch.linalg.det(eigvecs)
    eigvecs = torch.cat([eigvecs[..., :2], eigvecs[..., 2:] * det[..., None, None].sign()], dim=-1)
    return eigvals.clamp_min(0).sqrt(), matrix_to_quaternion(eigvecs)


def block_to_world(means, scales, quats, intensities, block: VolumeGeometry):
    """Crop-unit Gaussians (means ``[..., 3]`` in [0, 1]³, σ ``[..., 3]``, quats ``[..., 4]``, intensities
    ``[...]``) of ``block`` → world Gaussians (means mm, σ mm, unit quats, same intensities)."""
    corner, size = _block_frame(block, means)
    world_scales, world_quats = _transform(scales, quats, size)
    return corner + means * size, world_scales, world_quats, intensities


def world_to_block(means, scales, quats, intensities, block: VolumeGeometry):
    """Inverse of :func:`block_to_world`: world-mm Gaussians → crop units of ``block``."""
    corner, size = _block_frame(block, means)
    block_scales, block_quats = _transform(scales, quats, 1.0 / size)
    return (means - corner) / size, block_scales, block_quats, intensities
