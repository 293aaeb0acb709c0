"""Out-of-distribution evaluation of natural-image models: every score on every set, one table."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from scipy.stats import spearmanr

from medflowad.data.natural import load_image_set
from medflowad.devices import resolve_device
from medflowad.metrics import detection_metrics
from medflowad.scores import Likelihoods, compute_scores
from medflowad.storage import atomic_write, load_model, write_json, write_text
from medflowad.units import bits_per_dim

# Order of score columns in reports; scores absent for a run (no general model) are left out.
SCORE_ORDER = ["nll", "llr", "last_scale", "input_complexity", "nll_general"]


@dataclass
class EvaluationReport:
    rows: list[dict] = field(default_factory=list)  # set, score, auroc, aupr, fpr95
    bits_per_dim: dict[str, dict[str, float]] = field(default_factory=dict)  # set -> model -> bpd
    spearman: dict[str, float] = field(default_factory=dict)  # set -> rho(log p_in, log p_g)
    sizes: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # set -> undecodable files, with reasons
    seconds: float = 0.0

    def to_markdown(self) -> str:
        scores = ordered_scores({r["score"] for r in self.rows})
        sets = list(dict.fromkeys(r["set"] for r in self.rows))
        lookup = {(r["set"], r["score"]): r for r in self.rows}
        lines = []
        for metric in ("auroc", "aupr", "fpr95"):
            lines += [f"### {metric.upper()}", "", "| OOD set | " + " | ".join(scores) + " |",
                      "|---|" + "---|" * len(scores)]
            for name in sets:
                cells = [f"{lookup[(name, s)][metric]:.3f}" for s in scores]
                lines.append(f"| {name} (n={self.sizes[name]}) | " + " | ".join(cells) + " |")
            lines.append("")
        lines += ["### Bits/dim", "", "| set | " + " | ".join(next(iter(self.bits_per_dim.values()))) + " |",
                  "|---|" + "---|" * len(next(iter(self.bits_per_dim.values())))]
        for name, per_model in self.bits_per_dim.items():
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in per_model.values()) + " |")
        for name, reasons in self.skipped.items():
            lines += ["", f"{name}: {len(reasons)} image file(s) could not be decoded and are not in the figures "
                      "(metrics.json lists them)."]
        if self.spearman:
            lines += ["", "### Spearman rank correlation of log p_in and log p_g", "",
                      "| set | rho |", "|---|---|"]
            lines += [f"| {name} | {rho:.3f} |" for name, rho in self.spearman.items()]
        return "\n".join(lines) + "\n"


def ordered_scores(names: set[str]) -> list[str]:
    """Score names in report order: the named scores first, then c_1, c_2, ... by scale."""
    per_scale = sorted((n for n in names if n.startswith("c_")), key=lambda n: int(n[2:]))
    return [s for s in SCORE_ORDER if s in names] + per_scale


def evaluate_ood(
    model_dir: Path, in_spec: str, ood_specs: dict[str, str], general_model_dir: Path | None = None,
    out_dir: Path | None = None, batch_size: int = 128, device: str = "auto", limit: int | None = None,
    input_complexity: bool = True, seed: int = 0, show_progress: bool = True, only: list[str] | None = None,
) -> EvaluationReport:
    """Score the in-distribution test set and each OOD set; metrics per (OOD set, score).

    ``only`` restricts the reported scores (all that the models allow by default).
    """
    if not ood_specs:
        raise ValueError("give at least one out-of-distribution set")
    started = time.perf_counter()
    dev = resolve_device(device)
    in_model, in_cfg = load_model(Path(model_dir), dev)
    general = None
    if general_model_dir is not None:
        general, general_cfg = load_model(Path(general_model_dir), dev)
        if general_cfg.model.image_size != in_cfg.model.image_size or \
                general_cfg.model.in_channels != in_cfg.model.in_channels:
            raise ValueError(f"{general_model_dir}: general model input differs from {model_dir}")
    shape = dict(channels=in_cfg.model.in_channels, size=in_cfg.model.image_size)
    sets = {"in": load_image_set(in_spec, **shape).random_subset(limit, seed)}
    for name, spec in ood_specs.items():
        if name == "in":
            raise ValueError("'in' is reserved for the in-distribution set; rename that OOD set")
        sets[name] = load_image_set(spec, **shape).random_subset(limit, seed)

    passes = 2 if general is not None else 1
    total = passes * sum(len(s) for s in sets.values())
    report = EvaluationReport()
    all_scores: dict[str, dict[str, np.ndarray]] = {}
    progress = Progress(TextColumn("[bold]score {task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), disable=not show_progress)
    with progress:
        task = progress.add_task("", total=total)
        for name, data in sets.items():
            progress.update(task, description=name)
            scores, p_in, p_g = compute_scores(
                data.images, in_model, general, batch_size, input_complexity,
                progress=lambda n: progress.advance(task, n),
            )
            all_scores[name] = scores
            report.sizes[name] = len(data)
            if data.skipped:
                report.skipped[name] = data.skipped
            report.bits_per_dim[name] = _bpd_summary(p_in, p_g, in_cfg.model.num_dims)
            if p_g is not None:
                report.spearman[name] = float(spearmanr(p_in.log_prob, p_g.log_prob).statistic)
    available = ordered_scores(set(all_scores["in"]))
    reported = available if not only else list(dict.fromkeys(only))
    unknown = [s for s in reported if s not in available]
    if unknown:
        raise ValueError(f"score(s) {', '.join(unknown)} not available here (available: {', '.join(available)})")
    for name in ood_specs:
        for score in reported:
            metrics = detection_metrics(all_scores["in"][score], all_scores[name][score])
            report.rows.append({"set": name, "score": score, **metrics})
    report.seconds = time.perf_counter() - started

    if out_dir is not None:
        out_dir = Path(out_dir)
        write_json(out_dir / "metrics.json", {
            "model": str(model_dir), "general_model": str(general_model_dir) if general_model_dir else None,
            "in_distribution": in_spec, "ood": ood_specs, "limit": limit, "rows": report.rows,
            "bits_per_dim": report.bits_per_dim, "spearman": report.spearman, "sizes": report.sizes,
            "skipped": report.skipped, "seconds": report.seconds, "device": str(dev),
        })
        write_text(out_dir / "table.md", report.to_markdown())
        for name, scores in all_scores.items():
            atomic_write(out_dir / f"scores_{name}.npz", lambda tmp, s=scores: _save_npz(tmp, s))
    return report


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _bpd_summary(p_in: Likelihoods, p_g: Likelihoods | None, num_dims: int) -> dict[str, float]:
    out = {"in_model": float(bits_per_dim(torch.from_numpy(p_in.log_prob), num_dims).mean())}
    if p_g is not None:
        out["general_model"] = float(bits_per_dim(torch.from_numpy(p_g.log_prob), num_dims).mean())
    return out
