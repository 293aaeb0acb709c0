"""Training and scoring throughput of one preset's architecture on random inputs (one part of
``medflowad bench speed``, :mod:`medflowad.bench.speed`, on its own).

    python benchmarks/speed.py --config cifar10_cpu [--device cpu] [--steps 10] [--out speed.json]
    python benchmarks/speed.py --config mri_cpu --layout default     # MRI config; compare with --layout nhwc

Reports images/s of one optimiser step (forward + backward + Adamax) at the preset's batch size,
scoring images/s (forward only, bin-centre inputs) at --score-batch, and peak resident memory,
with the machine beside the figures. Inputs are random pixels: throughput does not depend on content.
"""

from __future__ import annotations

import argparse
import json

from medflowad.bench.speed import glow_throughput, machine
from medflowad.devices import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cifar10_cpu")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--score-batch", type=int, default=128)
    parser.add_argument("--score-images", type=int, default=1024)
    parser.add_argument("--layout", choices=("config", "nhwc", "default"), default="config",
                        help="convolution layout: the config's channels_last, or force NHWC / the default")
    parser.add_argument("--train-precision", choices=("float32", "bfloat16"), default="float32",
                        help="the coupling networks' precision in training steps (scoring stays float32)")
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    device = resolve_device(args.device)
    result = {**glow_throughput(args.config, device, args.steps, args.score_images, args.score_batch, args.layout,
                                args.train_precision),
              **machine(device)}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
