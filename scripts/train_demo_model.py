"""Rebuild the bundled demo model (medflowad/models/demo/) from the MNI template in sample_data/.

    python scripts/train_demo_model.py [--work runs/demo_model_build]

1. Simulates 60 healthy T1 subjects (seeds 0-59) and a general pool of 8 other subjects in four
   contrasts (T1, T2, PD, FLAIR; seeds 200-207), all from sample_data/mni_icbm152 (medflowad.data.phantoms).
2. Builds the pool and trains both models with configs/mri_demo.yaml (`medflowad pool build` and
   `medflowad train --modality t1` do the same from the command line).
3. Copies what scoring needs (configs, weights, calibration, metrics) into medflowad/models/demo/.
4. Evaluates on 24 further simulated subjects (seeds 3000-3023: 8 healthy, 16 with lesions of the
   three kinds) and writes evaluation.json beside the model (`--evaluate-only` repeats just this).

About 15 minutes on 2 CPU cores. Training is seeded; on the same torch build the weights repeat.
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from medflowad.data.phantoms import (
    LESION_KINDS,
    insert_lesions,
    load_template,
    save_scan,
    simulate_subject,
    tissue_contrast,
)
from medflowad.mri.analysis import SLICE_SCORES
from medflowad.mri.config import load_mri_config
from medflowad.mri.evaluate import evaluate_scans
from medflowad.mri.model import SCORING_FILES, train_mri_model
from medflowad.mri.pool import build_pool
from medflowad.mri.score import score_scans

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "medflowad" / "models" / "demo"
HEALTHY_SEEDS = range(60)
POOL_SEEDS = range(200, 208)
TEST_SEEDS = range(3000, 3024)  # the first 8 healthy, then lesions of each kind in turn


def simulate(work: Path) -> None:
    template = load_template(ROOT / "sample_data" / "mni_icbm152")
    (work / "healthy").mkdir(parents=True, exist_ok=True)
    (work / "pool_scans").mkdir(parents=True, exist_ok=True)
    for seed in HEALTHY_SEEDS:
        path = work / "healthy" / f"sim-{seed:03d}_t1.nii.gz"
        if not path.exists():
            save_scan(path, simulate_subject(template, seed).t1, template.affine)
    for seed in POOL_SEEDS:
        subject = simulate_subject(template, seed)
        save_scan(work / "pool_scans" / f"sim-{seed:03d}_t1.nii.gz", subject.t1, template.affine)
        for contrast in ("t2", "pd", "flair"):
            image = tissue_contrast(subject, contrast, seed)
            save_scan(work / "pool_scans" / f"sim-{seed:03d}_{contrast}.nii.gz", image, template.affine)


def evaluate(work: Path) -> dict:
    """Scan-, slice- and voxel-level detection on simulated test subjects never used in training."""
    template = load_template(ROOT / "sample_data" / "mni_icbm152")
    test = work / "test"
    test.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lesioned = {}
    for i, seed in enumerate(TEST_SEEDS):
        subject = simulate_subject(template, seed)
        t1, mask = subject.t1, np.zeros(subject.t1.shape, dtype=np.uint8)
        if i >= 8:
            kind = LESION_KINDS[i % 3]
            radii = list(rng.uniform(6, 16, rng.integers(1, 4)))
            t1, mask = insert_lesions(subject, radii, seed, kind)
        lesioned[f"test-{seed}_t1"] = i >= 8
        save_scan(test / f"test-{seed}_t1.nii.gz", t1, template.affine)
        save_scan(test / f"test-{seed}_mask.nii.gz", mask, template.affine)
    scored = score_scans([test], TARGET, work / "test_scores", device="cpu")
    labels = np.array([lesioned[r["scan_id"]] for r in scored.rows])
    flags = {name: np.array([r[f"{name}_flag"] for r in scored.rows]) for name in SLICE_SCORES}
    scan_level = {name: {"auroc": float(roc_auc_score(labels, [r[name] for r in scored.rows])),
                         "flagged_lesioned": int(flags[name][labels].sum()),
                         "flagged_healthy": int(flags[name][~labels].sum())}
                  for name in SLICE_SCORES}
    detail = evaluate_scans(TARGET, [test], ("_t1", "_mask"), device="cpu")
    result = {"test_subjects": len(labels), "lesioned": int(labels.sum()), "scan": scan_level,
              "slice": detail["slice"], "voxel": detail["voxel"]}
    (TARGET / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "demo_model_build")
    parser.add_argument("--general-model", type=Path, help="reuse this general model instead of training one")
    parser.add_argument("--evaluate-only", action="store_true", help="only step 4, on the model in place")
    args = parser.parse_args()
    if args.evaluate_only:
        print(json.dumps(evaluate(args.work), indent=2))
        return
    config = load_mri_config(str(ROOT / "configs" / "mri_demo.yaml"))
    simulate(args.work)
    pool = args.work / "pool"
    if not (pool / "manifest.json").exists():
        manifest = build_pool([args.work / "pool_scans"], pool, config.preprocessing)
        print(f"pool: {manifest['total_slices']} slices")
    metrics = train_mri_model(config, [args.work / "healthy"], args.work / "model", pool=pool,
                              general_model=args.general_model)
    print(f"in-distribution model: {metrics['in_model_test_bpd']:.3f} bits/dim on held-out healthy slices")
    for name in (*SCORING_FILES, "metrics.json"):
        (TARGET / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.work / "model" / name, TARGET / name)
    print(f"demo model written to {TARGET}")
    print(json.dumps(evaluate(args.work), indent=2))


if __name__ == "__main__":
    main()
