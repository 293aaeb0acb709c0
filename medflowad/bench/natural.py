"""Protocol A (PROTOCOL.md): the paper's natural-image experiment at CPU scale.

Trains, or reuses when present, three models in OUT:

- ``general/``: the general distribution, Tiny ImageNet 32x32 (train split);
- ``in/``: CIFAR-10, fine-tuned from ``general/`` (lr 2e-4);
- ``in_outlier/``: the same with the outlier loss against Tiny ImageNet samples.

Then scores the CIFAR-10 test set and every OOD set (Tiny ImageNet val, Flowers, the greyscale brain
MRI 2D Testing split and head CT when the data folder has them, and any added with ``--ood NAME=SPEC``)
with one pass of each model per set, and writes ``results.md``, ``metrics.json`` and two figures (score
histograms per set, AUROC of each scale's contribution).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from medflowad.config import RunConfig, with_overrides
from medflowad.data.natural import load_image_set
from medflowad.devices import resolve_device
from medflowad.evaluation import ordered_scores
from medflowad.metrics import detection_metrics
from medflowad.presets import load_preset_or_file
from medflowad.scores import Likelihoods, likelihoods, png_bits_per_dim, scores_from_likelihoods
from medflowad.storage import load_model, write_json, write_text
from medflowad.training import train
from medflowad.units import bits_per_dim

# Score columns of the table, in order; c_i follow.
TABLE_SCORES = ["nll", "llr", "llr_outlier", "last_scale", "input_complexity"]
# Simpler images than any natural set: greyscale scans, turned into 32x32 RGB like any input. This is the
# kind of set (the paper's SVHN) on which raw likelihood fails. Scored when the data folder holds them.
GREY_OOD_SETS = {"brain_mri_2d": "medical/brain_tumor_mri_2d.zip::Testing", "head_ct": "medical/head_ct"}


@dataclass
class NaturalBenchSettings:
    data: str = "$MEDFLOWAD_DATA"  # kept unexpanded in the run configs, so reruns resume
    preset: str = "cifar10_cpu"
    general_steps: int = 1500
    finetune_steps: int = 750
    finetune_lr: float = 2e-4
    limit: int | None = 2000  # images per evaluation set (None = all)
    device: str = "auto"
    seed: int = 0
    grey_ood: bool = True  # also score GREY_OOD_SETS where present


def _configs(s: NaturalBenchSettings, out: Path) -> dict[str, RunConfig]:
    base = load_preset_or_file(s.preset)
    tin = f"{s.data}/natural/tinyimagenet32.zip"
    cifar = f"{s.data}/natural/cifar10.zip"
    common = {"device": s.device if s.device != "auto" else None, "seed": s.seed if s.seed else None}
    general = with_overrides(base, {"data.train": f"{tin}::train", "data.test": f"{tin}::val",
                                    "optim.steps": s.general_steps, **common})
    finetune = {"data.train": f"{cifar}::train", "data.test": f"{cifar}::test", "optim.steps": s.finetune_steps,
                "optim.lr": s.finetune_lr, "init_from": str(out / "general"), **common}
    in_model = with_overrides(base, finetune)
    outlier = with_overrides(base, {**finetune, "outlier.enabled": True, "general_model": str(out / "general"),
                                    "data.general": f"{tin}::train"})
    return {"general": general, "in": in_model, "in_outlier": outlier}


def run_natural_bench(
    settings: NaturalBenchSettings, out: Path, extra_ood: dict[str, str] | None = None,
    show_progress: bool = True, echo: Callable[[str], None] = print,
) -> dict:
    out = Path(out)
    started = time.perf_counter()
    configs = _configs(settings, out)
    timings = {}
    for name, config in configs.items():
        t0 = time.perf_counter()
        if not (out / name / "model.safetensors").exists():
            echo(f"training {name} ({config.optim.steps} steps)")
        train(config, out / name, show_progress=show_progress)
        timings[f"train_{name}_s"] = round(time.perf_counter() - t0, 1)

    device = resolve_device(settings.device)
    models = {name: load_model(out / name, device)[0] for name in configs}
    shape = dict(channels=configs["in"].model.in_channels, size=configs["in"].model.image_size)
    sets = {"cifar10_test": f"{settings.data}/natural/cifar10.zip::test",
            "tinyimagenet_val": f"{settings.data}/natural/tinyimagenet32.zip::val",
            "flowers": f"{settings.data}/natural/flowers32.zip::all"}
    if settings.grey_ood:
        root = Path(os.path.expandvars(settings.data))
        sets |= {name: f"{settings.data}/{spec}" for name, spec in GREY_OOD_SETS.items()
                 if (root / spec.split("::")[0]).exists()}
    sets |= extra_ood or {}
    num_dims = configs["in"].model.num_dims
    scores: dict[str, dict[str, np.ndarray]] = {}
    bpd: dict[str, dict[str, float]] = {}
    spearman: dict[str, float] = {}
    t0 = time.perf_counter()
    for set_name, spec in sets.items():
        echo(f"scoring {set_name}")
        images = load_image_set(spec, **shape).random_subset(settings.limit, settings.seed).images
        lik: dict[str, Likelihoods] = {name: likelihoods(m, images, 128) for name, m in models.items()}
        set_scores = scores_from_likelihoods(num_dims, lik["in"], lik["general"], png_bits_per_dim(images))
        set_scores["llr_outlier"] = lik["general"].log_prob - lik["in_outlier"].log_prob
        scores[set_name] = set_scores
        bpd[set_name] = {name: float(bits_per_dim(torch.from_numpy(v.log_prob), num_dims).mean())
                         for name, v in lik.items()}
        spearman[set_name] = float(spearmanr(lik["in"].log_prob, lik["general"].log_prob).statistic)
    timings["scoring_s"] = round(time.perf_counter() - t0, 1)

    columns = [s for s in TABLE_SCORES if s in scores["cifar10_test"]] + [
        s for s in ordered_scores(set(scores["cifar10_test"])) if s.startswith("c_")]
    rows = []
    for set_name in sets:
        if set_name == "cifar10_test":
            continue
        for score in columns:
            rows.append({"set": set_name, "score": score,
                         **detection_metrics(scores["cifar10_test"][score], scores[set_name][score])})
    timings["total_s"] = round(time.perf_counter() - started, 1)
    result = {"settings": vars(settings), "rows": rows, "bits_per_dim": bpd, "spearman": spearman,
              "sizes": {k: len(v["nll"]) for k, v in scores.items()}, "timings": timings,
              "device": str(device), "torch_threads": torch.get_num_threads()}
    write_json(out / "metrics.json", result)
    write_text(out / "results.md", natural_markdown(result, columns))
    _plots(scores, rows, columns, out)
    return result


def natural_markdown(result: dict, columns: list[str]) -> str:
    lookup = {(r["set"], r["score"]): r for r in result["rows"]}
    sets = list(dict.fromkeys(r["set"] for r in result["rows"]))
    lines = []
    for metric, title in (("auroc", "AUROC"), ("aupr", "AUPR"), ("fpr95", "FPR at 95 % TPR")):
        lines += [f"### {title} (CIFAR-10 test = negatives)", "", "| OOD set | " + " | ".join(columns) + " |",
                  "|---|" + "---|" * len(columns)]
        lines += [f"| {s} (n={result['sizes'][s]}) | " + " | ".join(f"{lookup[(s, c)][metric]:.3f}" for c in columns)
                  + " |" for s in sets]
        lines.append("")
    models = list(next(iter(result["bits_per_dim"].values())))
    lines += ["### Bits/dim of each model", "", "| set | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    lines += [f"| {s} | " + " | ".join(f"{v[m]:.3f}" for m in models) + " |" for s, v in result["bits_per_dim"].items()]
    lines += ["", "### Spearman rank correlation of log p_in and log p_general", "", "| set | rho |", "|---|---|"]
    lines += [f"| {s} | {rho:.3f} |" for s, rho in result["spearman"].items()]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in result["timings"].items())]
    return "\n".join(lines) + "\n"


def symlog_threshold(in_distribution: np.ndarray, pooled: np.ndarray) -> float | None:
    """Linear range for a symlog axis when the scores span far more than the in-distribution's spread.

    Returns the in-distribution interquartile range when the pooled 0.5-99.5 % span exceeds 30 times it
    (a linear axis would then squash CIFAR-10 into a bin or two), else None (linear axis).
    """
    spread = float(np.subtract(*np.percentile(in_distribution, [75, 25])))
    span = float(np.subtract(*np.percentile(pooled, [99.5, 0.5])))
    return spread if spread > 0 and span > 30 * spread else None


def _plots(scores: dict, rows: list[dict], columns: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medflowad.storage import atomic_write

    shown = [s for s in ("nll", "llr", "llr_outlier", "last_scale") if s in columns]
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.2), squeeze=False)
    for ax, score in zip(axes[0], shown, strict=True):
        pooled = np.concatenate([values[score] for values in scores.values()])
        low, high = np.percentile(pooled, [0.5, 99.5])  # long tails would squash the bulk otherwise
        linthresh = symlog_threshold(scores["cifar10_test"][score], pooled)
        if linthresh is not None:
            ax.set_xscale("symlog", linthresh=linthresh)
        scale = ax.xaxis.get_transform()  # bins of equal width on the axis as drawn
        edges = scale.inverted().transform(np.linspace(*scale.transform(np.array([low, high])), 61))
        for set_name, values in scores.items():
            clipped = np.clip(values[score], edges[0], edges[-1])
            ax.hist(clipped, bins=edges, histtype="step", weights=np.full(len(clipped), 1 / len(clipped)),
                    label=set_name)
        ax.set_title(score)
        ax.set_xlabel("bits/dim" if score == "nll" else "nats (higher = more anomalous)")
    axes[0][0].set_ylabel("share of the set per bin")  # values beyond the span land in the end bins
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(out / "score_histograms.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)

    per_scale = [c for c in columns if c.startswith("c_")]
    sets = list(dict.fromkeys(r["set"] for r in rows))
    lookup = {(r["set"], r["score"]): r["auroc"] for r in rows}
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    width = 0.8 / max(len(sets), 1)
    for i, set_name in enumerate(sets):
        ax.bar(np.arange(len(per_scale)) + i * width, [lookup[(set_name, c)] for c in per_scale], width,
               label=set_name)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(per_scale)) + width * (len(sets) - 1) / 2, per_scale)
    ax.set_ylabel("AUROC")
    ax.set_title("AUROC of each scale's contribution alone")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars reach the top
    fig.tight_layout()
    atomic_write(out / "per_scale_auroc.png", lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
