"""glibc's malloc keeping freed memory (both thresholds raised) against its defaults, in fresh processes.

    python benchmarks/malloc_speed.py --rounds 3 [--config mri_cpu] [--threshold 67108864] \
        [--scan $MEDFLOWAD_DATA/medical/nifti_samples/kirby21_113_visit2/113-02-FLAIR_processed_reg.nii.gz --model M]

glibc maps every block above its mmap threshold (at most 32 MB when it adapts the threshold itself) straight from
the kernel and unmaps it on free, and gives the heap's free top back beyond the trim threshold; such a block is
page-faulted and zeroed anew each time. ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` at
``--threshold`` serve and keep blocks up to that size in the heap instead. Each round runs, once with both
variables set and once without (glibc's defaults), alternating:

- scoring: ``likelihoods`` of ``--slices`` random slices at ``--score-batch`` with the architecture of ``--config``
  (its layout; ActNorm initialised by the first batch, then timed) in a process that has done nothing else,
  as a ``score`` or ``evaluate`` process meets its first scans;
- with ``--scan``: ``benchmarks/scan_speed.py`` on it with ``--model`` (seconds per stage, peak resident memory).

Prints every round and the medians as JSON. medflowad leaves the allocator as it is (docs/speed.md says why).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCORING = """
import json, sys, time, torch
from medflowad.bench.speed import architecture, peak_rss_mib
from medflowad.flows import Glow
from medflowad.scores import likelihoods
config, _, channels_last = architecture(sys.argv[1])
slices, batch = int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = Glow(config)
if channels_last:
    model.to(memory_format=torch.channels_last)
images = torch.randint(0, 256, (slices, config.in_channels, *config.image_size), dtype=torch.uint8)
likelihoods(model, images[:batch], batch)
started = time.perf_counter()
likelihoods(model, images, batch)
print(json.dumps({"slices_per_s": slices / (time.perf_counter() - started), "peak_rss_mib": peak_rss_mib()}))
"""


def run(command: list[str], threshold: int | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if threshold:
        env |= {"MALLOC_MMAP_THRESHOLD_": str(threshold), "MALLOC_TRIM_THRESHOLD_": str(threshold)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(command[:3])} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout[done.stdout.index("{"):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="mri_cpu")
    parser.add_argument("--slices", type=int, default=1024)
    parser.add_argument("--score-batch", type=int, default=128)
    parser.add_argument("--scan", type=Path, default=None)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threshold", type=int, default=64 << 20, help="bytes; both glibc thresholds")
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {"keep": [], "system": []}
    for k in range(args.rounds):
        for name, threshold in (("keep", args.threshold), ("system", None)):
            row = {"scoring": run([sys.executable, "-c", SCORING, args.config, str(args.slices),
                                   str(args.score_batch)], threshold)}
            if args.scan:
                stages = run([sys.executable, str(HERE / "scan_speed.py"), str(args.scan), "--model", args.model],
                             threshold)
                row["scan"] = {key: stages[key] for key in ("seconds_per_stage", "seconds_per_scan", "peak_rss_mib")}
            rows[name].append(row)
            print(f"round {k + 1} {name}: {json.dumps(row)}", flush=True)
    summary = {}
    for name, runs in rows.items():
        summary[name] = {"scoring_slices_per_s": statistics.median(r["scoring"]["slices_per_s"] for r in runs),
                         "scoring_peak_rss_mib": statistics.median(r["scoring"]["peak_rss_mib"] for r in runs)}
        if args.scan:
            summary[name] |= {"seconds_per_scan": statistics.median(r["scan"]["seconds_per_scan"] for r in runs),
                              "scan_peak_rss_mib": max(r["scan"]["peak_rss_mib"] for r in runs)}
    print(json.dumps({"config": args.config, "threshold": args.threshold, "slices": args.slices,
                      "score_batch": args.score_batch, "scan": str(args.scan) if args.scan else None,
                      "model": args.model, "medians": summary,
                      "rounds": rows}, indent=2))


if __name__ == "__main__":
    main()
