#!/usr/bin/env bash
# Train the two priors shipped in data/priors/ (MedGMAE and MedGMAE*) on the real CT volumes of
# ../shared/data/ct (see data/README.md, "Shipped priors"). CPU-sized on purpose: a "tiny" network on
# 32³ crops at 3 mm in the unit-attenuation window, which trains in about half an hour per prior on
# two shared CPU cores. Held out: abdomen_ts_example.nii.gz and its 30-slice crop
# abdomen_ts_example_small.nii.gz (= data/sample_abdomen_small.nii.gz, the demo case).
#
#   bash scripts/train_shipped_priors.sh                 # both priors, one after the other
#   ARCHS=medgmae-star STEPS_STAR=2000 bash scripts/train_shipped_priors.sh
#   DEVICE=cuda bash scripts/train_shipped_priors.sh     # same recipe on a GPU
#
# Environment: DATA (default ../shared/data/ct), WORK (default /tmp/ctrecon_shipped_priors: training
# folders, the preprocessed-volume cache, the training-data folder), ARCHS, STEPS_MEDGMAE,
# STEPS_STAR, BATCH, DEVICE, SEED, CORRUPTION (none, noise or fdk: priors.data's input corruption;
# default none, the shipped priors'), INSTALL=1 copies each prior.pt to data/priors/<arch>.pt.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DATA=${DATA:-$REPO/../shared/data/ct}
WORK=${WORK:-/tmp/ctrecon_shipped_priors}
ARCHS=${ARCHS:-"medgmae medgmae-star"}
STEPS_MEDGMAE=${STEPS_MEDGMAE:-3500}
STEPS_STAR=${STEPS_STAR:-3500}
BATCH=${BATCH:-4}
DEVICE=${DEVICE:-cpu}
SEED=${SEED:-0}
INSTALL=${INSTALL:-0}
CORRUPTION=${CORRUPTION:-none}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

# Training data: every NIfTI volume of DATA except the held-out abdomen (and its crop), plus the
# DICOM series converted to NIfTI (the pre-training data loader reads NIfTI folders).
TRAIN="$WORK/train_data"
mkdir -p "$TRAIN"
for name in chest_cta_ts_aorta.nii.gz chest_pyradiomics_lung1.nii.gz head_vtk_headsq.nii.gz; do
  ln -sf "$(readlink -f "$DATA/$name")" "$TRAIN/$name"
done
if [ ! -f "$TRAIN/chest_lungdx_dicom.nii.gz" ]; then
  python -c "import sys; from ctrecon.core.io import read_volume, save_volume; v = read_volume(sys.argv[1]); \
save_volume(sys.argv[2], v.array, v.spacing, v.origin)" "$DATA/chest_lungdx_dicom" "$TRAIN/chest_lungdx_dicom.nii.gz"
fi

for arch in $ARCHS; do
  if [ "$arch" = medgmae ]; then steps=$STEPS_MEDGMAE; else steps=$STEPS_STAR; fi
  python - "$arch" "$steps" <<EOF
import sys
from priors.data import DataConfig
from priors.model import model_config
from priors.pretrain import TrainConfig, pretrain

arch, steps = sys.argv[1], int(sys.argv[2])
# "tiny" widths (encoder 96 x 2 blocks, decoder 48 x 1 block) on 32-voxel crops cut into 8-voxel
# patches (64 tokens); MedGMAE: 256 Gaussians per crop; MedGMAE*: 128 + 2·128 + 4·128 = 896. σ is capped
# at 0.08 of the crop (2.6 voxels, 7.7 mm): with a cap of a quarter crop the network used σ ≈ 7 voxels,
# blurry fields whose Gaussians each cover ~70 000 voxels, making a 3DGR-CT iteration 7× slower than
# with the fbp initialisation's 20 000 small Gaussians.
# Mask ratio 0.25 (48 of 64 patches visible), not the paper's 0.75: zero-shot inference shows the encoder
# every patch, and a small network trained on 16 visible tokens does not carry over to 64 (all-visible
# crop MSE 0.033 vs 0.005 after re-training at 0.25, on the held-out abdomen).
overrides = dict(crop_size=32, patch_size=8, n_gaussians=256 if arch == "medgmae" else 128, levels=(2, 4),
                 max_scale=0.08, mask_ratio=0.25,
                 level_scale_offsets=(0.02, 0.05), loss="masked")
model_cfg = model_config("tiny", arch, **overrides)
data_cfg = DataConfig(spacing_mm=3.0, window_hu=(-1024.0, 3071.0), foreground_hu=-500.0, crop_size=32,
                      crops_per_volume=4, corruption="${CORRUPTION}")
train_cfg = TrainConfig(steps=steps, batch=${BATCH}, lr=1e-3, warmup_steps=100, checkpoint_every=200,
                        preview_every=500, log_every=10, workers=0, seed=${SEED})
summary = pretrain("${TRAIN}", "${WORK}/" + arch, model_cfg, data_cfg, train_cfg, resume=True,
                   device="${DEVICE}", cache_dir="${WORK}/cache")
print(f"{arch}: {summary['steps']} steps, final loss {summary['final_loss']:.6f}, {summary['seconds']:.0f} s, "
      f"prior {summary['prior']}")
EOF
  if [ "$INSTALL" = 1 ]; then
    mkdir -p data/priors
    cp "$WORK/$arch/prior.pt" "data/priors/$arch.pt"
  fi
done
