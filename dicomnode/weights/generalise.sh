#!/usr/bin/env bash
# Issue 17, "a model that generalises": the leave-one-family-out protocol for the DBT model,
# then the all-family model meant to replace dbt.pt. Long: run it on a GPU.
#
#   dicomnode/weights/generalise.sh WORKDIR [FAMILY ...]
#
# For each texture family F of `dicomnode synth` (powerlaw, ligament, lumpy, mixture; or the
# FAMILY arguments), in turn:
#   1. train on phantoms of every family but F (--families -F), with varied lesions and
#      acquisition (--variety) and intensity augmentation, from the built-in weights;
#   2. evaluate on held-out phantoms of the training families AND on held-out phantoms of F,
#      which the model never saw: the gap says whether it learnt lesions or textures.
# Then (unless SKIP_ALL=1) the same recipe on every family: the candidate new dbt.pt, scored
# on every family's held-out set, small and full size (whole breast read).
#
# Environment (defaults sized for one GPU, a few hours; a CPU run needs far smaller values):
#   STUDIES       training studies per run (DBT only, 4 views each; split 85/15 by patient)
#   HELDOUT       held-out studies per family and evaluation set
#   FULL_HELDOUT  full-size held-out studies per family (0: skip; ~40 s a view on a CPU)
#   EPOCHS        epochs of stage A (whole model); LOCAL_EPOCHS of stage B (lesion crops)
#   MASK_WEIGHT   weight of the SEG mask loss in stage A (0: image labels only)
#   INTENSITY     --augment-intensity of stage A
#   INIT          where stage A starts (builtin: the shipped dbt.pt)
#   SPLIT         patient fractions train,val,test of each training set (0.85,0.15,0)
#   DEVICE, DICOMNODE (how to call the command line), SEED_BASE
#
# Issue 17's targets (DBT, breast-wise malignant AUC, held-out): >= 0.95 on the training
# families, >= 0.85 on a left-out family, full size within 0.05 of small, DSC(M) >= 0.40.
# Every report says its figures with 95% bootstrap CIs (WORKDIR/*/report.md).
set -euo pipefail
WORK=${1:?usage: generalise.sh WORKDIR [FAMILY ...]}
shift
ALL_FAMILIES=(powerlaw ligament lumpy mixture)
if [ $# -gt 0 ]; then LEAVE_OUT=("$@"); else LEAVE_OUT=("${ALL_FAMILIES[@]}"); fi
STUDIES=${STUDIES:-800}
HELDOUT=${HELDOUT:-100}
FULL_HELDOUT=${FULL_HELDOUT:-10}
EPOCHS=${EPOCHS:-12}
LOCAL_EPOCHS=${LOCAL_EPOCHS:-12}
MASK_WEIGHT=${MASK_WEIGHT:-1}
INTENSITY=${INTENSITY:-0.3}
INIT=${INIT:-builtin}
DEVICE=${DEVICE:-auto}
DICOMNODE=${DICOMNODE:-dicomnode}
SEED_BASE=${SEED_BASE:-3000}
SPLIT=${SPLIT:-0.85,0.15,0}  # patient fractions train,val,test of each training set
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$WORK"

# Phantoms: training seeds from SEED_BASE, held-out seeds from 95000 (never trained on).
synth() {  # OUT STUDIES SEED FAMILIES [extra synth options]
    local out=$1 studies=$2 seed=$3 families=$4
    shift 4
    [ -f "$out/labels.csv" ] ||
        $DICOMNODE synth "$out" --studies "$studies" --seed "$seed" --modalities dbt \
            --families "$families" --variety "$@"
}

# Stage A: the whole model from INIT (its architecture comes with it), the paper's loss plus
# the SEG mask loss, shift/resize and intensity augmentation. Stage B: the local network on
# crops centred on the lesions (as make_weights.sh stage 5).
train_dbt() {  # DATA OUT
    local data=$1 out=$2
    $DICOMNODE train --images "$data" --labels "$data/labels.csv" --modality dbt \
        --split "$SPLIT" --init "$INIT" --device "$DEVICE" --no-progress \
        --batch-size 4 --lr 3e-4 --patience 6 --epochs "$EPOCHS" --augment-px 24 \
        --augment-intensity "$INTENSITY" --mask-weight "$MASK_WEIGHT" --out "$out/a"
    $DICOMNODE train --images "$data" --labels "$data/labels.csv" --modality dbt \
        --split "$SPLIT" --init "$out/a/best.pt" --device "$DEVICE" --no-progress \
        --lesion-crops --batch-size 16 --lr 1e-4 --patience 6 --epochs "$LOCAL_EPOCHS" \
        --out "$out/b"
}

evaluate() {  # CHECKPOINT DATA OUT
    $DICOMNODE evaluate --images "$2" --labels "$2/labels.csv" --checkpoint "$1" \
        --out "$3" --montages 2 --group-by family --group-by lesion_kind --group-by size \
        --group-by margin --device "$DEVICE"
}

except() {  # FAMILY -> the other families, comma-separated
    local f out=()
    for f in "${ALL_FAMILIES[@]}"; do [ "$f" = "$1" ] || out+=("$f"); done
    (IFS=,; echo "${out[*]}")
}

k=0
for left in "${LEAVE_OUT[@]}"; do
    k=$((k + 1))
    others=$(except "$left")
    run="$WORK/lofo_$left"
    synth "$run/train" "$STUDIES" $((SEED_BASE + 100 * k)) "$others"
    synth "$WORK/heldout_$left" "$HELDOUT" $((95000 + 100 * k)) "$left"
    synth "$run/heldout_seen" "$HELDOUT" $((96000 + 100 * k)) "$others"
    [ -f "$run/b/best.pt" ] || train_dbt "$run/train" "$run"
    evaluate "$run/b/best.pt" "$run/heldout_seen" "$run/report_seen"
    evaluate "$run/b/best.pt" "$WORK/heldout_$left" "$run/report_left_out"
    # the shipped weights (trained on powerlaw alone) on the same left-out family
    [ -f "$WORK/builtin_on_$left/report.md" ] ||
        evaluate "$HERE/dbt.pt" "$WORK/heldout_$left" "$WORK/builtin_on_$left"
done

if [ "${SKIP_ALL:-0}" != 1 ]; then
    run="$WORK/all"
    synth "$run/train" "$STUDIES" $((SEED_BASE + 1000)) all
    [ -f "$run/b/best.pt" ] || train_dbt "$run/train" "$run"
    synth "$run/heldout" "$HELDOUT" 97000 all
    evaluate "$run/b/best.pt" "$run/heldout" "$run/report_small"
    if [ "$FULL_HELDOUT" -gt 0 ]; then
        synth "$run/heldout_full" "$FULL_HELDOUT" 98000 all --size full
        evaluate "$run/b/best.pt" "$run/heldout_full" "$run/report_full"
    fi
fi
