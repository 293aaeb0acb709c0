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
  large: noise and single bright pixels at the brain's edge fall, a lesion's core stays).

Every map is computed on the model grid and brought to the native grid as the product does (bilinear), and
measured over the native voxels of scored slices' brain, pooled over patients: voxel AUPRC, and Dice at the
threshold that flags 5 % of the *other* patients' healthy voxels (leave-one-patient-out, lesions dilated by
2 pixels left out of "healthy"), as protocol B's Dice at 5 % healthy FPR. ``--split train`` (default) is the
development split: the 60 patients of the shipped split's train part; ``--split test`` is measured once per
setting reported. Each run also stores, per map, the value that 5 % of its healthy voxels exceed
(``healthy_threshold_5%``); ``--thresholds runs/lgg_intensity_dev/metrics.json`` measures Dice at the
development split's thresholds, as a model calibrated on those patients would flag.
"""

import argparse
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score

from medflowad.bench.mri import LESION_MASKS, read_split
from medflowad.data.readers import load_scan
from medflowad.data.scans import to_native
from medflowad.mri.analysis import intensity_map, intensity_scan_z, smoothed_within, unclipped_intensity_map
from medflowad.mri.config import load_mri_config
from medflowad.mri.evaluate import dice
from medflowad.prep.stage import companion_path, mask_on_scan, prepare_volume

HEALTHY_FPR = 0.05


def scan_maps(prepared, sigmas: list[float]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    region = prepared.foreground & prepared.keep[:, None, None]
    image = intensity_map(prepared)
    base = {"intensity": image, "scan_z": intensity_scan_z(image, region),
            "scan_z_unclipped": intensity_scan_z(unclipped_intensity_map(prepared), region)}
    maps = dict(base)
    for name, values in base.items():
        for sigma in sigmas:
            maps[f"{name}_s{sigma:g}"] = smoothed_within(values, region, sigma)
    return region, maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.7, 1.0, 1.5, 2.0])
    parser.add_argument("--config", default="mri_cpu")
    parser.add_argument("--thresholds", type=Path, help="metrics.json of another run: Dice at its healthy thresholds")
    args = parser.parse_args()
    lgg = Path(os.path.expandvars(os.environ.get("MEDFLOWAD_DATA", "../shared/data"))) / "medical" / "lgg_flair128"
    patients = read_split(None)[args.split]
    # The protocol-B preparation: deepbet brain extraction on each scan's own grid.
    config = dataclasses.replace(load_mri_config(args.config).preprocessing.overridden(space="native", brain="deepbet"),
                                 brain_volume_ml=None)  # LGG's voxel sizes are nominal

    values: dict[str, list[np.ndarray]] = {}
    labels, healthy_of, patient_of = [], [], []
    for i, patient in enumerate(patients):
        path = lgg / f"{patient}_flair.nii.gz"
        lesion_file = load_scan(companion_path(path, LESION_MASKS))
        prepared = prepare_volume(load_scan(path), config, lesion_mask=lesion_file)
        lesion = mask_on_scan(lesion_file, prepared.native)
        region, maps = scan_maps(prepared, args.sigmas)
        native_region = to_native(region.astype(np.float32), prepared, mode="nearest") > 0.5
        truth = lesion[native_region]
        # "healthy" leaves out the lesion and 2 voxels around it, as the calibration does
        near_lesion = ndimage.binary_dilation(lesion, iterations=2)[native_region]
        for name, image in maps.items():
            values.setdefault(name, []).append(to_native(image, prepared)[native_region])
        labels.append(truth)
        healthy_of.append(~near_lesion)
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
        result["voxel_auprc"][name] = float(average_precision_score(truth, scores))
        flagged = np.zeros(truth.size, dtype=bool)
        for i in range(len(patients)):
            own = patient == i
            threshold = np.quantile(scores[healthy & ~own], 1 - HEALTHY_FPR)
            flagged[own] = scores[own] > threshold
        result["dice_at_5%_healthy_fpr"][name] = dice(flagged, truth)
        result["healthy_threshold_5%"][name] = float(np.quantile(scores[healthy], 1 - HEALTHY_FPR))
        if name in given:
            result["dice_at_given_threshold"][name] = dice(scores > given[name], truth)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
