"""Slice scores along the scan, lesion slices shaded: what the FLAIR scan score (``intensity_scan_z``) sees.

    python benchmarks/lgg_slice_profiles.py runs/lgg_slice_dev/slices.csv -o runs/lgg_slice_dev/profiles.png

Reads the ``slices.csv`` that ``benchmarks/lgg_intensity_dev.py`` writes and draws, for up to ``--patients``
patients (the first in the file, or those named), the product's slice score and protocol B's intensity slice
score (99th percentile of the slice's brain) against the slice index, each scaled to its patient's maximum,
with the slices that hold lesion shaded. A score that follows the shading is one that would flag the right
slices; one that follows the brain's size (high in mid-brain, low at the ends) is measuring position.
"""

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("slices", type=Path, help="slices.csv of benchmarks/lgg_intensity_dev.py")
    parser.add_argument("-o", "--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--patients", nargs="+", help="patients to draw (default: the first --count)")
    parser.add_argument("--count", type=int, default=6)
    args = parser.parse_args()
    rows: dict[str, list[dict]] = defaultdict(list)
    with open(args.slices) as f:
        for row in csv.DictReader(f):
            rows[row["patient"]].append(row)
    names = args.patients or list(rows)[: args.count]
    missing = [n for n in names if n not in rows]
    if missing:
        raise SystemExit(f"{args.slices}: no slices of {', '.join(missing)}")
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 1.7 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        z = np.array([int(r["slice"]) for r in rows[name]])
        lesion = np.array([r["lesion"] == "1" for r in rows[name]])
        for column, colour in (("intensity_scan_z", "#d62728"), ("intensity_p99", "#1f77b4")):
            values = np.array([float(r[column]) for r in rows[name]])
            ax.plot(z, values / max(values.max(), 1e-12), color=colour, marker=".", label=column)
        for k in z[lesion]:
            ax.axvspan(k - 0.5, k + 0.5, color="0.85", zorder=0)
        ax.set_ylabel(name.removeprefix("TCGA_"), fontsize=7)
        ax.set_yticks([])
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("slice (grey: holds lesion)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
