"""The wheel (`pip install .`, not editable) carries everything an installed ctrecon needs: every
sub-package, the kernel sources and headers that are compiled on first use, and the shipped data that
`ctrecon demo` and the prior initialisers read (found by ctrecon.core.paths.data_file)."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What setup.py reads: a copy of just these builds the wheel without touching the checkout (setuptools
# writes build/ and *.egg-info beside setup.py, and a stale build/lib would leak moved modules into it).
BUILD_INPUTS = ("setup.py", "README.md", "ctrecon", "priors", "cuda", "data")


def _files(folder: Path) -> list:
    return sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                  and p.suffix not in (".pyc", ".so"))


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> set:
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
        else:
            shutil.copy2(path, source / name)
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "--no-index", "-q", "-w", str(out)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = out.glob("ctrecon-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_wheel_holds_every_package_and_module(wheel_files):
    for package in ("ctrecon", "priors"):
        for path in _files(REPO / package):
            if path.suffix == ".py":
                assert path.relative_to(REPO).as_posix() in wheel_files, path
    packages = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "ctrecon").rglob("__init__.py")}
    assert {"ctrecon/core", "ctrecon/operators", "ctrecon/methods", "ctrecon/pipeline"} <= packages
    assert not any(name.startswith(("tests/", "scripts/")) for name in wheel_files)


def test_wheel_holds_kernel_sources_and_headers(wheel_files):
    csrc = _files(REPO / "ctrecon" / "operators" / "csrc")
    cuda = _files(REPO / "cuda")
    assert csrc and any(p.suffix in (".cuh", ".h") for p in cuda)
    for path in csrc:
        assert path.relative_to(REPO).as_posix() in wheel_files, path
    for path in cuda:  # installed as ctrecon/_cuda_src, where ctrecon.operators finds them
        assert f"ctrecon/_cuda_src/{path.relative_to(REPO / 'cuda').as_posix()}" in wheel_files, path


def test_wheel_holds_the_shipped_data(wheel_files):
    data = _files(REPO / "data")
    expected = {"README.md", "sample_abdomen_small.nii.gz", "priors/medgmae.pt", "priors/medgmae-star.pt"}
    assert expected <= {p.relative_to(REPO / "data").as_posix() for p in data}
    for path in data:  # installed as ctrecon/_data, where ctrecon.core.paths.data_file finds them
        assert f"ctrecon/_data/{path.relative_to(REPO / 'data').as_posix()}" in wheel_files, path


def test_data_file_finds_the_checkout_data():
    from ctrecon.core.paths import data_file
    from ctrecon.pipeline.demo import DEMO_CASE
    from priors.zero_shot import shipped_prior_path

    assert DEMO_CASE == data_file("sample_abdomen_small.nii.gz") == REPO / "data" / "sample_abdomen_small.nii.gz"
    assert shipped_prior_path("medgmae") == REPO / "data" / "priors" / "medgmae.pt"
