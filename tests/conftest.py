"""Test-session settings.

OpenMP threads that spin while waiting burn the CPU that other threads need on a small shared
machine (the voxelizer took 20× the CPU time with two spinning threads under load); passive waiting
must be chosen before torch is imported, which is why it lives here.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
