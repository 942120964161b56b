"""Core: what every layer agrees on, with no computation of its own.

``units`` (HU ↔ unit attenuation), ``geometry`` (volume and cone-beam geometries, TIGRE vocabulary),
``io`` (the ``Scan`` type, NIfTI / DICOM / npz readers and writers, atomic writes), ``phantoms``
(exact analytic line integrals, the projector's oracle), ``paths`` (where the shipped data and kernel
sources are, in a checkout or an installed package) and ``errors`` (``InputError``: bad input
from a user, reported as one line). Imports nothing else of ctrecon.
"""
