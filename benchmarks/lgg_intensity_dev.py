"""Development split of protocol B: which model-free FLAIR map finds LGG lesions best inside the brain.

    MEDFLOWAD_DATA=/path/to/data python benchmarks/lgg_intensity_dev.py -o runs/lgg_intensity_dev
    MEDFLOWAD_DATA=/path/to/data python benchmarks/lgg_intensity_dev.py -o runs/lgg_intensity_test --split test

Why: on LGG every flow map loses to the plain FLAIR intensity on the same brain voxels (docs/results.md,
protocol B), and the per-location healthy range, which wins in standard space, loses on LGG's native grids.
Before more models, this measures what the intensity itself can do when read per scan: the prepared image
is normalised by percentiles of each brain, so a large bright tumour compresses its own scan's scale and
scans are not on one footing when the voxels of all patients are pooled. Variants on the same voxels:

- ``intensity``: the prepared image (the protocol's intensity baseline, 0-1);
- ``scan_z``: signed robust z against the scan's own scored brain voxels, (I - median) / (1.4826 MAD);
  the median and MAD of a brain are those of its healthy tissue while the lesion is under half of it;
- ``scan_z_unclipped``: the same of the image before the preparation's clip at 1 (the product's
  ``intensity_scan_z`` once smoothed): voxels above the upper percentile keep their brightness;
- each of those smoothed in-plane by a Gaussian of ``--sigmas`` pixels of the 64-pixel model grid (lesions are
  large: noise and single bright pixels at the brain's edge fall, a lesion's core stays);
- ``scan_z_unclipped_s<sigma>_filled``: that map with its enclosed dark places raised to the level of the ring
  around them (``filled_enclosed``): many LGG tumours have a dark core inside a bright rim, which the scan z
  misses (docs/results.md).

Every map is computed on the model grid and brought to the native grid as the product does (bilinear), and
measured over the native voxels of scored slices' brain, pooled over patients: voxel AUPRC, and Dice at the
threshold that flags 5 % of the *other* patients' healthy voxels (leave-one-patient-out, lesions dilated by
2 pixels left out of "healthy"), as protocol B's Dice at 5 % healthy FPR. ``--split train`` (default) is the
development split: the 60 patients of the shipped split's train part; ``--split test`` is measured once per
setting reported. Each run also stores, per map, the value that 5 % of its healthy voxels exceed
(``healthy_threshold_5%``); ``--thresholds runs/lgg_intensity_dev/metrics.json`` measures Dice at the
development split's thresholds, as a model calibrated on those patients would flag.

Slice level (``slice``): each slice's score is an aggregate of a map over the slice's scored brain pixels on
the model grid (``p99``: 99th percentile, as protocol B's intensity slice score; ``max``; ``top16``/``top64``: mean
of the 16/64 highest pixels; ``area3``: pixels above 3), measured by AUROC and by AUROC within position eighths
(pairs of slices from the same eighth of the scan's scored slices only, as ``evaluate``): which slice score would
flag scans. ``:z3``: averaged with the neighbouring scored slices. ``product:intensity_scan_z`` is the product's
slice score of that name (``analysis.scan_z_area``); it needs ``--sigmas`` to include 1.5. Its values and the
baseline's, slice by slice, go to ``slices.csv`` (``benchmarks/lgg_slice_profiles.py`` draws them).
"""

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from data_root import data_root
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from medflowad.bench.mri import LESION_MASKS, read_split
from medflowad.data.readers import load_scan
from medflowad.data.scans import to_native
from medflowad.metrics import stratified_auroc
from medflowad.mri.analysis import (
    intensity_map,
    intensity_scan_z,
    mean_with_neighbours,
    scan_z_area,
    smoothed_within,
    unclipped_intensity_map,
)
from medflowad.mri.config import load_mri_config
from medflowad.mri.evaluate import dice, healthy_voxels, position_strata, slice_centrality
from medflowad.prep.stage import companion_path, mask_on_scan, prepare_volume

HEALTHY_FPR = 0.05
SLICE_MAPS = ("intensity", "scan_z_unclipped_s1.5", "scan_z_unclipped_s1.5_filled")  # baseline, product, candidate


def flags_at_others_threshold(scores: np.ndarray, healthy: np.ndarray, patient: np.ndarray) -> np.ndarray:
    """Each patient's voxels above the value that 5 % of the *other* patients' healthy voxels exceed."""
    flagged = np.zeros(scores.size, dtype=bool)
    for i in np.unique(patient):
        own = patient == i
        flagged[own] = scores[own] > np.quantile(scores[healthy & ~own], 1 - HEALTHY_FPR)
    return flagged


def voxel_metrics(scores: np.ndarray, truth: np.ndarray, healthy: np.ndarray,
                  flagged: np.ndarray) -> tuple[float, float, float]:
    """Pooled voxel AUPRC; Dice of ``flagged`` (:func:`flags_at_others_threshold`); and the value 5 % of every
    patient's healthy voxels exceed."""
    return (float(average_precision_score(truth, scores)), dice(flagged, truth),
            float(np.quantile(scores[healthy], 1 - HEALTHY_FPR)))


def slice_aggregates(image: np.ndarray, region: np.ndarray) -> dict[str, np.ndarray]:
    """(Z,) per aggregate of ``image`` over each slice's ``region`` pixels; NaN where a slice has none."""
    out = {name: np.full(len(image), np.nan) for name in ("p99", "max", "top16", "top64", "top128", "top256",
                                                          "area1.5", "area2", "area2.5", "area3")}
    for z in range(len(image)):
        values = np.sort(image[z][region[z]])[::-1]
        if values.size:
            out["p99"][z] = np.percentile(values, 99)
            out["max"][z] = values[0]
            out["top16"][z] = values[:16].mean()
            out["top64"][z] = values[:64].mean()
            out["top128"][z] = values[:128].mean()
            out["top256"][z] = values[:256].mean()
            out["area1.5"][z] = float((values > 1.5).sum())
            out["area2"][z] = float((values > 2).sum())
            out["area2.5"][z] = float((values > 2.5).sum())
            out["area3"][z] = float((values > 3).sum())
    return out


def filled_enclosed(image: np.ndarray, start: float = 1.0, step: float = 0.25) -> np.ndarray:
    """(Z, S, S) grey-level hole filling per slice: a pixel enclosed in-plane by a ring of pixels all >= t gets
    at least t (t from ``start`` in ``step`` s), so a tumour's dark core inside its bright rim takes the rim's
    level, while dark places that open to the brain's outside (sulci, and the outside itself) keep theirs."""
    out = image.copy()
    for z in range(len(image)):
        for level in np.arange(start, image[z].max() + step, step):
            above = image[z] >= level
            holes = ndimage.binary_fill_holes(above) & ~above
            out[z][holes] = np.maximum(out[z][holes], level)
    return out


def scan_maps(prepared, sigmas: list[float]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    region = prepared.scored
    image = intensity_map(prepared)
    base = {"intensity": image, "scan_z": intensity_scan_z(image, region),
            "scan_z_unclipped": intensity_scan_z(unclipped_intensity_map(prepared), region)}
    maps = dict(base)
    for name, values in base.items():
        for sigma in sigmas:
            maps[f"{name}_s{sigma:g}"] = smoothed_within(values, region, sigma)
            if name == "scan_z_unclipped":
                maps[f"{name}_s{sigma:g}_filled"] = filled_enclosed(maps[f"{name}_s{sigma:g}"])
    return region, maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.7, 1.0, 1.5, 2.0])
    parser.add_argument("--config", default="mri_cpu")
    parser.add_argument("--slice-scores", nargs="+", metavar="MAP:AGGREGATE[:z3]",
                        help="report only these slice scores (e.g. on the test split, the chosen one and the baseline)")
    parser.add_argument("--thresholds", type=Path, help="metrics.json of another run: Dice at its healthy thresholds")
    args = parser.parse_args()
    lgg = data_root() / "medical" / "lgg_flair128"
    patients = read_split(None)[args.split]
    # The protocol-B preparation: deepbet brain extraction on each scan's own grid.
    config = dataclasses.replace(load_mri_config(args.config).preprocessing.overridden(space="native", brain="deepbet"),
                                 brain_volume_ml=None)  # LGG's voxel sizes are nominal

    values: dict[str, list[np.ndarray]] = {}
    labels, healthy_of, patient_of = [], [], []
    slice_values: dict[str, list[np.ndarray]] = {}
    slice_labels, centrality, slice_rows = [], [], []
    for i, patient in enumerate(patients):
        path = lgg / f"{patient}_flair.nii.gz"
        lesion_file = load_scan(companion_path(path, LESION_MASKS))
        prepared = prepare_volume(load_scan(path), config, lesion_mask=lesion_file)
        lesion = mask_on_scan(lesion_file, prepared.native)
        region, maps = scan_maps(prepared, args.sigmas)
        native_region = to_native(region.astype(np.float32), prepared, mode="nearest") > 0.5
        truth = lesion[native_region]
        healthy = healthy_voxels(lesion)[native_region]  # the lesion and 2 voxels around it left out
        for name, image in maps.items():
            values.setdefault(name, []).append(to_native(image, prepared)[native_region])
        keep = prepared.keep
        for map_name in SLICE_MAPS:
            if map_name in maps:
                for agg, per_slice in slice_aggregates(maps[map_name], region).items():
                    slice_values.setdefault(f"{map_name}:{agg}", []).append(per_slice[keep])
                    # with the neighbouring slices: lesions are 3D, a slice at a lesion's edge shows little of it
                    slice_values.setdefault(f"{map_name}:{agg}:z3", []).append(mean_with_neighbours(per_slice[keep]))
        # the product's slice score (``score`` flags FLAIR scans by it): must rank as area2:z3 of the scan z
        slice_values.setdefault("product:intensity_scan_z", []).append(
            scan_z_area(maps["scan_z_unclipped_s1.5"], keep)[keep])
        slice_labels.append(prepared.lesion_slices[keep])
        for z, chosen, baseline in zip(np.nonzero(keep)[0], slice_values["product:intensity_scan_z"][-1],
                                       slice_values["intensity:p99"][-1], strict=True):
            slice_rows.append(f"{patient},{z},{int(prepared.lesion_slices[z])},{chosen:.6g},{baseline:.6g}")
        centrality.append(slice_centrality(keep)[keep])
        labels.append(truth)
        healthy_of.append(healthy)
        patient_of.append(np.full(truth.size, i, dtype=np.int32))
        print(f"{i + 1}/{len(patients)} {patient}: {truth.size} voxels, {int(truth.sum())} lesion", flush=True)

    truth = np.concatenate(labels)
    healthy = np.concatenate(healthy_of)
    patient = np.concatenate(patient_of)
    result = {"split": args.split, "patients": len(patients), "voxels": int(truth.size),
              "lesion_voxels": int(truth.sum()), "voxel_auprc": {}, "dice_at_5%_healthy_fpr": {},
              "healthy_threshold_5%": {}}
    given = json.loads(args.thresholds.read_text())["healthy_threshold_5%"] if args.thresholds else {}
    if given:
        result["thresholds_from"], result["dice_at_given_threshold"] = str(args.thresholds), {}
    for name, parts in values.items():
        scores = np.concatenate(parts)
        auprc, dice_lopo, threshold = voxel_metrics(scores, truth, healthy,
                                                    flags_at_others_threshold(scores, healthy, patient))
        result["voxel_auprc"][name] = auprc
        result["dice_at_5%_healthy_fpr"][name] = dice_lopo
        result["healthy_threshold_5%"][name] = threshold
        if name in given:
            result["dice_at_given_threshold"][name] = dice(scores > given[name], truth)
    lesion_slice = np.concatenate(slice_labels).astype(bool)
    stratum = position_strata(np.concatenate(centrality))
    result["slices"], result["lesion_slices"], result["slice"] = int(lesion_slice.size), int(lesion_slice.sum()), {}
    for name, parts in slice_values.items():
        if args.slice_scores and name not in args.slice_scores:
            continue
        scores = np.nan_to_num(np.concatenate(parts), nan=-np.inf)
        result["slice"][name] = {"auroc": float(roc_auc_score(lesion_slice, scores)),
                                 "auroc_within_position": stratified_auroc(lesion_slice, scores, stratum)}
    args.out.mkdir(parents=True, exist_ok=True)
    header = "patient,slice,lesion,intensity_scan_z,intensity_p99"
    (args.out / "slices.csv").write_text("\n".join([header, *slice_rows]) + "\n")
    (args.out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
