"""What a smooth bias field does to the demo model's scores and maps, and whether N4 in the preparation undoes it.

    python benchmarks/bias_field_check.py SCAN BRAIN_LABELS OUT [--strength 0.15] [--model demo]

Writes SCAN as it is and multiplied by a linear left-right field (1 +- strength over +-70 mm of world x,
:func:`medflowad.data.painting.linear_bias_field`),
scores both with the model, then prepares both with and without N4 bias-field correction
(``medflowad prepare --n4 / --no-n4``). Prints each map's mean over the brain on each side (x > 30 mm and
x < -30 mm) for the plain and the biased copy, the scan scores, and the ratio of the prepared images'
median brain intensity between the two sides, biased over plain (1.0: the field is gone). BRAIN_LABELS is
a label image on SCAN's grid, brain where > 0 (IXI's DLMUSE). About 1.5 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np

from medflowad.data.painting import bias_scan_file, world_x

MAPS = ("anomaly", "last_scale", "normative", "anomaly_mask")


def side_ratio(prepared: Path) -> float:
    """Median brain intensity at x > 30 mm over that at x < -30 mm of a prepared scan."""
    image = nib.load(prepared / "standard.nii.gz")
    values = np.asarray(image.dataobj, dtype=np.float64)
    brain = np.asarray(nib.load(prepared / "standard_brain_mask.nii.gz").dataobj) > 0
    x = world_x(image.shape, image.affine)
    return float(np.median(values[brain & (x > 30)]) / np.median(values[brain & (x < -30)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scan", type=Path)
    parser.add_argument("brain_labels", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--strength", type=float, default=0.15)
    parser.add_argument("--model", default="demo")
    args = parser.parse_args()
    scans = args.out / "scans"
    scans.mkdir(parents=True, exist_ok=True)
    bias_scan_file(args.scan, scans / "biased.nii.gz", args.strength)
    bias_scan_file(args.scan, scans / "plain.nii.gz", 0.0)  # the same values, written the same way
    source = nib.load(args.scan)
    x = world_x(source.shape, source.affine)
    subprocess.run(["medflowad", "score", str(scans), "--model", args.model, "--out", str(args.out / "score")],
                   check=True)
    brain = np.asarray(nib.load(args.brain_labels).dataobj) > 0
    sides = {"x > 30 mm": brain & (x > 30), "x < -30 mm": brain & (x < -30)}
    for map_name in MAPS:
        maps = {n: np.asarray(nib.load(args.out / "score" / f"{n}_{map_name}.nii.gz").dataobj, dtype=np.float64)
                for n in ("plain", "biased")}
        spread = maps["plain"][brain].std()
        for side, where in sides.items():
            print(f"{map_name:12s} {side}: plain {maps['plain'][where].mean():.4f}, biased "
                  f"{maps['biased'][where].mean():.4f} (healthy spread over the brain {spread:.4f})")
    with open(args.out / "score" / "scores.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            print(f"{row['scan_id']}: llr {row['llr']}, last_scale {row['last_scale']}, "
                  f"intensity_normative {row['intensity_normative']}")
    for n4 in ("--no-n4", "--n4"):
        prepared = args.out / f"prepared{n4.replace('--', '_')}"
        subprocess.run(["medflowad", "prepare", str(scans), "-c", args.model, n4, "--out", str(prepared)], check=True)
        ratio = side_ratio(prepared / "biased") / side_ratio(prepared / "plain")
        print(f"prepared {n4}: side intensity ratio, biased over plain {ratio:.3f}")


if __name__ == "__main__":
    main()
