"""Training and scoring throughput of a preset's architecture on random inputs.

    python benchmarks/speed.py --config cifar10_cpu [--device cpu] [--steps 10] [--out speed.json]

Reports images/s of one optimiser step (forward + backward + Adamax) at the preset's batch size,
scoring images/s (forward only, bin-centre inputs) at --score-batch, and peak resident memory,
with the machine beside the figures. Inputs are random pixels: throughput does not depend on content.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import torch

from medflowad.devices import resolve_device
from medflowad.flows import Glow
from medflowad.presets import load_preset_or_file
from medflowad.scores import likelihoods
from medflowad.units import bits_per_dim, to_model_input


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(config_name: str, device_name: str, steps: int, score_batch: int, score_images: int) -> dict:
    config = load_preset_or_file(config_name)
    device = resolve_device(device_name)
    torch.manual_seed(0)
    model = Glow(config.model).to(device).train()
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-5)
    shape = (config.optim.batch_size, config.model.in_channels, *config.model.image_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8)
    x = to_model_input(images, torch.rand(shape)).to(device)

    def step() -> None:
        loss = bits_per_dim(model(x).log_prob, config.model.num_dims).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(2):  # ActNorm init and allocator warm-up
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    train_ips = steps * shape[0] / (time.perf_counter() - started)

    score_set = torch.randint(0, 256, (score_images, *shape[1:]), dtype=torch.uint8)
    likelihoods(model, score_set[:score_batch], score_batch)
    _sync(device)
    started = time.perf_counter()
    likelihoods(model, score_set, score_batch)
    _sync(device)
    score_ips = score_images / (time.perf_counter() - started)
    return {
        "config": config_name, "levels": config.model.levels, "steps_per_level": config.model.steps,
        "hidden": config.model.hidden, "image": list(shape[1:]), "train_batch": shape[0],
        "train_images_per_s": round(train_ips, 1), "score_batch": score_batch,
        "score_images_per_s": round(score_ips, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device": str(device), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": platform.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cifar10_cpu")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--score-batch", type=int, default=128)
    parser.add_argument("--score-images", type=int, default=1024)
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    result = measure(args.config, args.device, args.steps, args.score_batch, args.score_images)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
