"""Learned priors for ctrecon: MedGMAE, MedGMAE* and the voxel-MAE baseline (MedGMAE, ICLR 2026).

``priors.model`` (networks), ``priors.data`` (AbdomenAtlas-style crops), ``priors.pretrain`` (the
training loop behind ``ctrecon pretrain``), ``priors.checkpoints`` (safe save/load with metadata,
MONAI encoder export), ``priors.gaussian_space`` (crop-unit ↔ world-mm Gaussians),
``priors.zero_shot`` (windows → Gaussians → one world-mm field; ``PriorInit``, the 3DGR-CT
initialiser) and ``priors.defaults`` (the window overlaps and why). ``priors`` imports ``ctrecon``;
``ctrecon`` reaches ``priors`` only through one lazy hook (``ctrecon.methods.gaussians.init``, which
registers the prior initialisers on first look-up) and from its CLI.
"""
