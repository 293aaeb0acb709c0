"""Recompute the bundled demo's calibration with its weights as they are, after medflowad added an entry.

    MEDFLOWAD_DATA=/path/to/data python scripts/recalibrate_demo.py [--check-only]

The demo's calibration (medflowad/models/demo/calibration.safetensors) is what scripts/train_demo_model.py's
training wrote: its five IXI training subjects, split by the config's seed into training and calibration
scans as training split them, through :func:`medflowad.mri.calibration.calibrate`. This script repeats that
call on the bundled weights and adds the entries the bundled calibration lacks (one added since, e.g.
``scan/beyond_range_share``), without retraining; every entry it holds stays as it is, so scores and masks
stay bit for bit.

A preparation repeats bit for bit on one machine, not across machines: registration and resampling run
multi-threaded, and a voxel on the brain mask's edge may fall either side (on 2026-12-06 one calibration scan
had one scored voxel more than at the build). The script prints how far the recomputed entries lie from the
bundled ones and refuses to write when a scan score moved by more than 1 %: then rebuild the demo
(scripts/train_demo_model.py) instead.
"""

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from medflowad.bench.mri import read_split
from medflowad.mri.calibration import calibrate, calibration_summary
from medflowad.mri.model import load_mri_model
from medflowad.mri.selection import split_healthy_scans, subject_of
from medflowad.prep import prepare
from medflowad.storage import read_tensors, write_json, write_tensors

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "medflowad" / "models" / "demo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check-only", action="store_true", help="compare, write nothing")
    args = parser.parse_args()
    ixi = Path(os.path.expandvars(os.environ.get("MEDFLOWAD_DATA", "../shared/data"))) / "medical" / "ixi_t1_2mm"
    model = load_mri_model(DEMO, "cpu", calibrated=False)
    scans = [ixi / f"{s}_T1.nii.gz" for s in read_split(None, "ixi_t1_split.tsv")["train"]]
    train, val = split_healthy_scans(scans, model.config)
    prepared = {path: prepare(path, model.config.preprocessing) for path in train + val}
    calibration = calibrate(model, [prepared[p] for p in val], [prepared[p] for p in train],
                            [subject_of(p) for p in train + val])
    stored = {k: v.numpy() for k, v in read_tensors(DEMO / "calibration.safetensors").items()}
    mismatched = []
    for key, values in sorted(stored.items()):
        new = calibration.get(key)
        if new is None or new.shape != values.shape:
            print(f"{key}: {'not recomputed' if new is None else f'shape {new.shape} against {values.shape}'}")
            mismatched += [key] if key.startswith("scan/") else []
            continue
        difference = float(np.max(np.abs(new.astype(np.float64) - values))) if values.size else 0.0
        scale = float(np.max(np.abs(values))) if values.size else 0.0
        print(f"{key}: largest difference {difference:.3g} (values up to {scale:.3g})")
        if key.startswith("scan/") and difference > 0.01 * max(scale, 1e-12):
            mismatched.append(key)
    added = sorted(set(calibration) - set(stored))
    print(f"added: {', '.join(added) or 'nothing'}")
    for key in added:
        print(f"{key}: {np.array2string(calibration[key], precision=4)}")
    if mismatched:
        raise SystemExit(f"scan scores not reproduced: {', '.join(mismatched)}; rebuild the demo "
                         "(scripts/train_demo_model.py)")
    if args.check_only:
        return
    kept = {**calibration, **stored}  # the bundled values where both hold a key
    write_tensors(DEMO / "calibration.safetensors", {k: torch.from_numpy(v) for k, v in kept.items()})
    summary = calibration_summary(kept, model.config.fpr)
    write_json(DEMO / "calibration.json", summary)
    metrics = json.loads((DEMO / "metrics.json").read_text())
    write_json(DEMO / "metrics.json", {**metrics, "calibration": summary})
    print(f"wrote {DEMO / 'calibration.safetensors'}, calibration.json and metrics.json's calibration")


if __name__ == "__main__":
    main()
