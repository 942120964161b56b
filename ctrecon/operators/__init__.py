"""Operators: the linear and differentiable maps of the reconstruction, each one module.

``projector`` (cone-beam Joseph forward projection ``A`` and its exact adjoint ``A.T``), ``fdk``
(filtered backprojection), ``voxelize`` (3-D Gaussians → voxel grid or query points, forward and
backward). Each module holds its autograd functions, its dispatch and its pure-PyTorch reference;
``_backend`` resolves ``backend="auto"|"reference"|"cpu"|"cuda"`` and builds the compiled kernels
(``csrc/`` for the CPU, top-level ``cuda/`` for the GPU) lazily. Imports only ``ctrecon.core``.
"""
