"""Learned priors for ctrecon: MedGMAE, MedGMAE* and the voxel-MAE baseline (MedGMAE, ICLR 2026).

``priors.model`` (networks), ``priors.data`` (AbdomenAtlas-style crops), ``priors.pretrain`` (the
training loop behind ``ctrecon pretrain``), ``priors.checkpoints`` (safe save/load with metadata,
MONAI encoder export) and ``priors.gaussian_space`` (crop-unit ↔ world-mm Gaussians). ``priors``
imports ``ctrecon``; ``ctrecon`` imports ``priors`` only lazily, from its CLI.
"""
