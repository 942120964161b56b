#!/usr/bin/env bash
# Execute and verify the CUDA path on a GPU machine in one prepared run; results in OUTDIR/gpu_check.json.
#
#   bash scripts/gpu_check.sh OUTDIR
#
# Steps (each under its own time limit, so the whole run ends within about 8 minutes on an H200 and
# the JSON is written whatever fails): environment → Python packages the GPU image lacks, installed
# from wheels carried beside the checkout → imports → CUDA visible? (on a machine without one it
# rehearses the parity case on the CPU kernels and stops there, exit 3) → extension build (timed)
# → tests/test_cuda.py and every `cuda`-marked test → compute-sanitizer memcheck and racecheck over
# scripts/gpu_sanitize_case.py → scripts/bench_cuda.py. Exit 0 when every step ran (see the JSON
# for each step's rc), 2 for a set-up failure, 3 without a GPU, 4 when the extension does not build.
#
# Inputs (environment):
#   WHEELS  folder of wheels to install with --no-index (default: .gpu/wheels); the GPU image has torch,
#           numpy, scipy, scikit-image, matplotlib, click, tqdm, pytest, not nibabel or pydicom. Made here by
#             python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .gpu/wheels nibabel pydicom
#   CT      real CT (HU, NIfTI) for the end-to-end benchmark (default: .gpu/ct.nii.gz, else ../shared/data/ct/...)
#   TORCH_CUDA_ARCH_LIST  default 9.0 (Hopper: H100/H200 machine code instead of JIT-compiled PTX)
# With the device tool: `echo /.gpu/ >> .git/info/exclude`, fill .gpu/, and run with carry [".gpu"].
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
WHEELS=${WHEELS:-.gpu/wheels}
CT=${CT:-.gpu/ct.nii.gz}
[ -f "$CT" ] || CT=../shared/data/ct/chest_pyradiomics_lung1.nii.gz
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="$OUTDIR/.extensions"  # a fresh build: its time is one of the figures
PY=${PYTHON:-python3}
STEPS="$OUTDIR/steps.jsonl"
: > "$STEPS"
START=$(date +%s)

# step NAME LIMIT_S COMMAND...: runs COMMAND with its output in OUTDIR/NAME.log, records rc and seconds.
step() {
  local name=$1 limit=$2
  shift 2
  local t0 rc
  t0=$(date +%s%N)
  echo "[gpu_check $(date +%H:%M:%S)] $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
  rc=$?
  printf '{"step": "%s", "rc": %d, "ms": %d, "limit_s": %d}\n' "$name" "$rc" \
    $((($(date +%s%N) - t0) / 1000000)) "$limit" >> "$STEPS"
  tail -n 3 "$OUTDIR/$name.log" | sed 's/^/    /'
  return $rc
}

summarise() {
  "$PY" - "$OUTDIR" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {"steps": [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line]}
for name in ("environment", "bench"):
    path = out / f"{name}.json"
    if path.exists():
        summary[name] = json.loads(path.read_text())
for log in sorted(out.glob("sanitize_*.log")):
    summary.setdefault("sanitizer", {})[log.stem] = log.read_text().strip().splitlines()[-3:]
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
print(f"gpu_check: results in {out / 'gpu_check.json'}")
EOF
}
trap summarise EXIT

step environment 60 "$PY" - "$OUTDIR/environment.json" <<'EOF'
import json, platform, shutil, subprocess, sys
def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        return f"unavailable: {err}"
info = {"python": sys.version.split()[0], "platform": platform.platform(),
        "nvidia_smi": run("nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"),
        "nvcc": run("nvcc", "--version").splitlines()[-1:] if shutil.which("nvcc") else None,
        "compute_sanitizer": shutil.which("compute-sanitizer")}
try:
    import torch
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
except ImportError as err:
    info["torch"] = f"not importable: {err}"
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
EOF

if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  step wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$OUTDIR/.site" "$WHEELS"/*.whl || exit 2
  export PYTHONPATH="$PWD:$OUTDIR/.site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "gpu_check: no wheels in $WHEELS; using the packages already installed"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
step imports 60 "$PY" -c "import nibabel, pydicom, click, tqdm, scipy, skimage, ctrecon.cli, priors.zero_shot" || exit 2

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  step rehearse_parity_case 120 "$PY" scripts/gpu_sanitize_case.py --rehearse  # its checks, on the CPU kernels
  echo "gpu_check: no CUDA device is visible to torch on this machine: stopping before the first GPU step" \
       "(extension build, GPU tests, compute-sanitizer, benchmarks need one)" >&2
  exit 3
fi

# The first CUDA tensor through the projector builds the whole extension (every kernel of cuda/).
step build 300 "$PY" -c "
import time, torch
from ctrecon.core.geometry import ConeBeamGeometry, VolumeGeometry
from ctrecon.operators.projector import Projector
geometry = ConeBeamGeometry.covering(VolumeGeometry((8, 8, 8), (1.0, 1.0, 1.0)), n_views=4)
t0 = time.perf_counter()
Projector(geometry, backend='cuda')(torch.rand(geometry.nVoxel, device='cuda'))
torch.cuda.synchronize()
print(f'extension build and first call: {time.perf_counter() - t0:.1f} s')
" || exit 4
step tests 240 "$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra tests/test_cuda.py --junitxml="$OUTDIR/tests_cuda.xml"
step tests_marked 180 "$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra -m cuda tests --junitxml="$OUTDIR/tests_marked.xml"
if command -v compute-sanitizer >/dev/null 2>&1; then
  step sanitize_memcheck 150 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" scripts/gpu_sanitize_case.py
  step sanitize_racecheck 150 compute-sanitizer --tool racecheck --error-exitcode 9 "$PY" scripts/gpu_sanitize_case.py
fi
remaining=$((480 - ($(date +%s) - START)))
[ "$remaining" -gt 30 ] || remaining=30
step bench "$remaining" "$PY" scripts/bench_cuda.py --volume "$CT" --out "$OUTDIR/bench.json"
exit 0
