"""A model calibrated on another site's healthy heads (`medflowad calibrate`) against the model as shipped.

    python benchmarks/site_calibration.py -o runs/site_calibration [--model demo] [--calibration-heads 10]

The "other site" is simulated (no real multi-site data is used): healthy T1 heads from the MNI template in
sample_data/ (medflowad.data.phantoms: another anatomy, contrast curve and shading than IXI's scanner), seeds
310 + i calibrate, seeds 300-302 are the site's new patients, scored healthy and with two lesions painted into
each (medflowad.data.painting, seeds 3000 + ...). None of these seeds is in the demo's general pool
(200-207). For the shipped model and the recalibrated one, it writes each model's scores of the six painted
and three healthy test heads (``score``: scan score, voxels in the anomaly mask, the share beyond the healthy
range and ``unlike_healthy``) and the voxel metrics on the painted heads (``evaluate``), into
``<out>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from medflowad.data.painting import paint_scan_file
from medflowad.data.phantoms import load_template, save_scan, simulate_subject
from medflowad.mri.evaluate import evaluate_scans
from medflowad.mri.recalibration import recalibrate_model
from medflowad.mri.score import score_scans

ROOT = Path(__file__).resolve().parents[1]
TEST_SEEDS = (300, 301, 302)


def simulated_site(folder: Path, calibration_heads: int) -> tuple[list[Path], list[Path], list[Path]]:
    """(calibration heads, healthy test heads, painted test heads), written once under ``folder``."""
    template = load_template(ROOT / "sample_data" / "mni_icbm152")
    calibration, healthy = [], []
    for seed in (*range(310, 310 + calibration_heads), *TEST_SEEDS):
        group = "test" if seed in TEST_SEEDS else "calibration"
        path = folder / group / f"sim-{seed}_t1.nii.gz"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            subject = simulate_subject(template, seed)
            save_scan(path, subject.t1, template.affine)
            if group == "test":
                brain = folder / "brains" / f"sim-{seed}_brain.nii.gz"
                brain.parent.mkdir(parents=True, exist_ok=True)
                save_scan(brain, (subject.t1 > 0.02).astype(np.uint8), template.affine)
                paint_scan_file(path, brain, folder / "painted", copies=2, seed=3000 + 10 * seed)
        (healthy if group == "test" else calibration).append(path)
    return calibration, healthy, sorted((folder / "painted").glob("*-painted?_t1.nii.gz"))


def measure(model: str | Path, healthy: list[Path], painted: list[Path], out: Path) -> dict:
    result = score_scans([*painted, *healthy], model, out / "scores", "cpu")
    rows = {r["scan_id"]: {k: r[k] for k in ("status", result.scan_score, "flagged_voxels", "beyond_range_share",
                                             "unlike_healthy") if k in r} for r in result.rows}
    metrics = evaluate_scans(Path(model), painted, ("_t1", "_t1_mask"), out / "evaluate", device="cpu")
    painted_scores = [r[result.scan_score] for sid, r in rows.items() if "painted" in sid]
    healthy_scores = [r[result.scan_score] for sid, r in rows.items() if "painted" not in sid]
    return {"scan_score": result.scan_score, "warning": result.warning, "scans": rows,
            "scan_auroc": float(np.mean([p > h for p in painted_scores for h in healthy_scores])),
            "voxel": {name: metrics["voxel"][name] for name in ("intensity_normative", "intensity", "llr")},
            "lesion_share": metrics["lesion_voxels"] / metrics["voxels"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--calibration-heads", type=int, default=10)
    args = parser.parse_args()
    calibration, healthy, painted = simulated_site(args.out / "site", args.calibration_heads)
    recalibrated = args.out / "recalibrated"
    started = time.perf_counter()
    if not (recalibrated / "recalibration.json").exists():
        recalibrate_model(args.model, calibration, recalibrated, device="cpu")
    seconds = time.perf_counter() - started
    summary = {"calibration_heads": len(calibration), "recalibration_seconds": round(seconds, 1),
               "shipped": measure(args.model, healthy, painted, args.out / "shipped"),
               "recalibrated": measure(recalibrated, healthy, painted, args.out / "recalibrated_results")}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
