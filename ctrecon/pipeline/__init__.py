"""Pipeline: the jobs a user runs, composed from the layers below.

``simulate`` (volume → scan), ``importer`` (measured projections + geometry file → scan), ``reconstruct`` (3DGR-CT: the Trainer), ``metrics`` (PSNR / SSIM,
thresholds), ``runs`` (run folders, written and read in one place), ``plots`` (convergence curves),
``report``, ``benchmark`` (the paper's Table 4) and ``demo`` (the main job). The CLI
(``ctrecon.cli``) is a thin layer above.
"""
