"""``medflowad bench speed``: how fast medflowad trains and scores on this machine, measured, with the machine.

- Glow throughput per architecture (CPU presets, the paper's, the MRI configs at 64 and 128 pixels): training
  images/s of one optimiser step (forward, backward, Adamax) at the preset's batch, scoring images/s (forward,
  bin-centre inputs), on random pixels (throughput does not depend on content); where the device multiplies
  bfloat16 natively, also training with bfloat16 coupling networks (``train_precision``) in either layout, each in
  a process of its own;
- seconds per 3D scan end to end with the bundled demo model, split by stage: read, prepare, models (both Glows
  and the maps on the model grid), maps back to the scan's grid, write (gzipped NIfTI);
- how the cost grows with the number of scans (1, 4, 16 copies of a sample scan through ``score``);
- DDP scaling of training from 1 to 2 processes (torchrun, gloo on CPU, NCCL on CUDA);
- peak resident memory (and peak GPU memory on CUDA) of each part.

Everything lands in OUT: ``speed.json`` and ``speed.md``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from medflowad.config import ConfigError
from medflowad.devices import native_bfloat16, resolve_device
from medflowad.flows import Glow, GlowConfig
from medflowad.mri.model import MriModel, load_mri_model
from medflowad.storage import write_json, write_text
from medflowad.units import bits_per_dim, to_model_input

SAMPLE_SCAN = "IXI048-HH-1326_t1.nii.gz"  # a real 2 mm head of sample_data/mri (CC BY-SA 3.0)


@dataclass
class SpeedSettings:
    architectures: Sequence[str] = ("cifar10_cpu", "mri_demo", "mri_demo_128", "mri_cpu", "cifar10_paper")
    train_steps: int = 10
    score_images: int = 512
    scan_counts: Sequence[int] = (1, 4, 16)
    ddp_processes: Sequence[int] = (1, 2)
    ddp_steps: int = 20
    device: str = "auto"
    samples: str | None = None  # folder of sample scans (default: sample_data/mri of the repository)

    @classmethod
    def quick(cls, device: str = "auto") -> SpeedSettings:
        """A smoke run of every part in well under a minute (figures too short to quote)."""
        return cls(architectures=("cifar10_cpu",), train_steps=2, score_images=64, scan_counts=(1, 2),
                   ddp_processes=(1, 2), ddp_steps=3, device=device)


def machine(device: torch.device) -> dict:
    return {"cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpu": cpu_model(),
            # whether oneDNN multiplies bfloat16 natively here (AVX512-BF16 or AMX): train_precision's speed
            "cpu_bfloat16": native_bfloat16(torch.device("cpu")), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def _proc_field(path: str, key: str) -> str | None:
    """The value after ``key:`` in a Linux /proc file of "key: value" lines; None where there is none."""
    try:
        with open(path) as lines:
            for line in lines:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform says."""
    return _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine()


def peak_rss_mib() -> float:
    """This process's peak resident memory. Linux: VmHWM of /proc/self/status, which starts afresh at exec; the
    rusage maximum would carry the parent's peak into a process that a large one started (bench speed's
    bfloat16 rows). Elsewhere: the rusage maximum (KiB on Linux, bytes on macOS)."""
    peak_kib = _proc_field("/proc/self/status", "VmHWM")  # "1234 kB"
    if peak_kib is not None:
        return round(int(peak_kib.split()[0]) / 1024, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it times the work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def architecture(name: str) -> tuple[GlowConfig, int, bool]:
    """(model, training batch, channels_last) of a natural-image preset or an MRI config."""
    from medflowad.mri.config import load_mri_config
    from medflowad.presets import load_preset_or_file

    try:
        run = load_preset_or_file(name)
        return run.model, run.optim.batch_size, run.channels_last
    except ConfigError:
        mri = load_mri_config(name)
        return mri.model, mri.batch_size, mri.channels_last


def training_setup(model_config: GlowConfig, batch: int, channels_last: bool, device: torch.device,
                   ) -> tuple[Glow, torch.optim.Optimizer, torch.Tensor]:
    """A seeded Glow in training mode (NHWC if ``channels_last``), its Adamax and one batch of random
    dequantised pixels: what a training-throughput measurement steps on."""
    torch.manual_seed(0)
    model = Glow(model_config).to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adamax(model.parameters(), lr=1e-5)
    shape = (batch, model_config.in_channels, *model_config.image_size)
    x = to_model_input(torch.randint(0, 256, shape, dtype=torch.uint8), torch.rand(shape)).to(device)
    return model, optimizer, x


def glow_throughput(name: str, device: torch.device, steps: int, score_images: int, score_batch: int = 128,
                    layout: str = "config", train_precision: str = "float32") -> dict:
    """Training and scoring images/s of architecture ``name`` (``layout``: config, nhwc or default;
    ``train_precision``: the coupling networks' precision in training steps, RunConfig.train_precision).
    Scoring is float32 whatever the training precision, as in ``score``."""
    from medflowad.flows.coupling import coupling_networks_in, training_dtype
    from medflowad.scores import likelihoods

    model_config, batch, channels_last = architecture(name)
    channels_last = {"config": channels_last, "nhwc": True, "default": False}[layout]
    model, optimizer, x = training_setup(model_config, batch, channels_last, device)
    shape = tuple(x.shape)

    network_dtype = training_dtype(train_precision)

    def step() -> None:
        with coupling_networks_in(model, network_dtype):
            loss = bits_per_dim(model(x).log_prob, model_config.num_dims).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(2):  # ActNorm initialisation and allocator warm-up
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    train_ips = steps * batch / (time.perf_counter() - started)
    score_set = torch.randint(0, 256, (score_images, *shape[1:]), dtype=torch.uint8)
    likelihoods(model, score_set[:score_batch], score_batch)
    sync(device)
    started = time.perf_counter()
    likelihoods(model, score_set, score_batch)
    sync(device)
    return {"architecture": name, "levels": model_config.levels, "steps_per_level": model_config.steps,
            "hidden": model_config.hidden, "image": list(shape[1:]), "train_batch": batch,
            "channels_last": channels_last, "train_precision": train_precision,
            "train_images_per_s": round(train_ips, 1),
            "score_images_per_s": round(score_images / (time.perf_counter() - started), 1),
            "peak_rss_mib": peak_rss_mib()}


def scan_stages(model: MriModel, scans: Sequence[Path], device: torch.device, out: Path) -> dict:
    """Seconds per stage of scoring each scan with ``model``, as ``score`` runs them (median over scans): the
    maps stage resamples every map ``score`` writes to the scan's grid and thresholds the mask, the write stage
    writes them all."""
    from medflowad.data.readers import load_scan
    from medflowad.mri.model import analyse
    from medflowad.mri.score import Thresholds, native_outputs, write_outputs
    from medflowad.prep import prepare_volume

    limits = Thresholds.of(model, model.config.fpr)
    stages: dict[str, list[float]] = {n: [] for n in ("read", "prepare", "models", "maps", "write")}
    first_prepare: list[float] = []
    out.mkdir(parents=True, exist_ok=True)
    for index, scan in enumerate(list(scans) * 2):  # the first round fills the preparation cache and warms up
        clock = _Clock(device)
        volume = clock("read", lambda scan=scan: load_scan(scan))
        prepared = clock("prepare", lambda volume=volume: prepare_volume(volume, model.config.preprocessing))
        analysis = clock("models", lambda prepared=prepared: analyse(model, prepared))
        outputs = clock("maps", lambda prepared=prepared, analysis=analysis: native_outputs(analysis, prepared, limits))
        clock("write", lambda prepared=prepared, outputs=outputs, sid=f"scan{index}": write_outputs(
            out, sid, outputs, prepared, limits))
        written = sorted(outputs)
        volume = prepared = analysis = outputs = None  # freed before the next scan, as ``score`` frees them
        if index >= len(scans):
            for name, seconds in clock.seconds.items():
                stages[name].append(seconds)
        else:
            first_prepare.append(clock.seconds["prepare"])
    median = {name: round(float(np.median(values)), 3) for name, values in stages.items()}
    preprocessing = model.config.preprocessing
    return {"scans": len(scans), "seconds_per_stage": median, "seconds_per_scan": round(sum(median.values()), 3),
            "prepare_uncached_seconds": round(float(np.median(first_prepare)), 3), "peak_rss_mib": peak_rss_mib(),
            "preparation": f"space {preprocessing.space}, brain {preprocessing.brain}",
            "files_written": written}


class _Clock:
    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, {}

    def __call__(self, name: str, work: Callable):
        started = time.perf_counter()
        result = work()
        sync(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        return result


def scan_count_scaling(model: MriModel, scan: Path, counts: Sequence[int], device: torch.device,
                       work: Path) -> list[dict]:
    """Wall seconds of ``score`` (in-process, model loaded once) on 1, 4, 16, ... copies of one scan."""
    from medflowad.mri.score import score_scans

    rows = []
    for count in counts:
        folder = work / f"scans_{count}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(count):
            shutil.copyfile(scan, folder / f"c{k:03d}_{scan.name}")
        score_scans([folder], "demo", work / f"warm_{count}", model=model, device=str(device))  # cache
        started = time.perf_counter()
        score_scans([folder], "demo", work / f"out_{count}", model=model, device=str(device))
        seconds = time.perf_counter() - started
        rows.append({"scans": count, "seconds": round(seconds, 2), "seconds_per_scan": round(seconds / count, 3)})
    return rows


def ddp_scaling(processes: Sequence[int], steps: int, device: torch.device, work: Path) -> list[dict]:
    """Training images/s of the mri_cpu architecture under torchrun with 1, 2, ... processes (random slices)."""
    from medflowad.mri.config import load_mri_config

    mri = load_mri_config("mri_cpu")
    work.mkdir(parents=True, exist_ok=True)
    data = work / "slices.npz"
    size = mri.model.image_size[0]
    np.savez(data, images=np.random.default_rng(0).integers(0, 256, (1024, size, size, 1), dtype=np.uint8))
    config = work / "ddp.yaml"
    config.write_text(yaml.safe_dump({
        "model": mri.model.to_dict(), "data": {"train": str(data), "test_limit": 0},
        "optim": {"steps": steps, "batch_size": mri.batch_size, "warmup_steps": 2, "lr": 2e-4},
        "device": device.type, "checkpoint_every": 10 * steps, "eval_every": 10 * steps, "seed": 0}))
    rows = []
    for count in processes:
        run = work / f"ddp_{count}"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(count),
                   "-m", "medflowad", "train", "-c", str(config), "-o", str(run), "-q"]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        if completed.returncode != 0:
            raise RuntimeError(f"torchrun with {count} processes failed: {completed.stderr[-1500:]}")
        metrics = json.loads((run / "metrics.json").read_text())
        rows.append({"processes": count, "train_images_per_s": round(metrics["images_per_second"], 1),
                     "steps": metrics["steps"], "batch": mri.batch_size})
    return rows


def bfloat16_throughput(name: str, device: torch.device, steps: int, score_images: int, layout: str) -> dict:
    """glow_throughput in ``layout`` with bfloat16 coupling networks in training, in a fresh process: its
    activations are half the size of float32's, so running it among the other rows would change the state of the
    heap they reuse (float32 scoring measured after bfloat16 steps in one process ran at half speed with glibc's
    default thresholds, docs/speed.md)."""
    code = ("import json, sys, torch\nfrom medflowad.bench.speed import glow_throughput\n"
            "print(json.dumps(glow_throughput(sys.argv[1], torch.device(sys.argv[2]), int(sys.argv[3]), "
            "int(sys.argv[4]), layout=sys.argv[5], train_precision='bfloat16')))")
    done = subprocess.run([sys.executable, "-c", code, name, str(device), str(steps), str(score_images), layout],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"bfloat16 throughput of {name} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_speed_bench(settings: SpeedSettings, out: Path, echo: Callable[[str], None] = print) -> dict:
    """Every measurement of the module docstring into OUT/speed.json and OUT/speed.md; returns the result."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device)
    repository = Path(__file__).resolve().parents[2]
    samples = Path(settings.samples) if settings.samples else repository / "sample_data" / "mri"
    scan = samples / SAMPLE_SCAN
    if not scan.is_file():
        raise ValueError(f"{scan}: the sample scan is missing (pass --samples with sample_data/mri's scans)")
    result: dict = {"settings": asdict(settings), "machine": machine(device), "glow": []}
    for name in settings.architectures:
        for layout in ("default", "nhwc"):
            echo(f"glow throughput: {name}, {layout} layout")
            result["glow"].append({**glow_throughput(name, device, settings.train_steps, settings.score_images,
                                                     layout=layout), "layout": layout})
        for layout in ("default", "nhwc") if native_bfloat16(device) else ():  # the fast path, where it pays
            echo(f"glow throughput: {name}, {layout} layout, bfloat16 coupling networks in training")
            result["glow"].append({**bfloat16_throughput(name, device, settings.train_steps, settings.score_images,
                                                         layout), "layout": layout})
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        demo = load_mri_model("demo", str(device))
        echo("seconds per scan, by stage")
        result["scan_stages"] = scan_stages(demo, [scan], device, Path(tmp) / "stages")
        echo(f"scoring {', '.join(map(str, settings.scan_counts))} scans")
        result["scan_scaling"] = scan_count_scaling(demo, scan, settings.scan_counts, device, Path(tmp) / "scaling")
        echo(f"DDP training with {', '.join(map(str, settings.ddp_processes))} processes")
        result["ddp"] = ddp_scaling(settings.ddp_processes, settings.ddp_steps, device, Path(tmp) / "ddp")
    result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None
    write_json(out / "speed.json", result)
    write_text(out / "speed.md", speed_markdown(result))
    return result


def speed_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Machine: {m['cpu_cores']} CPU cores ({m['cpu']}; native bfloat16: "
             f"{'yes' if m['cpu_bfloat16'] else 'no'}), {m['torch_threads']} torch threads, {m['machine']}, torch "
             f"{m['torch']}, device {m['device']}{' (' + m['gpu'] + ')' if m['gpu'] else ''}.", "",
             "| architecture | image | L, K, hidden | batch | layout | training precision | train img/s "
             "| score img/s (float32) | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for g in result["glow"]:
        lines.append(f"| {g['architecture']} | {'x'.join(map(str, g['image']))} | {g['levels']}, "
                     f"{g['steps_per_level']}, {g['hidden']} | {g['train_batch']} | {g['layout']} | "
                     f"{g['train_precision']} | {g['train_images_per_s']} | {g['score_images_per_s']} | "
                     f"{g['peak_rss_mib']} |")
    stages = result["scan_stages"]
    uncached = stages["prepare_uncached_seconds"]
    lines += ["", f"One sample head (2 mm, {SAMPLE_SCAN}) with the demo model, median seconds per stage "
              f"({stages['preparation']}; the first, uncached preparation took {uncached} s):", "",
              "| " + " | ".join(stages["seconds_per_stage"]) + " | total | peak RSS MiB |",
              "|" + "---|" * (len(stages["seconds_per_stage"]) + 2),
              "| " + " | ".join(str(v) for v in stages["seconds_per_stage"].values())
              + f" | {stages['seconds_per_scan']} | {stages['peak_rss_mib']} |", "",
              "| scans scored (one process) | seconds | seconds per scan |", "|---|---|---|"]
    lines += [f"| {r['scans']} | {r['seconds']} | {r['seconds_per_scan']} |" for r in result["scan_scaling"]]
    lines += ["", "| DDP processes (mri_cpu architecture) | training img/s |", "|---|---|"]
    lines += [f"| {r['processes']} | {r['train_images_per_s']} |" for r in result["ddp"]]
    return "\n".join(lines) + "\n"
