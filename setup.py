"""ctrecon: sparse-view cone-beam CT reconstruction with pretrained Gaussian priors.

Install on a CPU-only machine with `bash scripts/install.sh` (chooses the CPU build of torch),
or `pip install -e .` where a suitable torch is already installed (see README.md).
"""
from setuptools import find_packages, setup

setup(
    name="ctrecon",
    version="0.1.0",
    description="Sparse-view cone-beam CT reconstruction (3DGR-CT) with MedGMAE prior initialisation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # Top-level folders ship inside the package: the CUDA kernel sources (cuda/) as ctrecon/_cuda_src, where
    # ctrecon.operators finds them to build the extension on first use, and the shipped data (data/: the
    # demo case, the priors) as ctrecon/_data, where ctrecon.core.paths.data_file finds it.
    packages=find_packages(include=["ctrecon", "ctrecon.*", "priors", "priors.*"]) + ["ctrecon._cuda_src", "ctrecon._data"],
    package_dir={"ctrecon._cuda_src": "cuda", "ctrecon._data": "data"},
    package_data={"ctrecon.operators": ["csrc/*.cpp", "csrc/*.h"], "ctrecon._cuda_src": ["*.cu", "*.cuh", "*.cpp", "*.h"],
                  "ctrecon._data": ["README.md", "*.nii.gz", "priors/*.pt"]},
    # torch is required but deliberately unpinned above 2.1: scripts/install.sh installs the CPU build
    # on machines without CUDA before this package, so pip never pulls the multi-GB CUDA wheels there.
    install_requires=[
        "torch>=2.1",
        "numpy>=1.23",
        "scipy>=1.10",
        "nibabel>=5.0",
        "pillow>=9",
        "pydicom>=2.4",
        "click>=8.1",
        "tqdm>=4.60",
        "matplotlib>=3.6",
        "ninja>=1.11",
    ],
    # monai + einops: the encoder-export test loads our weights into MONAI's ViT/UNETR (an independent check).
    # itk-rtk: RTK's geometry, Joseph projector and FDK check ours (tests skip without it; scripts/install.sh
    # installs it where pip can).
    extras_require={"test": ["pytest>=7", "scikit-image>=0.21", "monai>=1.4", "einops>=0.7"],
                    "rtk": ["itk-rtk>=2.5"]},
    entry_points={"console_scripts": ["ctrecon=ctrecon.cli:main"]},
)
