"""Measure the preparation stage on the real data of the data pack; prints markdown tables (docs/mri.md).

    MEDFLOWAD_DATA=/path/to/data python benchmarks/preparation_check.py [--lgg-registrations 12]

- IXI T1 heads (7): deepbet's Dice against DLMUSE (label > 0), the registered brain's overlap with the
  template's (the check ``min_template_overlap`` applies), seconds for brain extraction and registration.
- LGG FLAIR (88 patients): share of the lesion voxels inside deepbet's brain mask, the mask's volume under
  the nominal affine; and, for the first N train patients of the bench's split (development data only),
  whether standard-space registration passes its overlap check.

Results go into the preparation cache ($MEDFLOWAD_CACHE), so a `bench mri` run afterwards reuses them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from data_root import data_root

from medflowad.bench.mri import read_split
from medflowad.data.readers import ScanError, load_scan
from medflowad.data.scans import ScanPreprocessing
from medflowad.prep.stage import mask_on_scan, run_preparation

NATIVE_BRAIN = ScanPreprocessing(brain="deepbet", brain_volume_ml=None)  # LGG: nominal voxel size, any volume
STANDARD = ScanPreprocessing(space="standard", brain="deepbet")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(data_root()))
    parser.add_argument("--lgg-registrations", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    medical = Path(args.data) / "medical"

    print("| IXI head | deepbet Dice vs DLMUSE | brain mL | template overlap (Dice) | scalings | brain s | "
          "registration s |")
    print("|---|---|---|---|---|---|---|")
    for head in sorted((medical / "ixi_t1_2mm").glob("*_T1.nii.gz")):
        reference = np.asarray(nib.load(str(head).replace("_T1", "_dlmuse")).dataobj) > 0
        preparation = run_preparation(load_scan(head), STANDARD)
        seconds = preparation.info["seconds"] if not preparation.cached else {"brain": float("nan"),
                                                                             "registration": float("nan")}
        print(f"| {head.name.split('_')[0]} | {_dice(preparation.brain, reference):.3f} | {preparation.brain_ml:.0f} | "
              f"{preparation.info['template_overlap']:.3f} | "
              f"{' / '.join(f'{v:.2f}' for v in preparation.info['template_scalings'])} | {seconds['brain']:.1f} | "
              f"{seconds['registration']:.1f} |")

    print("\n| LGG patients | lesion voxels inside the brain mask: min / median | nominal brain mL: min / max |")
    print("|---|---|---|")
    kept, volumes, times = [], [], []
    for flair in sorted((medical / "lgg_flair128").glob("*_flair.nii.gz")):
        scan = load_scan(flair)
        started = time.perf_counter()
        preparation = run_preparation(scan, NATIVE_BRAIN)
        times.append(time.perf_counter() - started)
        lesion = mask_on_scan(load_scan(flair.with_name(flair.name.replace("_flair", "_mask"))), scan)
        kept.append(np.logical_and(lesion, preparation.brain).sum() / max(lesion.sum(), 1))
        volumes.append(preparation.brain_ml)
    print(f"| {len(kept)} | {min(kept):.3f} / {np.median(kept):.3f} | {min(volumes):.0f} / {max(volumes):.0f} |")
    print(f"\n(brain extraction: median {np.median(times):.1f} s per LGG volume, cached ones included)")

    print("\n| LGG train patient | registered to MNI: overlap (Dice) | scalings | overlap >= 0.85 | scalings within "
          "0.67-1.5 |")
    print("|---|---|---|---|---|")
    unchecked = dataclasses.replace(STANDARD, min_template_overlap=0.0, max_template_scaling=1e9, brain_volume_ml=None)
    for patient in read_split(None)["train"][: args.lgg_registrations]:
        scan = load_scan(medical / "lgg_flair128" / f"{patient}_flair.nii.gz")
        try:
            preparation = run_preparation(scan, unchecked)
        except ScanError as exc:
            print(f"| {patient} | failed: {exc} | | no | no |")
            continue
        overlap, scalings = preparation.info["template_overlap"], preparation.info["template_scalings"]
        bound = STANDARD.max_template_scaling
        plausible = 1 / bound <= min(scalings) and max(scalings) <= bound
        print(f"| {patient} | {overlap:.3f} | {' / '.join(f'{v:.2f}' for v in scalings)} | "
              f"{'yes' if overlap >= STANDARD.min_template_overlap else 'no'} | {'yes' if plausible else 'no'} |")


if __name__ == "__main__":
    main()
