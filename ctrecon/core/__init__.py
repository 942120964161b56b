"""Core: what every layer agrees on, with no computation of its own.

``units`` (HU ↔ unit attenuation), ``geometry`` (volume and cone-beam geometries, TIGRE vocabulary: the
circle and per-view ``cone_vec``), ``geometry_files`` (RTK XML, TIGRE / ctrecon JSON, the field-of-view grid),
``io`` (the ``Scan`` type, NIfTI / DICOM / npz readers and writers, atomic writes), ``projection_files``
(measured projection stacks: TIFF/PNG, MetaImage, NIfTI, raw; flat/dark log transform), ``phantoms``
(exact analytic line integrals, the projector's oracle), ``paths`` (where the shipped data and kernel
sources are, in a checkout or an installed package) and ``errors`` (``InputError``: bad input
from a user, reported as one line). Imports nothing else of ctrecon.
"""
