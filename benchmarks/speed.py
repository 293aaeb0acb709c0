"""Training and scoring throughput of a preset's architecture on random inputs.

    python benchmarks/speed.py --config cifar10_cpu [--device cpu] [--steps 10] [--out speed.json]
    python benchmarks/speed.py --config mri_cpu --layout default     # MRI config; compare with --layout nhwc

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

from medflowad.config import ConfigError
from medflowad.devices import resolve_device
from medflowad.flows import Glow, GlowConfig
from medflowad.mri.config import load_mri_config
from medflowad.presets import load_preset_or_file
from medflowad.scores import likelihoods
from medflowad.units import bits_per_dim, to_model_input


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _architecture(config_name: str) -> tuple[GlowConfig, int, bool]:
    """(model, train batch, channels_last) of a natural-image preset or an MRI config."""
    try:
        run = load_preset_or_file(config_name)
        return run.model, run.optim.batch_size, run.channels_last
    except ConfigError:
        mri = load_mri_config(config_name)
        return mri.model, mri.batch_size, mri.channels_last


def measure(config_name: str, device_name: str, steps: int, score_batch: int, score_images: int,
            layout: str = "config") -> dict:
    model_config, batch, channels_last = _architecture(config_name)
    channels_last = {"config": channels_last, "nhwc": True, "default": False}[layout]
    device = resolve_device(device_name)
    torch.manual_seed(0)
    model = Glow(model_config).to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-5)
    shape = (batch, model_config.in_channels, *model_config.image_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8)
    x = to_model_input(images, torch.rand(shape)).to(device)

    def step() -> None:
        loss = bits_per_dim(model(x).log_prob, model_config.num_dims).mean()
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
        "config": config_name, "levels": model_config.levels, "steps_per_level": model_config.steps,
        "hidden": model_config.hidden, "image": list(shape[1:]), "train_batch": shape[0],
        "channels_last": channels_last,
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
    parser.add_argument("--layout", choices=("config", "nhwc", "default"), default="config",
                        help="convolution layout: the config's channels_last, or force NHWC / the default")
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    result = measure(args.config, args.device, args.steps, args.score_batch, args.score_images, args.layout)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
