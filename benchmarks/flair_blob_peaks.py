"""Where ``intensity_scan_z`` (or a FLAIR model's map) peaks when one lesion is painted into a healthy 1 mm FLAIR
head.

    MEDFLOWAD_DATA=/path/to/data python benchmarks/flair_blob_peaks.py [--seeds 6] [--diameter 12] \
        [--times-max 2.5] [--sigma 0] [--clipped] [--model runs/bench_mri_v13/flair_outlier [--map llr]]

The healthy head is Kirby21's FLAIR (``medical/nifti_samples``; no lesion; with --times-max 2.5 it chose to
read the image unclipped, docs/results.md). For each seed, one lesion brighter than white matter is painted
inside deepbet's brain mask (medflowad.data.painting; with --times-max, a blob of that many times the brain's
maximum at the same place); the scan is prepared as protocol B prepares LGG (``mri_cpu``, native grid,
deepbet), the map computed as ``evaluate`` computes it and brought back to the 1 mm grid, and the distance
from its peak to the lesion is reported (PROTOCOL's "peak within 4 mm"), with the map's maximum inside and
outside the lesion. With ``--model`` the map is that model's (``evaluate``'s maps: llr, llr_c2, intensity, ...)
on its scored slices, the scan prepared as the model says.
"""

import argparse
import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from data_root import data_root
from t1_blob_peaks import blob_peaks  # benchmarks/, beside this script

from medflowad.data.scans import to_native
from medflowad.mri.analysis import (
    SCAN_Z_SIGMA,
    intensity_map,
    intensity_scan_z,
    smoothed_within,
    unclipped_intensity_map,
)
from medflowad.mri.config import load_mri_config
from medflowad.mri.model import analyse, load_mri_model
from medflowad.prep import prepare

KIRBY21_FLAIR = "nifti_samples/kirby21_113_visit2/113-02-FLAIR_processed_reg.nii.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--diameter", type=float, default=12.0)
    parser.add_argument("--times-max", type=float, help="fill the lesion with this multiple of the brain's maximum")
    parser.add_argument("--sigma", type=float, default=SCAN_Z_SIGMA, help="smoothing (model-grid pixels; 0: none)")
    parser.add_argument("--clipped", action="store_true", help="read the image clipped at 1, as the model sees it "
                        "(the map before 2026-12-06), instead of the unclipped one")
    parser.add_argument("--model", type=Path, help="a FLAIR model folder: its --map instead of the scan z")
    parser.add_argument("--map", default="llr", help="with --model: which of its maps (default llr)")
    args = parser.parse_args()
    medical = data_root() / "medical"
    model = load_mri_model(args.model, "cpu") if args.model else None
    config = model.config.preprocessing if model else dataclasses.replace(
        load_mri_config("mri_cpu").preprocessing.overridden(space="native", brain="deepbet"), brain_volume_ml=None)
    healthy = medical / KIRBY21_FLAIR
    source = nib.load(str(healthy))
    brain = prepare(healthy, config).brain > 0.5

    def map_on_scan_grid(path: Path) -> np.ndarray:
        prepared = prepare(path, config)
        region = prepared.scored
        if model:
            return to_native(analyse(model, prepared).maps[args.map] * region, prepared)
        image = intensity_map(prepared) if args.clipped else unclipped_intensity_map(prepared)
        scan_z = intensity_scan_z(image, region)
        return to_native(smoothed_within(scan_z, region, args.sigma) if args.sigma else scan_z, prepared)

    rows = []
    for row in blob_peaks(source, brain, args.seeds, args.diameter, args.times_max, map_on_scan_grid):
        rows.append(row)
        print(json.dumps(row), flush=True)
    within = sum(r["peak_distance_mm"] <= 4.0 for r in rows)
    print(f"peak within 4 mm of the lesion: {within} of {len(rows)}")


if __name__ == "__main__":
    main()
