"""The product path on LGG's development split: `medflowad train` a FLAIR model, `medflowad score` held-apart
patients, and the written anomaly mask against their lesion masks, with overlays.

    MEDFLOWAD_DATA=/path/to/data python benchmarks/flair_score_check.py -o runs/flair_check [--steps 30]

The first 57 patients of the development split (the shipped split's train part) train and calibrate the
model (`--lesion-masks _flair=_mask`: lesion-free slices train, calibration takes the healthy voxels), the
last 3 are scored; no test patient is touched. The preparation is protocol B's (`mri_cpu` on each scan's own
grid with deepbet; LGG's nominal voxel sizes make the brain-volume check meaningless, so it is off), the
general pool the 7 healthy IXI T1 heads. A FLAIR model's default mask map is `intensity_scan_z`, whose
threshold comes from the calibration patients' healthy voxels; the flows train only `--steps` steps, since
the mask does not depend on them. Writes OUT/metrics.json (Dice of each scored patient's written mask) and
OUT/overlay.png (each patient's slice with the largest lesion: FLAIR with the lesion's contour, the written
scan z map, the written mask).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
import yaml
from data_root import data_root

from medflowad.bench.mri import read_split
from medflowad.mri.config import load_mri_config

SCORED = 3


def medflowad(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "medflowad", *args, "-q"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30, help="steps of each flow (the mask does not use them)")
    args = parser.parse_args()
    data = data_root() / "medical"
    lgg = data / "lgg_flair128"
    patients = read_split(None)["train"]
    out = args.out
    for part, names in (("train", patients[:-SCORED]), ("score", patients[-SCORED:])):
        (out / part).mkdir(parents=True, exist_ok=True)
        for name in names:
            for kind in ("flair", "mask"):
                link = out / part / f"{name}_{kind}.nii.gz"
                if not link.exists():
                    link.symlink_to((lgg / f"{name}_{kind}.nii.gz").resolve())
    config = load_mri_config("mri_cpu").to_dict()
    config["preprocessing"].update(space="native", brain="deepbet", brain_volume_ml=None)
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    if not (out / "pool" / "manifest.json").exists():
        medflowad("pool", "build", str(data / "ixi_t1_2mm"), "-o", str(out / "pool"), "-c", str(out / "config.yaml"),
                  "--exclude", "*dlmuse*")
    if not (out / "model" / "mri.yaml").exists():
        medflowad("train", "--modality", "flair", "-c", str(out / "config.yaml"), "--data", str(out / "train"),
                  "--pattern", "*_flair*", "--lesion-masks", "_flair=_mask", "--pool", str(out / "pool"),
                  "-o", str(out / "model"), "--steps", str(args.steps), "--general-steps", str(args.steps))
    medflowad("score", str(out / "score"), "--pattern", "*_flair*", "-m", str(out / "model"), "-o", str(out / "scored"),
              "--report")

    scored = json.loads((out / "scored" / "scores.json").read_text())
    result = {"mask_map": scored["mask_map"], "voxel_fpr": scored["voxel_fpr"], "patients": {}}
    figure, axes = plt.subplots(SCORED, 3, figsize=(12, 4 * SCORED))
    for row, name in enumerate(patients[-SCORED:]):
        image = nib.load(str(lgg / f"{name}_flair.nii.gz")).get_fdata()
        lesion = nib.load(str(lgg / f"{name}_mask.nii.gz")).get_fdata() > 0
        mask = np.asarray(nib.load(str(out / "scored" / f"{name}_flair_anomaly_mask.nii.gz")).dataobj) > 0
        scan_z = np.asarray(nib.load(str(out / "scored" / f"{name}_flair_scan_z.nii.gz")).dataobj)
        dice = float(2 * (mask & lesion).sum() / max(mask.sum() + lesion.sum(), 1))
        result["patients"][name] = {"lesion_voxels": int(lesion.sum()), "flagged_voxels": int(mask.sum()),
                                    "dice": round(dice, 3)}
        k = int(np.argmax(lesion.sum(axis=(0, 1))))
        panels = (("FLAIR, lesion contour", None, None), ("scan z (from 1)", scan_z, (1.0, 8.0)),
                  (f"mask, Dice {dice:.2f}", mask.astype(float), (0.0, 1.0)))
        for col, (title, overlay, window) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(image[:, :, k].T, cmap="gray", origin="lower")
            if overlay is not None:
                values = overlay[:, :, k].T
                shown = np.ma.masked_where(values < max(window[0], 0.5), values)
                ax.imshow(shown, cmap="hot" if col == 1 else "autumn", origin="lower", alpha=0.6,
                          vmin=window[0], vmax=window[1])
            ax.contour(lesion[:, :, k].T, levels=[0.5], colors="cyan", origin="lower", linewidths=0.8)
            ax.set_title(f"{name[:12]} slice {k}: {title}", fontsize=9)
            ax.axis("off")
    figure.tight_layout()
    figure.savefig(out / "overlay.png", dpi=60)
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
