"""torch.compile against eager execution for one training step of a preset's Glow (random inputs).

    python benchmarks/compile_speed.py [--config mri_cpu] [--rounds 3] [--device auto]

Each round runs eager and compiled in fresh processes, one after the other (so machine noise falls on both):
two eager steps first (ActNorm's data-dependent initialisation and allocator warm-up), then the loss
(forward and log-likelihood) wrapped in ``torch.compile`` (default inductor backend) or not, three untimed
steps (compilation, recompiles), and ten timed optimiser steps at the preset's batch size and layout.
Reports images/s per round, their medians, and the seconds of the first compiled step (compilation; the
inductor cache makes later processes faster than the very first).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from medflowad.bench.speed import architecture, sync, training_setup
from medflowad.devices import resolve_device
from medflowad.units import bits_per_dim


def one_run(config: str, compiled: bool, device: torch.device) -> dict:
    model_config, batch, channels_last = architecture(config)
    model, optimizer, x = training_setup(model_config, batch, channels_last, device)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return bits_per_dim(model(x).log_prob, model_config.num_dims).mean()

    def step(loss_fn) -> None:
        value = loss_fn(x)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()

    for _ in range(2):
        step(loss)
    loss_fn = torch.compile(loss) if compiled else loss
    started = time.perf_counter()
    step(loss_fn)
    sync(device)
    first = time.perf_counter() - started
    for _ in range(3):
        step(loss_fn)
    sync(device)
    started = time.perf_counter()
    for _ in range(10):
        step(loss_fn)
    sync(device)
    return {"compiled": compiled, "first_step_seconds": round(first, 2),
            "train_images_per_s": round(10 * batch / (time.perf_counter() - started), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="mri_cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--one", choices=("eager", "compiled"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.one:
        print(json.dumps(one_run(args.config, args.one == "compiled", device)))
        return
    runs: dict[str, list[dict]] = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        for mode in runs:
            child = subprocess.run([sys.executable, __file__, "--config", args.config, "--device", str(device),
                                    "--one", mode], check=True, capture_output=True, text=True)
            runs[mode].append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(mode, runs[mode][-1], flush=True)
    medians = {mode: statistics.median(r["train_images_per_s"] for r in rows) for mode, rows in runs.items()}
    print(json.dumps({"config": args.config, "device": str(device), "torch": torch.__version__,
                      "median_train_images_per_s": medians,
                      "compiled_over_eager": round(medians["compiled"] / medians["eager"], 3)}, indent=2))


if __name__ == "__main__":
    main()
