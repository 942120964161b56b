"""Window overlaps of zero-shot inference (:mod:`priors.zero_shot`, step 3): their values and reasons.

This module imports nothing, so that ``ctrecon --help`` shows them without loading torch. The overlap
is a fraction of a window in [0, 1); 0 is the paper's layout of non-overlapping windows.

Why overlap at all: a prior trained on crops is free to put Gaussian tails outside its crop, and
non-overlapping windows then add those tails to their neighbours' field, a seam on every window face.
Overlapping windows blended at the Gaussian centres (step 6) remove it, at the price of more windows
and Gaussians. The two uses of a stitched field settle that price differently, hence two values.
"""

#: Overlap of :func:`priors.zero_shot.infer_field` and ``ctrecon infer``: the field as good as the
#: prior makes it. The CPU priors put tails across the faces: on the window faces of the
#: shipped sample the error is 2.7× (MedGMAE*) to 4.3× (MedGMAE) what it is on the same planes when
#: the windows are shifted away; with overlap 0.5 still up to 1.8×, with 0.75 at most 1.3× (no seam;
#: ~3× more windows, and Gaussians). (Measured with the paper-decoder priors, data/README.md; the test of
#: the shipped MedGMAE* prior checks the same on every run.)
FIELD_OVERLAP = 0.75

#: Overlap of the 3DGR-CT initialisers (:class:`priors.zero_shot.PriorInit`, the "medgmae" and
#: "medgmae-star" of ``ctrecon reconstruct``, ``benchmark`` and ``demo``). A cost/quality trade measured
#: on the held-out abdomen (48×96×96 voxels, 120 views, 10 views per iteration, one thread): overlap
#: 0.75 gives 47 000 (MedGMAE) / 163 000 (MedGMAE*) faint Gaussians, 134–203 M voxels of Gaussian
#: boxes, and 3DGR-CT iterations 5–7× slower than fbp's; at 0.5 the fields have 12 000 / 40 000
#: Gaussians (0.86 / 0.61 s per iteration against fbp's 0.49 s) and reach 32.1 / 33.0 dB in 300
#: iterations (MedGMAE* non-overlapping: 32.1 dB); timings taken with another run sharing the two
#: cores. The price is the seams of the stitched field at 0.5 (plane errors up to 1.8× on window
#: faces, above), which the optimisation then has to fit away. Convergence to 35 dB from these
#: fields: data/README.md. (Measured with the paper-decoder priors, then both defaults; not re-tuned for
#: the fdk-patches MedGMAE prior shipped since.)
INIT_OVERLAP = 0.5
