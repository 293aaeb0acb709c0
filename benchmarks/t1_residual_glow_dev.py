"""Development split of protocol D: a Glow trained on healthy *normative residuals* instead of intensities.

    MEDFLOWAD_DATA=/path/to/data python benchmarks/t1_residual_glow_dev.py -o runs/t1_residual_dev [--folds 5]

Why: a Glow trained on healthy intensities does not find painted lesions (docs/results.md, protocol D): a
smooth bright blob is simpler than the tissue it replaces, so the likelihood does not drop where it sits. In
standard space every location has healthy statistics, so the image can be written as each voxel's robust
z-score against healthy heads at its place (medflowad.mri.normative.normative_map), where healthy anatomy
is removed and what remains is registration error, partial volume and noise. A Glow of those residual
images learns how healthy deviations look together (large at edges and sulci, structured), so a lesion's
large, smooth deviation should be unlikely under it wherever healthy deviations are small.

Same subjects and painted copies as benchmarks/t1_normative_dev.py (the five IXI training subjects, seeds
1000 + ...). Leaving one subject out at a time: the statistics come from the other four; each of those four
trains the residual Glow with *its* residuals taken against the other three (so training residuals are as
large as the ones measured later, not shrunk by the scan's own presence in the statistics). The residual z
is stored as uint8 ``128 + GAIN * z`` (clipped; 128 outside the brain) and the demo architecture trains on
it. Measured on the left-out subject's painted copies, pooled: voxel AUPRC inside the brain of the Glow's
negative log-likelihood map (all scales, and each scale) beside the signed z and the distance beyond the
healthy range on the same voxels, and Dice at 0.1 % voxel FPR on the left-out unpainted scans.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from data_root import data_root
from sklearn.metrics import average_precision_score
from t1_normative_dev import MASKS, development_copies  # benchmarks/, beside this script

from medflowad.bench.mri import read_split
from medflowad.data.natural import ImageSet
from medflowad.mri.analysis import intensity_map as intensity
from medflowad.mri.analysis import threshold_at_fpr
from medflowad.mri.calibration import healthy_parts
from medflowad.mri.config import load_mri_config
from medflowad.mri.evaluate import dice
from medflowad.mri.normative import beyond_healthy_range, fit_healthy_range, fit_normative, normative_map, slice_levels
from medflowad.mri.training import mri_run_config
from medflowad.prep import prepare
from medflowad.scores import likelihoods
from medflowad.storage import load_model
from medflowad.training.trainer import TrainData, train

GAIN = 16.0  # uint8 steps per healthy spread: +-3 spreads span 80..176, lesions beyond 8 spreads saturate


def statistics(scans: list) -> tuple[np.ndarray, ...]:
    fit = ([intensity(p) for p in scans], [healthy_parts(p)[1] for p in scans],
           [slice_levels(p, True) for p in scans], scans[0].num_slices, True)
    return (*fit_normative(*fit), *fit_healthy_range(*fit))


def residual(scan, centre: np.ndarray, spread: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(region (Z, S, S), signed z (Z, S, S)) of a scan against these statistics."""
    region = scan.scored
    return region, normative_map(intensity(scan), region, slice_levels(scan, True), centre, spread)


def encode(z: np.ndarray, region: np.ndarray) -> torch.Tensor:
    """uint8 (Z, 1, S, S): 128 + GAIN * z inside the region, 128 outside."""
    values = np.where(region, np.clip(np.rint(128 + GAIN * z), 0, 255), 128)
    return torch.from_numpy(values.astype(np.uint8))[:, None]


def spread_up(per_scale: list[np.ndarray], size: int) -> np.ndarray:
    """Sum of per-scale maps after nearest upsampling to ``size``, each per pixel of its location."""
    total = np.zeros((per_scale[0].shape[0], size, size))
    for m in per_scale:
        f = size // m.shape[-1]
        total += np.repeat(np.repeat(m, f, axis=-2), f, axis=-1) / f**2
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--folds", type=int, default=5, help="leave out only the first N subjects")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=5e-4)
    args = parser.parse_args()
    ixi = data_root() / "medical" / "ixi_t1_2mm"
    subjects = read_split(None, "ixi_t1_split.tsv")["train"]
    config = load_mri_config("mri_demo")
    painted_dir = args.out / "painted"
    healthy, painted = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, subject in enumerate(subjects):
            source = development_copies(ixi, subject, i, Path(tmp), painted_dir, args.copies)
            healthy[subject] = prepare(source, config.preprocessing)
            painted[subject] = [prepare(painted_dir / f"{subject}-painted{k}_t1.nii.gz", config.preprocessing, MASKS)
                                for k in range(1, args.copies + 1)]
    size = config.preprocessing.image_size
    names = ("glow_nll", *(f"glow_nll_scale{i + 1}" for i in range(config.model.levels)),
             "intensity_normative_signed", "intensity_beyond_healthy_range")
    voxel = {n: [] for n in names}
    healthy_values = {n: [] for n in names}
    truth, timings = [], []
    for subject in subjects[: args.folds]:
        others = [s for s in subjects if s != subject]
        centre, spread, low, high = statistics([healthy[s] for s in others])
        slices = []
        for t in others:  # each training subject's residuals against the remaining three
            c, s, _, _ = statistics([healthy[u] for u in others if u != t])
            region, z = residual(healthy[t], c, s)
            slices.append(encode(z, region)[healthy[t].keep])
        train_set = ImageSet(torch.cat(slices), torch.full((sum(len(s) for s in slices),), -1))
        run = mri_run_config(config, train_spec="(in memory)", steps=args.steps, lr=args.lr)
        started = time.perf_counter()
        train(run, args.out / "models" / subject, TrainData(train_set), show_progress=False)
        timings.append(time.perf_counter() - started)
        model, _ = load_model(args.out / "models" / subject, device="cpu")
        for label, scan in [(False, healthy[subject])] + [(True, p) for p in painted[subject]]:
            region, z = residual(scan, centre, spread)
            maps = np.zeros((len(names) - 2, scan.num_slices, size, size))
            keep = np.nonzero(scan.keep)[0]
            per_scale = likelihoods(model, encode(z, region)[keep], keep_maps=True).maps
            maps[0][keep] = spread_up([-m for m in per_scale], size)
            for i, m in enumerate(per_scale):
                maps[1 + i][keep] = spread_up([-m], size)
            values = {**{n: maps[i] for i, n in enumerate(names[:-2])},
                      "intensity_normative_signed": z,
                      "intensity_beyond_healthy_range": beyond_healthy_range(
                          intensity(scan), region, slice_levels(scan, True), low, high, spread)}
            target = voxel if label else healthy_values
            for n in names:
                target[n].append(values[n][region])
            if label:
                truth.append(scan.lesion[region] > 0.5)
        print(subject, {n: round(float(average_precision_score(np.concatenate(truth), np.concatenate(voxel[n]))), 3)
                        for n in names}, flush=True)
    labels = np.concatenate(truth)
    result = {"subjects_left_out": subjects[: args.folds], "copies": args.copies, "steps": args.steps, "lr": args.lr,
              "gain": GAIN, "voxels": int(labels.size), "lesion_voxels": int(labels.sum()),
              "training_seconds": timings,
              "voxel_auprc": {n: float(average_precision_score(labels, np.concatenate(voxel[n]))) for n in names},
              "dice_at_0.1%_voxel_fpr": {
                  n: dice(np.concatenate(voxel[n]) > threshold_at_fpr(np.concatenate(healthy_values[n]), 0.001), labels)
                  for n in names}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
