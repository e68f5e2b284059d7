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
# Then (unless SKIP_ADAPT=1), for each of those families, what a site without pixel masks
# would do: fine-tune INIT on phantoms of F alone with image labels only (no SEG read, no
# lesion-crop stage, Adam at ADAPT_LR), scored on the same held-out phantoms of F as INIT.
# Then (unless SKIP_ALL=1) the same recipe on every family: the candidate new dbt.pt, scored
# on every family's held-out set, small and full size (whole breast read).
# SKIP_LOFO=1 leaves out the leave-one-family-out runs.
#
# Environment (defaults sized for one GPU, a few hours; a CPU run needs far smaller values):
#   STUDIES       training studies per run (DBT only, 4 views each; split 85/15 by patient)
#   HELDOUT       held-out studies per family and evaluation set
#   FULL_HELDOUT  full-size held-out studies per family (0: skip; ~40 s a view on a CPU)
#   EPOCHS        epochs of stage A (whole model); LOCAL_EPOCHS of stage B (lesion crops)
#   MASK_WEIGHT   weight of the SEG mask loss in stage A (0: image labels only, and no
#                 stage B, which needs the SEG's lesions)
#   ADAPT_LR      Adam learning rate of the labels-only fine-tunes, and of stage A when
#                 MASK_WEIGHT=0 (the paper's search range was 10^-5.5 to 10^-4)
#   INTENSITY     --augment-intensity of stage A
#   INIT          where stage A starts (builtin: the shipped dbt.pt)
#   FULL_TRAIN    full-size studies (--size full) added to the all-family model's training
#                 set (0: none); that model then trains and validates on whole breasts
#                 (train --whole-breast), as the node reads them: a model trained on small
#                 phantoms alone may mark the skin of full-size breasts (weights README)
#   NORMAL_SLICES --normal-slices of that training: breasts without a finding train on a
#                 random slab of this many slices (0: every slice; 8 makes a CPU run possible)
#   SPLIT         patient fractions train,val,test of each training set (0.85,0.15,0)
#   DEVICE, DICOMNODE (how to call the command line), SEED_BASE
#
# Issue 17's targets (DBT, breast-wise malignant AUC, held-out): >= 0.95 on the training
# families, >= 0.85 on a left-out family, full size within 0.05 of small, DSC(M) >= 0.40.
# Every report says its figures with 95% bootstrap CIs (WORKDIR/*/report.md).
set -euo pipefail
shopt -s inherit_errexit  # a failed stage inside $(...) stops the recipe too
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
ADAPT_LR=${ADAPT_LR:-1e-4}
INIT=${INIT:-builtin}
FULL_TRAIN=${FULL_TRAIN:-0}
NORMAL_SLICES=${NORMAL_SLICES:-0}
WHOLE=()  # train options of the run at hand: whole breasts where it has full-size studies
DEVICE=${DEVICE:-auto}
DICOMNODE=${DICOMNODE:-dicomnode}
SEED_BASE=${SEED_BASE:-3000}
SPLIT=${SPLIT:-0.85,0.15,0}  # patient fractions train,val,test of each training set
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$WORK"

# Phantoms: training seeds from SEED_BASE, held-out seeds from 95000 (never trained on),
# each family's by its place in ALL_FAMILIES, so that a run of one family makes the same
# phantoms as a run of all.
synth() {  # OUT STUDIES SEED FAMILIES [extra synth options]
    local out=$1 studies=$2 seed=$3 families=$4
    shift 4
    [ -f "$out/labels.csv" ] ||
        $DICOMNODE synth "$out" --studies "$studies" --seed "$seed" --modalities dbt \
            --families "$families" --variety "$@"
}

# Stage A: the whole model from INIT (its architecture comes with it), the paper's loss plus
# the SEG mask loss, shift/resize and intensity augmentation. Stage B: the local network on
# crops centred on the lesions (as make_weights.sh stage 5); with MASK_WEIGHT=0 there is no
# stage B and stage A's best is the model.
labels_only() { awk -v w="$MASK_WEIGHT" 'BEGIN { exit !(w + 0 == 0) }'; }

stage_a() {  # DATA OUT MASK_WEIGHT LR
    $DICOMNODE train --images "$1" --labels "$1/labels.csv" --modality dbt \
        --split "$SPLIT" --init "$INIT" --device "$DEVICE" --no-progress \
        --batch-size 4 --lr "$4" --patience 6 --epochs "$EPOCHS" --augment-px 24 \
        --augment-intensity "$INTENSITY" --mask-weight "$3" --out "$2/a" \
        ${WHOLE[@]+"${WHOLE[@]}"} ${WHOLE[@]+--normal-slices "$NORMAL_SLICES"}
}

train_dbt() {  # DATA OUT -> prints the trained checkpoint
    local data=$1 out=$2
    if labels_only; then  # fine-tuning from labels alone, at the labels-only rate
        [ -f "$out/a/best.pt" ] || stage_a "$data" "$out" 0 "$ADAPT_LR" >&2
        echo "$out/a/best.pt"
        return
    fi
    [ -f "$out/a/best.pt" ] || stage_a "$data" "$out" "$MASK_WEIGHT" 3e-4 >&2
    [ -f "$out/b/best.pt" ] ||
        $DICOMNODE train --images "$data" --labels "$data/labels.csv" --modality dbt \
            --split "$SPLIT" --init "$out/a/best.pt" --device "$DEVICE" --no-progress \
            --lesion-crops --batch-size 16 --lr 1e-4 --patience 6 --epochs "$LOCAL_EPOCHS" \
            --out "$out/b" ${WHOLE[@]+"${WHOLE[@]}"} >&2
    echo "$out/b/best.pt"
}

merge_labels() {  # DIR PART...: DIR/labels.csv of the images of every DIR/PART (synth outputs)
    local dir=$1 part
    shift
    [ -f "$dir/labels.csv" ] && return
    for part in "$@"; do [ -f "$dir/$part/labels.csv" ] || return 0; done  # nothing made
    head -n 1 "$dir/$1/labels.csv" > "$dir/labels.csv.tmp"
    for part in "$@"; do tail -n +2 "$dir/$part/labels.csv" >> "$dir/labels.csv.tmp"; done
    mv "$dir/labels.csv.tmp" "$dir/labels.csv"
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

family_index() {  # FAMILY -> its place in ALL_FAMILIES
    local i
    for i in "${!ALL_FAMILIES[@]}"; do
        [ "${ALL_FAMILIES[$i]}" = "$1" ] && { echo "$i"; return; }
    done
    echo "generalise.sh: unknown family $1; use ${ALL_FAMILIES[*]}" >&2
    exit 2
}

heldout_of() {  # FAMILY -> its held-out phantoms, made once for every part below
    local k
    k=$(family_index "$1")
    synth "$WORK/heldout_$1" "$HELDOUT" $((95000 + 100 * k)) "$1" >&2
    echo "$WORK/heldout_$1"
}

builtin_on() {  # FAMILY HELDOUT: the shipped weights (trained on powerlaw alone) on it
    [ -f "$WORK/builtin_on_$1/report.md" ] ||
        evaluate "$HERE/dbt.pt" "$2" "$WORK/builtin_on_$1"
}

if [ "${SKIP_LOFO:-0}" != 1 ]; then
    for left in "${LEAVE_OUT[@]}"; do
        k=$(family_index "$left")
        others=$(except "$left")
        run="$WORK/lofo_$left"
        synth "$run/train" "$STUDIES" $((SEED_BASE + 100 * k)) "$others"
        heldout=$(heldout_of "$left")
        synth "$run/heldout_seen" "$HELDOUT" $((96000 + 100 * k)) "$others"
        model=$(train_dbt "$run/train" "$run")
        evaluate "$model" "$run/heldout_seen" "$run/report_seen"
        evaluate "$model" "$heldout" "$run/report_left_out"
        builtin_on "$left" "$heldout"
    done
fi

if [ "${SKIP_ADAPT:-0}" != 1 ]; then
    for family in "${LEAVE_OUT[@]}"; do
        k=$(family_index "$family")
        run="$WORK/adapt_$family"
        synth "$run/train" "$STUDIES" $((SEED_BASE + 500 + 100 * k)) "$family"
        heldout=$(heldout_of "$family")
        [ -f "$run/a/best.pt" ] || stage_a "$run/train" "$run" 0 "$ADAPT_LR"
        evaluate "$run/a/best.pt" "$heldout" "$run/report"
        builtin_on "$family" "$heldout"
    done
fi

if [ "${SKIP_ALL:-0}" != 1 ]; then
    run="$WORK/all"
    if [ "$FULL_TRAIN" -gt 0 ]; then  # small and full-size phantoms, one training set
        synth "$run/train/small" "$STUDIES" $((SEED_BASE + 1000)) all
        synth "$run/train/full" "$FULL_TRAIN" $((SEED_BASE + 2000)) all --size full
        merge_labels "$run/train" small full
        WHOLE=(--whole-breast)
    else
        synth "$run/train" "$STUDIES" $((SEED_BASE + 1000)) all
    fi
    model=$(train_dbt "$run/train" "$run")
    synth "$run/heldout" "$HELDOUT" 97000 all
    evaluate "$model" "$run/heldout" "$run/report_small"
    if [ "$FULL_HELDOUT" -gt 0 ]; then
        synth "$run/heldout_full" "$FULL_HELDOUT" 98000 all --size full
        evaluate "$model" "$run/heldout_full" "$run/report_full"
    fi
fi
