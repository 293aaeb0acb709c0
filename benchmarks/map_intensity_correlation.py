"""How much a scored scan's maps follow the image's own intensity, inside the brain and outside its lesions.

    python benchmarks/map_intensity_correlation.py SCORE_DIR SCAN BRAIN_LABELS [LESION_MASK]

SCORE_DIR is a ``medflowad score`` output folder holding SCAN's maps; BRAIN_LABELS a label image on SCAN's
grid (brain where > 0, e.g. IXI's DLMUSE); LESION_MASK a painted lesion mask. Prints, per map, the Spearman
correlation of the map with the intensity and with its 9-voxel local mean over the brain (lesion left out),
and the map's mean inside the lesion against healthy brain in units of the healthy spread.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("score_dir", type=Path)
    parser.add_argument("scan", type=Path)
    parser.add_argument("brain_labels", type=Path)
    parser.add_argument("lesion_mask", type=Path, nargs="?")
    args = parser.parse_args()
    image = np.asarray(nib.load(args.scan).dataobj, dtype=np.float64)
    brain = np.asarray(nib.load(args.brain_labels).dataobj) > 0
    lesion = (np.asarray(nib.load(args.lesion_mask).dataobj) > 0 if args.lesion_mask
              else np.zeros(image.shape, dtype=bool))
    weight = ndimage.uniform_filter(brain.astype(float), 9)
    local_mean = ndimage.uniform_filter(np.where(brain, image, 0.0), 9) / np.maximum(weight, 1e-6)
    scan_id = args.scan.name.removesuffix(".gz").removesuffix(".nii")
    for path in sorted(args.score_dir.glob(f"{scan_id}_*.nii.gz")):
        values = np.asarray(nib.load(path).dataobj, dtype=np.float64)
        if values.shape != image.shape or values.dtype == bool or path.name.endswith("_mask.nii.gz"):
            continue
        healthy = brain & ~lesion & np.isfinite(values)
        rho = stats.spearmanr(values[healthy], image[healthy])[0]
        rho_local = stats.spearmanr(values[healthy], local_mean[healthy])[0]
        line = f"{path.name}: spearman with intensity {rho:.3f}, with its local mean {rho_local:.3f}"
        if lesion.any():
            spread = values[healthy].std()
            shift = (np.nanmean(values[lesion]) - values[healthy].mean()) / spread
            line += f"; lesion mean {shift:+.2f} healthy spreads from the healthy brain's mean"
        print(line)


if __name__ == "__main__":
    main()
