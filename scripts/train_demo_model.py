"""Rebuild the bundled demo model (medflowad/models/demo/) and the sample scans (sample_data/mri/).

    MEDFLOWAD_DATA=/path/to/data python scripts/train_demo_model.py [--work runs/demo_model_build]

A run of protocol D (``medflowad bench t1``, :mod:`medflowad.bench.t1`) with the demo's config
(configs/mri_demo.yaml) and an openly licensed general pool:

1. The general pool: 8 subjects simulated from the MNI ICBM152 template in sample_data/ (seeds 200-207) in
   four contrasts (T1, T2, PD, FLAIR; medflowad.data.phantoms); those whose registration is refused
   are left out.
2. Both models train on the five IXI training subjects of the fixed split (real healthy T1 heads,
   CC BY-SA 3.0); one of them, drawn by the config's seed, calibrates the model maps; the normative
   intensity is calibrated leaving each subject out in turn.
3. The two held-apart IXI subjects, as they are and with lesions painted in (seeded, two copies each),
   are measured (protocol D) and copied to sample_data/mri/ with their lesion masks.
4. What scoring needs (configs, weights, calibration, metrics) goes to medflowad/models/demo/, with
   evaluation.json (the bench's metrics).

About 10 minutes on 2 CPU cores. Training is seeded; on the same torch build the weights repeat.
"""

import argparse
import json
import shutil
from pathlib import Path

from medflowad.bench.t1 import T1BenchSettings, run_t1_bench
from medflowad.data.phantoms import load_template, save_scan, simulate_subject, tissue_contrast
from medflowad.mri.model import SCORING_FILES

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "medflowad" / "models" / "demo"
SAMPLES = ROOT / "sample_data" / "mri"
POOL_SEEDS = range(200, 208)


def simulate_pool(folder: Path) -> None:
    template = load_template(ROOT / "sample_data" / "mni_icbm152")
    folder.mkdir(parents=True, exist_ok=True)
    for seed in POOL_SEEDS:
        subject = simulate_subject(template, seed)
        save_scan(folder / f"sim-{seed:03d}_t1.nii.gz", subject.t1, template.affine)
        for contrast in ("t2", "pd", "flair"):
            save_scan(folder / f"sim-{seed:03d}_{contrast}.nii.gz", tissue_contrast(subject, contrast, seed),
                      template.affine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "demo_model_build")
    parser.add_argument("--data", default="$MEDFLOWAD_DATA")
    args = parser.parse_args()
    pool_scans = args.work / "pool_scans"
    if not pool_scans.is_dir():
        simulate_pool(pool_scans)
    settings = T1BenchSettings(data=args.data, config=str(ROOT / "configs" / "mri_demo.yaml"),
                               pool=[str(pool_scans)], copies=2, device="cpu")
    result = run_t1_bench(settings, args.work)
    for name in (*SCORING_FILES, "metrics.json"):
        (TARGET / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.work / "t1" / name, TARGET / name)
    (TARGET / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    for old in SAMPLES.glob("*.nii.gz"):  # LICENSE.txt stays
        old.unlink()
    for path in sorted((args.work / "test").glob("*.nii.gz")):
        shutil.copyfile(path, SAMPLES / path.name)
    shutil.copyfile(args.work / "test" / "lesions.json", SAMPLES / "lesions.json")
    print(f"demo model written to {TARGET}, sample scans to {SAMPLES}; results: {args.work / 'results.md'}")


if __name__ == "__main__":
    main()
