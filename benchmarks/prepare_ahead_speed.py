"""Wall time of `score` over several scans with the next scan prepared ahead (the default) and without.

    MEDFLOWAD_DATA=/path/to/data python benchmarks/prepare_ahead_speed.py \
        $MEDFLOWAD_DATA/medical/nifti_samples/kirby21_113_visit2/113-02-FLAIR_processed_reg.nii.gz \
        --model runs/speed_native/model --copies 4 --rounds 3

Copies the scan ``--copies`` times under different names (a native-grid model caches nothing, so each copy is
prepared from scratch; a standard-space model's cache would serve the copies), loads the model once, scores
one copy to warm up, then runs :func:`medflowad.mri.score.score_scans` over all copies with
``prepare_ahead`` on and off in alternation, ``--rounds`` times each, into fresh folders. Prints seconds per
scan for each run, the medians and their ratio, and checks that both ways wrote the same scores.
"""

import argparse
import csv
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from medflowad.bench.speed import machine
from medflowad.devices import resolve_device
from medflowad.mri.model import load_mri_model
from medflowad.mri.score import score_scans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scan", type=Path)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    model = load_mri_model(args.model, str(device))
    suffix = "".join(args.scan.suffixes)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    scores: dict[bool, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        scans = [root / "in" / f"copy{i}{suffix}" for i in range(args.copies)]
        scans[0].parent.mkdir()
        for copy in scans:
            shutil.copyfile(args.scan, copy)
        score_scans(scans[:1], args.model, root / "warm", str(device), model=model)
        for k in range(args.rounds):
            for ahead in (True, False):
                out = root / f"out_{ahead}_{k}"
                started = time.perf_counter()
                result = score_scans(scans, args.model, out, str(device), model=model, prepare_ahead=ahead)
                seconds[ahead].append((time.perf_counter() - started) / args.copies)
                if not result.all_ok:
                    raise SystemExit(f"scoring failed: {[r['error'] for r in result.rows if r['status'] != 'ok']}")
                with open(out / "scores.csv") as f:
                    scores[ahead] = [{c: v for c, v in r.items() if c != "seconds"} for r in csv.DictReader(f)]
                shutil.rmtree(out)
                print(f"round {k + 1} prepare_ahead={ahead}: {seconds[ahead][-1]:.2f} s per scan", flush=True)
    if scores[True] != scores[False]:
        raise SystemExit("prepare_ahead changed the scores")
    on, off = statistics.median(seconds[True]), statistics.median(seconds[False])
    print(json.dumps({"machine": machine(device), "scan": str(args.scan), "model": args.model, "copies": args.copies,
                      "seconds_per_scan": {"prepare_ahead": seconds[True], "in_turn": seconds[False]},
                      "median_prepare_ahead": on, "median_in_turn": off, "speed_up": off / on}, indent=2))


if __name__ == "__main__":
    main()
