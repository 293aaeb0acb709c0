"""Helpers of scripts/gpu_check.sh (the GPU check, a few minutes on a machine with NVIDIA GPUs).

    python scripts/gpu_check.py train-config OUT/train.yaml OUT/train.npz   # paper architecture, synthetic data
    python scripts/gpu_check.py scan-rate OUT/scans.json                     # demo model, sample scans, cuda
    python scripts/gpu_check.py precision OUT/precision.json                 # bf16/fp16 autocast vs float32

Everything it needs is in the repository (the bundled demo model, sample_data/, random images); nothing is
downloaded. Each command writes its figures as JSON and prints them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def train_config(config_path: Path, data_path: Path) -> None:
    """The cifar10_paper preset (L=3, K=32, hidden 512, batch 64) on 2,048 random 32x32 images, 60 steps."""
    from medflowad.presets import load_preset_or_file

    rng = np.random.default_rng(0)
    np.savez(data_path, images=rng.integers(0, 256, (2048, 32, 32, 3), dtype=np.uint8))
    values = yaml.safe_load((ROOT / "configs" / "cifar10_paper.yaml").read_text())
    load_preset_or_file("cifar10_paper")  # the preset resolves: the check measures the shipped architecture
    values["data"] = {"train": str(data_path), "test": None, "hflip": True, "translate": 0.1, "test_limit": 0}
    values["optim"].update(steps=60, warmup_steps=10)
    values.update(checkpoint_every=1000, eval_every=1000, device="cuda")
    config_path.write_text(yaml.safe_dump(values))


def scan_rate(out: Path, device: str = "cuda", copies: int = 4) -> dict:
    """Scans per minute of `score` with the demo model on cuda: the sample scans, ``copies`` times over."""
    from medflowad.mri.model import load_mri_model
    from medflowad.mri.score import score_scans

    model = load_mri_model("demo", device)
    with tempfile.TemporaryDirectory() as tmp:
        scans = Path(tmp) / "scans"
        scans.mkdir()
        for k in range(copies):
            for scan in sorted((ROOT / "sample_data" / "mri").glob("*_t1.nii.gz")):
                shutil.copyfile(scan, scans / f"c{k}_{scan.name}")
        score_scans([scans], "demo", Path(tmp) / "warm", model=model, device=device)  # preparation cache, CUDA init
        started = time.perf_counter()
        result = score_scans([scans], "demo", Path(tmp) / "out", model=model, device=device)
        seconds = time.perf_counter() - started
    figures = {"scans": len(result.rows), "seconds": seconds, "scans_per_minute": 60 * len(result.rows) / seconds,
               "device": device}
    if torch.cuda.is_available():
        figures.update(peak_gpu_memory_mb=torch.cuda.max_memory_allocated() / 2**20, gpu=torch.cuda.get_device_name())
    out.write_text(json.dumps(figures, indent=2))
    return figures


def precision(out: Path, device: str = "cuda") -> dict:
    """How far bf16 and fp16 autocast move the demo model's slice scores and maps from float32."""
    from medflowad.mri.analysis import analyse_slices
    from medflowad.mri.model import load_mri_model
    from medflowad.prep import prepare

    model = load_mri_model("demo", device)
    slices = []
    for scan in sorted((ROOT / "sample_data" / "mri").glob("*_t1.nii.gz")):
        prepared = prepare(scan, model.config.preprocessing)
        slices.append(prepared.slices[np.nonzero(prepared.keep)[0]])
    images = torch.cat(slices)
    reference_scores, reference_maps = analyse_slices(images, model.in_model, model.general_model)
    figures: dict = {"slices": len(images)}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with torch.autocast(torch.device(device).type, dtype=dtype):
            scores, maps = analyse_slices(images, model.in_model, model.general_model)
        figures[name] = {
            f"{key}_max_abs_difference": float(np.nanmax(np.abs(scores[key] - reference_scores[key])))
            for key in ("llr", "last_scale", "nll")}
        figures[name]["llr_slice_score_spread"] = float(np.nanstd(reference_scores["llr"]))
        figures[name]["llr_map_max_abs_difference"] = float(np.abs(maps["llr"] - reference_maps["llr"]).max())
        figures[name]["llr_rank_agreement"] = float(np.corrcoef(np.argsort(np.argsort(scores["llr"])),
                                                                np.argsort(np.argsort(reference_scores["llr"])))[0, 1])
    out.write_text(json.dumps(figures, indent=2))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("train-config")
    make.add_argument("config", type=Path)
    make.add_argument("data", type=Path)
    for name in ("scan-rate", "precision"):
        command = sub.add_parser(name)
        command.add_argument("out", type=Path)
        command.add_argument("--device", default="cuda", help="cuda (the check), or cpu for a dry run")
    args = parser.parse_args()
    if args.command == "train-config":
        train_config(args.config, args.data)
    else:
        measure = scan_rate if args.command == "scan-rate" else precision
        print(json.dumps(measure(args.out, args.device), indent=2))


if __name__ == "__main__":
    main()
