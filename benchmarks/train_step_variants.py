"""Training-step variants of the same Glow that compute the same gradient: which, if any, is faster on this CPU.

    python benchmarks/train_step_variants.py --rounds 2          # about 4 min on 2 CPU cores

``mri_cpu``'s architecture (1x64x64, L=3, K=8, hidden 64, batch 64, Adamax, NHWC). Variants, each in a fresh
process, alternating within each round:

- ``plain``: the model as ``train`` runs it;
- ``inplace``: the coupling networks' ReLUs in place (no new 64-channel activation per ReLU);
- ``fused``: each convolution + ReLU pair as one oneDNN convolution with a ReLU post-op
  (``torch.ops.mkldnn._convolution_pointwise``) in a custom autograd function whose backward masks the
  gradient by the output's sign and calls ``aten.convolution_backward``;
- ``chunks16`` / ``chunks8``: the batch of 64 as 4 / 8 chunks whose gradients accumulate before one optimiser
  step (smaller activations that may stay in cache).

Prints images/s per variant and round and the medians. The torch profiler's share of the ReLUs in a step (35 %
of an NHWC step, docs/speed.md) suggested the first three; none is kept.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from medflowad.flows import Glow, GlowConfig

VARIANTS = ("plain", "inplace", "fused", "chunks16", "chunks8")


class ConvReLUFunction(torch.autograd.Function):
    """relu(conv(x, w) + b) in one oneDNN call; backward through the output's sign and aten's conv backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        y = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, [padding] * 2, [1, 1], [1, 1], 1, "relu",
                                                     [None], None)
        ctx.save_for_backward(x, weight, y)
        ctx.padding = padding
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, y = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad, y, 0)
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]], [1, 1], [ctx.padding] * 2, [1, 1], False, [0, 0], 1,
            [ctx.needs_input_grad[0], True, True])
        return grad_x, grad_w, grad_b, None


class ConvReLU(torch.nn.Module):
    def __init__(self, conv: torch.nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ConvReLUFunction.apply(x, self.conv.weight, self.conv.bias, self.conv.padding[0])


def images_per_s(variant: str, warmup: int, steps: int) -> float:
    torch.manual_seed(0)
    config = GlowConfig(in_channels=1, image_size=(64, 64), levels=3, steps=8, hidden=64)
    model = Glow(config).train()
    for module in model.modules():
        if isinstance(module, torch.nn.ReLU) and variant == "inplace":
            module.inplace = True
        if isinstance(module, torch.nn.Sequential) and variant == "fused":  # conv, ReLU, conv, ReLU, conv
            module[0], module[1] = ConvReLU(module[0]), torch.nn.Identity()
            module[2], module[3] = ConvReLU(module[2]), torch.nn.Identity()
    chunk = int(variant[len("chunks"):]) if variant.startswith("chunks") else 64
    x = torch.rand(64, 1, 64, 64).contiguous(memory_format=torch.channels_last)
    model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-5)

    def step() -> None:
        optimizer.zero_grad()
        for part in x.split(chunk):  # the sum of the chunks' losses is the batch's loss
            (-model(part).log_prob.sum() / (config.num_dims * len(x))).backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return len(x) * steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)  # a single measurement, in a child
    args = parser.parse_args()
    if args.one:
        print(json.dumps({"images_per_s": images_per_s(args.one, args.warmup, args.steps)}))
        return
    figures: dict[str, list[float]] = {v: [] for v in args.variants}
    for k in range(args.rounds):
        for variant in args.variants:
            done = subprocess.run([sys.executable, __file__, "--one", variant, "--warmup", str(args.warmup),
                                   "--steps", str(args.steps)], capture_output=True, text=True, check=True)
            figures[variant].append(json.loads(done.stdout.strip().splitlines()[-1])["images_per_s"])
            print(f"round {k + 1} {variant}: {figures[variant][-1]:.1f} images/s", flush=True)
    print(json.dumps({v: {"median": statistics.median(f), "rounds": f} for v, f in figures.items()}, indent=2))


if __name__ == "__main__":
    main()
