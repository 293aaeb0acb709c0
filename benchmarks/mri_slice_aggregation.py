"""Slice AUROC on the LGG test patients when a slice's score is a local peak of its map instead of its sum.

    MEDFLOWAD_DATA=/path/to/data python benchmarks/mri_slice_aggregation.py runs/bench_mri_v5/flair_outlier

A lesion covers a small part of a slice, so its anomaly may show more in the map's highest values than
in the whole-slice sum, which also carries the anatomy's variation. For each map (llr, its per-scale
shares, last_scale, the normalised image as the intensity baseline) this prints the AUROC of the
whole-slice sum and of the maximum, mean of the top 1 % and mean of the top 5 % of the foreground
values, on the raw map and after a 5 x 5 mean filter (maps without a whole-slice score, the per-scale
shares and the image, are summed over the foreground). Same slices and labels as ``medflowad bench mri``
(the 28 test patients of configs/lgg_flair_split.tsv, every scored slice), so the sum of ``llr``
reproduces the bench's slice AUROC.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np
import torch
from data_root import data_root
from scipy.ndimage import uniform_filter
from sklearn.metrics import roc_auc_score

from medflowad.bench.mri import LESION_MASKS, read_split
from medflowad.mri.analysis import scale_map_names
from medflowad.mri.model import analyse, load_mri_model
from medflowad.prep import prepare

PEAKS = {"max": 0.0, "top1%": 0.01, "top5%": 0.05}


def peak(values: np.ndarray, fraction: float) -> float:
    """Mean of the highest ceil(fraction * n) values (the maximum for fraction 0); NaN when empty."""
    if values.size == 0:
        return float("nan")
    k = max(1, math.ceil(fraction * values.size))
    return float(np.partition(values, values.size - k)[values.size - k:].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="MRI model folder, e.g. BENCH/flair_outlier")
    parser.add_argument("--data", default=str(data_root()))
    parser.add_argument("--split", default=None, help="patient split TSV (default: the bench's)")
    args = parser.parse_args()
    lgg = Path(args.data) / "medical" / "lgg_flair128"
    if not lgg.is_dir():
        raise SystemExit(f"{lgg}: no such folder (set MEDFLOWAD_DATA or --data)")
    torch.set_num_threads(os.cpu_count() or 1)
    model = load_mri_model(args.model, "cpu")
    names = ("llr", *scale_map_names(model.config.model.levels), "last_scale", "intensity")
    scores: dict[str, list[float]] = {}
    labels: list[bool] = []
    for patient in read_split(args.split)["test"]:
        prepared = prepare(lgg / f"{patient}_flair.nii.gz", model.config.preprocessing, LESION_MASKS)
        analysis = analyse(model, prepared)
        for z in np.nonzero(prepared.keep)[0]:
            labels.append(bool(prepared.lesion_slices[z]))
            foreground = prepared.foreground[z]
            for name in names:
                whole = analysis.slice_scores.get(name)  # the bench's whole-slice score where there is one
                total = float(whole[z]) if whole is not None else float(analysis.maps[name][z][foreground].sum())
                scores.setdefault(f"{name} sum", []).append(total)
                for smooth in (1, 5):
                    m = analysis.maps[name][z]
                    m = uniform_filter(m, size=smooth) if smooth > 1 else m
                    for label, fraction in PEAKS.items():
                        scores.setdefault(f"{name} {label}" + (f" ({smooth}x{smooth} mean)" if smooth > 1 else ""),
                                          []).append(peak(m[foreground], fraction))
    y = np.array(labels)
    print(f"{args.model}: {len(y)} test slices, {int(y.sum())} with lesion")
    print("| slice score | AUROC |\n|---|---|")
    for key, values in scores.items():
        print(f"| {key} | {roc_auc_score(y, np.array(values)):.3f} |")


if __name__ == "__main__":
    main()
