#!/usr/bin/env bash
# Spread of the outlier-loss FLAIR model over training seeds, with the general model and pool of a finished
# `medflowad bench mri` run held fixed. The 12 train patients held apart for calibration are those of the bench
# (--calibration-seed 0), so a seed changes the training randomness only, and the calibration patients stay
# out of the bench's pool as they must. CALIBRATION_SEED=same lets each seed draw its own calibration
# patients (and so its own training patients), as this script did before 2026-11-29.
#   MEDFLOWAD_DATA=/path/to/data bash benchmarks/mri_outlier_seeds.sh BENCH_DIR SEED [SEED ...]
# Writes BENCH_DIR/seeds/flair_outlier_s<SEED>/ (model) and BENCH_DIR/seeds/eval_outlier_s<SEED>/ (metrics of
# the 28 test patients); seed 0 with the bench's defaults is the bench's own flair_outlier model.
set -euo pipefail
bench=${1:?usage: mri_outlier_seeds.sh BENCH_DIR SEED [SEED ...]}
shift
[ $# -gt 0 ] || { echo "give at least one seed" >&2; exit 2; }
data=${MEDFLOWAD_DATA:?set MEDFLOWAD_DATA}
here=$(cd "$(dirname "$0")" && pwd)
lgg="$data/medical/lgg_flair128"
for needed in "$bench/pool/manifest.json" "$bench/flair/general/model.safetensors" "$bench/flair_outlier/mri.yaml"; do
    [ -f "$needed" ] || { echo "$needed: missing; run medflowad bench mri -o $bench first" >&2; exit 2; }
done
data_args=() scan_args=()
while IFS=$'\t' read -r patient split; do
    case "$split" in
        train) data_args+=(--data "$lgg/${patient}_flair.nii.gz") ;;
        test) scan_args+=(--scans "$lgg/${patient}_flair.nii.gz") ;;
    esac
done < <(grep -v '^#' "$here/../configs/lgg_flair_split.tsv" | tail -n +2)
calibration_args=(--calibration-seed "${CALIBRATION_SEED:-0}")
[ "${CALIBRATION_SEED:-0}" = same ] && calibration_args=()
for seed in "$@"; do
    model="$bench/seeds/flair_outlier_s$seed"
    # the bench's own settings, outlier loss and step count included (its preparation on the native grid, not
    # the preset's standard space)
    medflowad train --modality flair -c "$bench/flair_outlier/mri.yaml" "${data_args[@]}" --lesion-masks _flair=_mask \
        --pool "$bench/pool" --general-model "$bench/flair/general" --seed "$seed" \
        "${calibration_args[@]}" -o "$model" -q
    medflowad evaluate -m "$model" "${scan_args[@]}" --lesion-masks _flair=_mask -o "$bench/seeds/eval_outlier_s$seed" -q
done
