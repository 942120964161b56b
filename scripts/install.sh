#!/usr/bin/env bash
# Install ctrecon with its test extras. On a machine without an NVIDIA GPU it installs the CPU build of
# torch first, so pip never pulls the multi-GB CUDA wheels. Keeps an already installed torch.
#   bash scripts/install.sh            # CPU or GPU machine
#   TORCH_VERSION=2.13.0 bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install.sh: NVIDIA GPU found: installing the CUDA build of torch ${TORCH_VERSION}"
    "$PY" -m pip install "torch==${TORCH_VERSION}"
  else
    echo "install.sh: no GPU: installing the CPU build of torch ${TORCH_VERSION}"
    # The +cpu build from pip's configured sources first (a local find-links wheel, say; PyPI has
    # no +cpu builds, so elsewhere this fails at once), else from PyTorch's CPU index.
    "$PY" -m pip install "torch==${TORCH_VERSION}+cpu" \
      || "$PY" -m pip install "torch==${TORCH_VERSION}+cpu" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$PY" -m pip install -e ".[test]"
# The RTK cross-checks (tests/test_geometry_files.py) are optional: without itk-rtk they skip.
"$PY" -m pip install -e ".[rtk]" || echo "install.sh: itk-rtk could not be installed: the RTK cross-checks will skip"
