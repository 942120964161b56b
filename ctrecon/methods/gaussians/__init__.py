"""3-D Gaussian fields for CT: the field model, the voxel renderer, initialisers and density strategies.

    field = get_initializer("fbp")(fdk_volume, volume_geometry, n_gaussians=50_000, generator=gen)
    volume = field.render(volume_geometry)                # [Z, Y, X], differentiable
    optimizer = torch.optim.Adam(field.parameter_groups({"means": 1e-2, "log_scales": 5e-3,
                                                         "quats": 1e-3, "intensities": 5e-2}), eps=1e-15)
    strategy = QuantileSplitCloneStrategy(scene_extent=max(volume_geometry.sVoxel))
    ... loss.backward(); strategy.step_post_backward(field, optimizer, it)
    ... optimizer.step(); optimizer.zero_grad(); strategy.step_post_update(field, optimizer, it)
"""
from ctrecon.methods.gaussians.densify import AdditiveDensityStrategy, DensityStrategy, QuantileSplitCloneStrategy
from ctrecon.methods.gaussians.field import GROUP_NAMES, INTENSITY_ACTIVATIONS, GaussianField
from ctrecon.methods.gaussians.init import (available_initializers, get_initializer, initializer_name,
                                            register_initializer)
from ctrecon.operators.voxelize import (DEFAULT_K_SIGMA, bounding_half_widths, covariance_matrices, precision_entries,
                                        quaternion_to_rotation, render_points, voxelize, voxelize_batch)

__all__ = ["GaussianField", "GROUP_NAMES", "INTENSITY_ACTIVATIONS", "DensityStrategy", "QuantileSplitCloneStrategy",
           "AdditiveDensityStrategy", "voxelize", "voxelize_batch", "render_points", "quaternion_to_rotation",
           "covariance_matrices", "precision_entries", "bounding_half_widths", "DEFAULT_K_SIGMA", "get_initializer",
           "register_initializer", "available_initializers", "initializer_name"]
