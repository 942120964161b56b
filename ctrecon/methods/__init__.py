"""Methods: reconstruction models built on the operators.

``gaussians/``: the Gaussian field (parameters, activations, files), its initialisers (3DGR-CT's fbp
sampling, R²-Gaussian's, and the learned priors through one lazy hook) and density control.
``classical``: the classical iterative baselines on the same projector (SART, OS-SART, CGLS, FISTA-TV).
"""
