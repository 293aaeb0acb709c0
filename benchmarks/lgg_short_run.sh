#!/usr/bin/env bash
# Protocol B short run (PROTOCOL.md): LGG FLAIR lesion detection with the fixed split in configs/lgg_flair_split.tsv.
#   MEDFLOWAD_DATA=/path/to/data bash benchmarks/lgg_short_run.sh OUT_DIR [GENERAL_STEPS] [IN_STEPS]
# General pool: brain tumour MRI 2D (Training split, all classes), head CT, NIfTI samples. Nothing from
# the test patients. Prints the evaluation table of the 28 test patients.
set -euo pipefail
out=${1:?usage: lgg_short_run.sh OUT_DIR [GENERAL_STEPS] [IN_STEPS]}
general_steps=${2:-600}
in_steps=${3:-300}
data=${MEDFLOWAD_DATA:?set MEDFLOWAD_DATA}
here=$(cd "$(dirname "$0")" && pwd)
lgg="$data/medical/lgg_flair128"
mkdir -p "$out"
mapfile -t train < <(awk -F'\t' -v d="$lgg" '$2=="train"{print d"/"$1"_flair.nii.gz"}' "$here/../configs/lgg_flair_split.tsv")
mapfile -t test < <(awk -F'\t' -v d="$lgg" '$2=="test"{print d"/"$1"_flair.nii.gz"}' "$here/../configs/lgg_flair_split.tsv")
[ -f "$out/pool/manifest.json" ] || medflowad pool build "$data/medical/brain_tumor_mri_2d.zip::Training" \
    "$data/medical/head_ct" "$data/medical/nifti_samples" -o "$out/pool"
data_args=()
for f in "${train[@]}"; do data_args+=(--data "$f"); done
medflowad train --modality flair "${data_args[@]}" --lesion-masks _flair=_mask --pool "$out/pool" \
    --general-steps "$general_steps" --steps "$in_steps" -o "$out/model"
scan_args=()
for f in "${test[@]}"; do scan_args+=(--scans "$f"); done
medflowad evaluate -m "$out/model" "${scan_args[@]}" --lesion-masks _flair=_mask -o "$out/eval"
