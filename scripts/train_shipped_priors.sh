#!/usr/bin/env bash
# Train the two priors shipped in data/priors/ (MedGMAE and MedGMAE*) on the real CT volumes of
# ../shared/data/ct (see data/README.md, "Shipped priors"). CPU-sized on purpose: "tiny" networks on
# 32³ crops at 3 mm in the unit-attenuation window. Held out: abdomen_ts_example.nii.gz and its 30-slice
# crop abdomen_ts_example_small.nii.gz (= data/sample_abdomen_small.nii.gz, the demo case).
#
#   bash scripts/train_shipped_priors.sh                 # both priors, one after the other
#   ARCHS=medgmae-star STEPS_STAR=2000 bash scripts/train_shipped_priors.sh
#   RECIPE=paper-decoder bash scripts/train_shipped_priors.sh   # the priors shipped before (see data/README.md)
#   DEVICE=cuda bash scripts/train_shipped_priors.sh     # same recipe on a GPU
#
# RECIPE: "fdk-patches" (patch-token decoder 96 wide x 2 blocks, mask ratio drawn per step from U(0, 0.5),
# encoder input the FDK of a simulated 60-180-view scan of the training volume; MedGMAE*'s children smaller:
# the shipped priors) or "paper-decoder" (the paper's query-token decoder 48 x 1, mask ratio 0.25, clean
# input: the priors shipped before, data/priors/<arch>-paper-decoder.pt).
# Environment: DATA (default ../shared/data/ct), WORK (default /tmp/ctrecon_shipped_priors: training
# folders WORK/RECIPE/ARCH, the preprocessed-volume cache, the training-data folder), ARCHS, STEPS_MEDGMAE,
# STEPS_STAR, BATCH, DEVICE, SEED, CORRUPTION (none, noise or fdk: priors.data's input corruption;
# default: the recipe's), FDK_DOSE ("LOW,HIGH" photons per pixel for noisy FDKs; default empty: noiseless,
# as both recipes), INSTALL=1 copies each prior.pt to data/priors/<arch>.pt (fdk-patches) or
# data/priors/<arch>-paper-decoder.pt.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DATA=${DATA:-$REPO/../shared/data/ct}
WORK=${WORK:-/tmp/ctrecon_shipped_priors}
ARCHS=${ARCHS:-"medgmae medgmae-star"}
RECIPE=${RECIPE:-fdk-patches}
case "$RECIPE" in
  fdk-patches) default_corruption=fdk; default_steps=10500 ;;
  paper-decoder) default_corruption=none; default_steps=3500 ;;
  *) echo "RECIPE must be fdk-patches or paper-decoder, got $RECIPE" >&2; exit 2 ;;
esac
STEPS_MEDGMAE=${STEPS_MEDGMAE:-$default_steps}
STEPS_STAR=${STEPS_STAR:-$default_steps}
BATCH=${BATCH:-4}
DEVICE=${DEVICE:-cpu}
SEED=${SEED:-0}
INSTALL=${INSTALL:-0}
CORRUPTION=${CORRUPTION:-$default_corruption}
FDK_DOSE=${FDK_DOSE-}
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

arch, steps, recipe = sys.argv[1], int(sys.argv[2]), "${RECIPE}"
# "tiny" encoder (96 wide x 2 blocks) on 32-voxel crops cut into 8-voxel patches (64 tokens); MedGMAE: 256
# Gaussians per crop; MedGMAE*: 128 + 2·128 + 4·128 = 896. σ is capped at 0.08 of the crop (2.6 voxels,
# 7.7 mm): with a cap of a quarter crop the network used σ ≈ 7 voxels, blurry fields whose Gaussians each
# cover ~70 000 voxels, making a 3DGR-CT iteration 7× slower than with the fbp initialisation's 20 000
# small Gaussians.
# paper-decoder: the paper's query tokens, decoder 48 x 1 block, mask ratio 0.25 (48 of 64 patches visible),
# not the paper's 0.75: zero-shot inference shows the encoder every patch, and a small network trained on
# 16 visible tokens does not carry over to 64 (all-visible crop MSE 0.033 vs 0.005 after re-training at 0.25).
# fdk-patches: patch tokens (4 or 2 Gaussians anchored in each patch), decoder 96 x 2 blocks, the mask
# ratio drawn per step from U(0, 0.5); MedGMAE*'s children at most 0.05 of the crop (1.6 voxels) from their
# parent's scale less 0.05 / 0.08 (level 1 / 2) instead of 0.1 less 0.02 / 0.05: with the larger residuals its
# children grew to σ ≈ 4.5 voxels and 3DGR-CT converged slower. All chosen on the development volumes
# (data/README.md).
overrides = dict(crop_size=32, patch_size=8, n_gaussians=256 if arch == "medgmae" else 128, levels=(2, 4),
                 max_scale=0.08, mask_ratio=0.25, level_scale_offsets=(0.02, 0.05), loss="masked")
if recipe == "fdk-patches":
    overrides.update(gaussian_tokens="patches", decoder_dim=96, decoder_depth=2, mask_ratio_range=(0.0, 0.5))
    if arch == "medgmae-star":
        overrides.update(residual_scale=0.05, level_scale_offsets=(0.05, 0.08))
model_cfg = model_config("tiny", arch, **overrides)
dose = tuple(float(v) for v in "${FDK_DOSE}".split(",")) if "${FDK_DOSE}" else ()
data_cfg = DataConfig(spacing_mm=3.0, window_hu=(-1024.0, 3071.0), foreground_hu=-500.0, crop_size=32,
                      crops_per_volume=4, corruption="${CORRUPTION}", fdk_dose=dose)
train_cfg = TrainConfig(steps=steps, batch=${BATCH}, lr=1e-3, warmup_steps=100, checkpoint_every=200,
                        preview_every=500, log_every=10, workers=0, seed=${SEED})
summary = pretrain("${TRAIN}", "${WORK}/${RECIPE}/" + arch, model_cfg, data_cfg, train_cfg, resume=True,
                   device="${DEVICE}", cache_dir="${WORK}/cache")
print(f"{arch}: {summary['steps']} steps, final loss {summary['final_loss']:.6f}, {summary['seconds']:.0f} s, "
      f"prior {summary['prior']}")
EOF
  if [ "$INSTALL" = 1 ]; then
    if [ "$RECIPE" = fdk-patches ]; then dest="data/priors/$arch.pt"; else dest="data/priors/$arch-$RECIPE.pt"; fi
    mkdir -p data/priors
    cp "$WORK/$RECIPE/$arch/prior.pt" "$dest"
  fi
done
