#!/usr/bin/env bash
# Rebuilds the built-in weights (dbt.pt, ffdm.pt, s2d.pt beside this file) from synthetic
# phantoms made by `dicomnode synth`. They are NOT for clinical use: no patient image was
# ever seen by them. README.md here says what they score on held-out phantoms.
#
#   dicomnode/weights/make_weights.sh WORKDIR
#
# Environment (defaults are what the shipped weights were made with, on a 2-core CPU):
#   STUDIES     synthetic training studies (each: 4 views x DBT, FFDM, synthetic 2D)
#   S2D_EPOCHS  epochs of the synthetic-2D model, which the others start from
#   MINUTES     wall-clock budget of the FFDM fine-tuning run
#   DBT_STUDIES extra DBT-only studies for the DBT model's fourth stage; DBT_EPOCHS its epochs
#   LOCAL_EPOCHS at most this many epochs of each local network on lesion crops (stage 5)
#   DEVICE      auto, cuda, cpu ...
#   DICOMNODE   how to call the command line (default: dicomnode); PYTHON likewise
#
# The recipe: the paper's losses (eq. 7) plus saliency supervision by the ground-truth SEG
# masks the synthetic archive has (--mask-weight; image labels alone did not train from
# scratch, and the paper started from pretrained weights), the synthetic-2D GMIC first,
# then DBT and FFDM initialised from it (the paper's transfer learning), and last each
# model's local network alone on crops centred on the lesions (--lesion-crops). Sizes fit the small
# phantoms at their own pixel size (0.1 mm; FFDM 0.07 mm); the local network is half the
# paper's width and the files are stored in float16, so the three stay small.
set -euo pipefail
WORK=${1:?usage: make_weights.sh WORKDIR}
STUDIES=${STUDIES:-160}
S2D_EPOCHS=${S2D_EPOCHS:-6}
MINUTES=${MINUTES:-40}
DBT_STUDIES=${DBT_STUDIES:-240}
DBT_EPOCHS=${DBT_EPOCHS:-3}
LOCAL_EPOCHS=${LOCAL_EPOCHS:-12}
DEVICE=${DEVICE:-auto}
DICOMNODE=${DICOMNODE:-dicomnode}
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)

# 1. The synthetic archive (seed 1000; the held-out evaluation uses seed 90000).
[ -f "$WORK/data/labels.csv" ] ||
    $DICOMNODE synth "$WORK/data" --studies "$STUDIES" --size small --seed 1000

shape=(--crop-size 128x128 --local-width 32 --device "$DEVICE" --no-progress)
options=("${shape[@]}" --batch-size 4 --patience 30 --augment-px 24 --mask-weight 1 --lr 3e-4)
common=(--images "$WORK/data" --labels "$WORK/data/labels.csv" --split 0.8,0.2,0
        "${options[@]}")
s2d=(--modality s2d --input-size 448x320 --num-crops 4 --percent-t 0.05 --out "$WORK/s2d")

# 2. Synthetic 2D: three epochs, the starting point of the others; then on to S2D_EPOCHS
#    (the same command resumes exactly where it stopped).
$DICOMNODE train "${common[@]}" "${s2d[@]}" --epochs 3
$DICOMNODE train "${common[@]}" "${s2d[@]}" --epochs "$S2D_EPOCHS" &

# 3. DBT (3D-GMIC) and FFDM from the 3-epoch synthetic-2D weights. FFDM is time-boxed; DBT
#    trains 9 epochs on this archive.
$DICOMNODE train "${common[@]}" --modality ffdm --input-size 640x480 --num-crops 4 \
    --percent-t 0.05 --no-activation-checkpointing --epochs 30 --max-minutes "$MINUTES" \
    --init "$WORK/s2d/epoch_003.pt" --out "$WORK/ffdm" &
dbt=(--modality dbt --input-size 448x320 --num-crops 6 --zeta 3 --percent-t 0.5
     --no-activation-checkpointing)
$DICOMNODE train "${common[@]}" "${dbt[@]}" --epochs 9 --init "$WORK/s2d/epoch_003.pt" \
    --out "$WORK/dbt1" &
wait

# 4. DBT again, on this archive plus DBT_STUDIES DBT-only studies (seed 2000), with the local
#    network also supervised on each crop (--crop-weight), from the 9-epoch weights.
[ -f "$WORK/data2/labels.csv" ] ||
    $DICOMNODE synth "$WORK/data2" --studies "$DBT_STUDIES" --size small --seed 2000 \
        --modalities dbt
if [ ! -f "$WORK/dbt_data/labels.csv" ]; then
    mkdir -p "$WORK/dbt_data"
    for d in "$WORK"/data/SYNTH-* "$WORK"/data2/SYNTH-*; do cp -al "$d" "$WORK/dbt_data/"; done
    { head -n 1 "$WORK/data/labels.csv"
      tail -q -n +2 "$WORK/data/labels.csv" "$WORK/data2/labels.csv" | grep ',dbt,'
    } > "$WORK/dbt_data/labels.csv"
fi
$DICOMNODE train --images "$WORK/dbt_data" --labels "$WORK/dbt_data/labels.csv" \
    --split 0.85,0.15,0 "${options[@]}" "${dbt[@]}" --crop-weight 1 --epochs "$DBT_EPOCHS" \
    --init "$WORK/dbt1/epoch_009.pt" --out "$WORK/dbt"

# 5. DBT's local network alone, on crops centred on the ground-truth lesions near the slice
#    each is centred on and on lesion-free crops (--lesion-crops), from the best stage-4
#    weights; the global network stays as it is. LOCAL_EPOCHS at 3e-4, then 14 at 1e-4 from
#    the best of those.
lesion=(--images "$WORK/dbt_data" --labels "$WORK/dbt_data/labels.csv" --split 0.85,0.15,0
        "${shape[@]}" "${dbt[@]}" --lesion-crops --batch-size 16)
$DICOMNODE train "${lesion[@]}" --lr 3e-4 --patience 12 --epochs "$LOCAL_EPOCHS" \
    --init "$WORK/dbt/best.pt" --out "$WORK/dbt_local"
$DICOMNODE train "${lesion[@]}" --lr 1e-4 --patience 8 --epochs 14 \
    --init "$WORK/dbt_local/best.pt" --out "$WORK/dbt_local2"

#    The same for synthetic 2D and FFDM: LOCAL_EPOCHS at 3e-4 from their best weights, on the
#    stage-1 archive (one 2D image per view, so no slice to choose).
lesion2d=(--images "$WORK/data" --labels "$WORK/data/labels.csv" --split 0.8,0.2,0
          "${shape[@]}" --lesion-crops --batch-size 16 --lr 3e-4 --patience 6
          --epochs "$LOCAL_EPOCHS")
$DICOMNODE train "${lesion2d[@]}" "${s2d[@]}" --init "$WORK/s2d/best.pt" \
    --out "$WORK/s2d_local"
$DICOMNODE train "${lesion2d[@]}" --modality ffdm --input-size 640x480 --num-crops 4 \
    --percent-t 0.05 --no-activation-checkpointing --init "$WORK/ffdm/best.pt" \
    --out "$WORK/ffdm_local"

# 6. Each model's best epoch (validation malignant AUC), in float16 with its story.
for m in dbt_local2:dbt ffdm_local:ffdm s2d_local:s2d; do
    $PYTHON - "$WORK/${m%%:*}/best.pt" "${OUT_DIR:-$HERE}/${m##*:}.pt" <<'EOF'
import sys
from gmic.checkpoint import load_checkpoint, save_checkpoint
model, meta = load_checkpoint(sys.argv[1])
meta.update(description="dicomnode built-in weights: trained on synthetic phantoms "
            "(dicomnode synth), not for clinical use", recipe="dicomnode/weights/make_weights.sh")
save_checkpoint(sys.argv[2], model, meta, half=True)
print(sys.argv[2], "epoch", meta.get("epoch"), "validation malignant AUC",
      meta.get("val_auc_malignant"))
EOF
done
