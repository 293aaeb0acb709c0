"""A development split as large as protocol B's train patients: K models, each tested on the patients it left out.

    MEDFLOWAD_DATA=/path/to/data python benchmarks/lgg_crossfit.py -c runs/bench_mri_v14/flair_outlier/mri.yaml \\
        -o runs/lgg_crossfit [--folds 3]
    python benchmarks/lgg_flow_map_dev.py --crossfit runs/lgg_crossfit -o runs/lgg_crossfit/dev --sigmas 2 --with-min

Why: the 12 calibration patients of one model are the only development patients protocol B leaves, and three
flow settings in a row gained on them and lost on the test patients (docs/results.md). Here the 60 train patients
are dealt into ``--folds`` folds (seeded); fold k's model is trained exactly as the config says on the other
patients: its own general pool (the bench's sources plus every slice of those patients' FLAIR, the
calibration patients' excepted, as ``bench mri`` builds it: a held-out patient's lesions must not reach the
general model) and general model, then the in-distribution model and its calibration. Every train patient is
then scored by the one model that never saw it, and ``lgg_flow_map_dev.py --crossfit`` measures the maps over all
of them. The models learn from (K-1)/K of the patients, fewer than protocol B's 48: a development figure, for
comparing settings, not the test's. A finished fold is not retrained (an interrupted run resumes).
"""

import argparse
from pathlib import Path

import numpy as np
from data_root import data_root

from medflowad.bench.mri import LESION_MASKS, general_pool_sources, read_split
from medflowad.mri.config import load_mri_config
from medflowad.mri.pool import build_pool
from medflowad.mri.selection import split_healthy_scans
from medflowad.mri.training import train_mri_model
from medflowad.storage import write_json

FOLDS_FILE = "folds.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="MRI config (a model folder's mri.yaml, a preset)")
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="how the patients are dealt into folds")
    args = parser.parse_args()
    config = load_mri_config(args.config)
    medical = data_root() / "medical"
    patients = read_split(None)["train"]
    order = np.random.default_rng(args.seed).permutation(len(patients))
    folds = [sorted(patients[j] for j in order[k::args.folds]) for k in range(args.folds)]
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / FOLDS_FILE, {"config": str(args.config), "seed": args.seed,
                                       "folds": [{"model": f"fold{k}", "held_out": held}
                                                 for k, held in enumerate(folds)]})
    lgg = medical / "lgg_flair128"
    for k, held in enumerate(folds):
        fold = args.out / f"fold{k}"
        if (fold / "calibration.safetensors").exists():
            continue
        scans = [lgg / f"{p}_flair.nii.gz" for p in patients if p not in held]
        pool = args.out / f"pool{k}"
        if not (pool / "manifest.json").exists():
            pool_flair = split_healthy_scans(scans, config, mask_replace=LESION_MASKS)[0]
            build_pool(general_pool_sources(medical, pool_flair), pool, config.preprocessing)
        print(f"fold {k}: training on {len(scans)} patients, {len(held)} held out", flush=True)
        train_mri_model(config, scans, fold, pool=pool, mask_replace=LESION_MASKS, show_progress=False, echo=print)


if __name__ == "__main__":
    main()
