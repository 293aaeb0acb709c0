"""Training images/s of this checkout's Glow against an earlier commit's, at equal architecture and batch.

    python benchmarks/train_step_vs_commit.py --base 64cc0ab --rounds 3     # about 5 min on 2 CPU cores

Issue 16 asks for the training step against "today's medflowad" of the day it was filed (64cc0ab, the commit
before its first change), checked out beside the new code, in the default layout and in channels_last. The
base is extracted with ``git archive`` into a temporary folder (the working tree is not touched); each
measurement runs in a fresh Python process whose ``medflowad`` is imported from one of the two trees (checked),
through the API both share: ``Glow(GlowConfig(...))(x).log_prob``, Adamax, a seeded batch of uniform pixels,
``--warmup`` untimed steps (ActNorm initialisation, allocator) then ``--steps`` timed ones. Base and new code
alternate within each round and layout, so drifts of a noisy machine hit both alike. Prints the medians and
new / base ratios. ``--new-precision bfloat16`` runs this checkout's coupling networks in bfloat16 in its steps
(``train_precision``, which the base lacks; the base stays float32).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURES = {  # (in_channels, size, levels, steps, hidden, batch)
    "mri_cpu": (1, 64, 3, 8, 64, 64),
    "cifar10_cpu": (3, 32, 3, 8, 64, 64),
}
HARNESS = """
import json, sys, time, torch
import medflowad
from medflowad.flows import Glow, GlowConfig
assert medflowad.__file__.startswith(sys.argv[1]), medflowad.__file__
channels, size, levels, steps, hidden, batch = (int(v) for v in sys.argv[2:8])
nhwc, warmup, timed, precision = sys.argv[8] == "nhwc", int(sys.argv[9]), int(sys.argv[10]), sys.argv[11]
torch.manual_seed(0)
config = GlowConfig(in_channels=channels, image_size=(size, size), levels=levels, steps=steps, hidden=hidden)
model = Glow(config).train()
x = torch.rand(batch, channels, size, size)
if nhwc:
    model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
optimizer = torch.optim.Adamax(model.parameters(), lr=1e-5)
def forward():
    if precision == "float32":
        return model(x)
    from medflowad.flows.coupling import coupling_networks_in
    with coupling_networks_in(model, torch.bfloat16):
        return model(x)
def step():
    loss = -forward().log_prob.mean() / config.num_dims
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
for _ in range(warmup):
    step()
started = time.perf_counter()
for _ in range(timed):
    step()
print(json.dumps({"images_per_s": batch * timed / (time.perf_counter() - started)}))
"""


def measure(tree: Path, architecture: tuple[int, ...], layout: str, warmup: int, steps: int,
            precision: str = "float32") -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    args = [str(tree), *map(str, architecture), layout, str(warmup), str(steps), precision]
    done = subprocess.run([sys.executable, "-c", HARNESS, *args], env=env, cwd=tree, capture_output=True,
                          text=True, check=False)
    if done.returncode:
        raise SystemExit(f"measurement in {tree} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="64cc0ab", help="commit to compare with")
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="mri_cpu")
    parser.add_argument("--layouts", nargs="+", choices=("default", "nhwc"), default=["default", "nhwc"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--new-precision", choices=("float32", "bfloat16"), default="float32",
                        help="this checkout's train_precision (the base has none: float32)")
    args = parser.parse_args()
    architecture = ARCHITECTURES[args.architecture]
    commit = subprocess.run(["git", "rev-parse", args.base], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    figures: dict[str, dict[str, list[float]]] = {layout: {"base": [], "new": []} for layout in args.layouts}
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        base_tree.mkdir()
        archive = Path(tmp) / "base.tar"
        subprocess.run(["git", "archive", "-o", str(archive), commit], cwd=REPO, check=True)
        with tarfile.open(archive) as tar:
            tar.extractall(base_tree, filter="data")
        for k in range(args.rounds):
            for layout in args.layouts:
                for name, tree, precision in (("base", base_tree, "float32"), ("new", REPO, args.new_precision)):
                    figures[layout][name].append(measure(tree, architecture, layout, args.warmup, args.steps,
                                                         precision))
                    print(f"round {k + 1} {layout} {name}: {figures[layout][name][-1]:.1f} images/s", flush=True)
    summary = {layout: {"base_median": statistics.median(f["base"]), "new_median": statistics.median(f["new"]),
                        "new_over_base": statistics.median(f["new"]) / statistics.median(f["base"]), **f}
               for layout, f in figures.items()}
    print(json.dumps({"base": commit, "architecture": args.architecture, "batch": architecture[-1],
                      "new_precision": args.new_precision,
                      "cpu_cores": os.cpu_count(), **summary}, indent=2))


if __name__ == "__main__":
    main()
