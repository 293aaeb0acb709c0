"""Would `score` call LGG patients' FLAIR scans unlike the healthy calibration heads? (protocol B, development split)

    MEDFLOWAD_DATA=/path/to/data python benchmarks/lgg_unlike_healthy.py -o runs/lgg_unlike_healthy

`unlike_healthy` (medflowad.mri.normative.BEYOND_SHARE) was set on T1 heads in standard space. On LGG the
calibration scans are patients themselves (their healthy parts: lesion-free slices, voxels away from the
lesion), prepared on their own grids, where a location is only roughly the same anatomy from scan to scan,
and tumours are large. This measures, with the protocol-B preparation (deepbet on each scan's own grid) and the
FLAIR preset's normative intensity read (``mri_cpu``), on the development split's 60 patients in five folds
(:func:`medflowad.mri.calibration.subject_folds`), each patient's share of voxels beyond the other folds'
healthy range: over its healthy parts (what the calibration stores, whose largest value sets the limit) and
over its whole scored brain (what ``score`` reports), against its lesion's share of that brain.
"""

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from data_root import data_root

from medflowad.bench.mri import LESION_MASKS, read_split
from medflowad.data.readers import load_scan
from medflowad.mri.analysis import NORMATIVE_INTENSITY_READS
from medflowad.mri.calibration import healthy_parts, left_out_beyond_maps
from medflowad.mri.config import load_mri_config
from medflowad.mri.normative import UNLIKE_HEALTHY_FACTOR, beyond_share, level_count, slice_levels
from medflowad.prep.stage import companion_path, prepare_volume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--config", default="mri_cpu")
    args = parser.parse_args()
    lgg = data_root() / "medical" / "lgg_flair128"
    patients = read_split(None)["train"]
    mri = load_mri_config(args.config)
    config = dataclasses.replace(mri.preprocessing.overridden(space="native", brain="deepbet"),
                                 brain_volume_ml=None)  # LGG's voxel sizes are nominal
    read = NORMATIVE_INTENSITY_READS[mri.normative_intensity]
    prepared = []
    for i, patient in enumerate(patients):
        path = lgg / f"{patient}_flair.nii.gz"
        prepared.append(prepare_volume(load_scan(path), config,
                                       lesion_mask=load_scan(companion_path(path, LESION_MASKS))))
        print(f"prepared {i + 1}/{len(patients)} {patient}", flush=True)
    maps = [read(p) for p in prepared]
    regions = [p.scored for p in prepared]
    healthy = [healthy_parts(p)[1] for p in prepared]
    levels = [slice_levels(p, False) for p in prepared]
    count = level_count(prepared[0], False)
    rows = []
    for i, beyond in left_out_beyond_maps(maps, healthy, regions, levels, count, False, patients):
        lesion = prepared[i].lesion > 0.5
        rows.append({"patient": patients[i], "healthy_part_share": beyond_share(beyond, healthy[i]),
                     "whole_brain_share": beyond_share(beyond, regions[i]),
                     "lesion_share": float(np.mean(lesion[regions[i]]))})
    limit = UNLIKE_HEALTHY_FACTOR * max(r["healthy_part_share"] for r in rows)
    whole = np.array([r["whole_brain_share"] for r in rows])
    result = {"patients": len(rows), "limit": limit,
              "healthy_part_share": np.percentile([r["healthy_part_share"] for r in rows], [0, 50, 100]).tolist(),
              "whole_brain_share": np.percentile(whole, [0, 50, 100]).tolist(),
              "lesion_share": np.percentile([r["lesion_share"] for r in rows], [0, 50, 100]).tolist(),
              "unlike_healthy": int((whole > limit).sum()), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
