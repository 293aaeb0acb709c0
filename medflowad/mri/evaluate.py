"""Lesion-detection metrics for scans with lesion masks (protocol B of PROTOCOL.md).

Slice level (scored slices; positive = slice whose mask has any lesion voxel): AUROC and AUPRC of the
slice scores ``llr``, ``last_scale``, ``nll`` and of two baselines: ``intensity`` (99th percentile of the
normalised image inside the slice's foreground) and ``position`` (how central the slice lies in the scan,
which knows nothing of the image). Lesions sit mid-brain more often than not while lesion-free slices of
lesion patients gather at the ends of the brain, so a slice score can reach a fair AUROC by recognising
slice position alone. ``auroc_within_position`` counts only pairs of slices from the same eighth of
centrality: a score that only tracks position gets about 0.5 there.
Voxel level, on each scan's native grid inside the foreground of scored slices, pooled over scans:
AUPRC of each map; Dice at the threshold giving the configured false-positive rate on healthy
validation voxels, with the share of these scans' own healthy voxels (brain voxels more than HEALTHY_MARGIN
steps from a lesion) and of their lesion voxels that this threshold flags: the rate the calibration promised,
as these scans realise it; and the best Dice over thresholds, which is tuned on the test labels themselves and
therefore optimistic. Besides the maps that ``score`` writes, each scale's share of the llr map
(``llr_c<i>``) is evaluated; its Dice at the healthy FPR needs a model calibrated with it (NaN otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from medflowad.data.readers import ScanError, absolute_scan_path, load_scan
from medflowad.data.scans import to_native
from medflowad.metrics import stratified_auroc
from medflowad.mri.analysis import SLICE_SCORES, map_names
from medflowad.mri.model import analyse, load_mri_model
from medflowad.mri.normative import calibrated_normative_maps
from medflowad.mri.score import scans_the_model_saw
from medflowad.mri.selection import select_scans
from medflowad.mri.tables import csv_text
from medflowad.prep import companion_path, prepare_volume
from medflowad.prep.stage import mask_on_scan
from medflowad.storage import write_json, write_text

SLICE_BASELINES = ("intensity", "position")  # slice scores that use no model
POSITION_STRATA = 8
# native voxels (6-neighbour steps in 3D) around a lesion that are neither lesion nor healthy; the calibration
# leaves out calibration.LESION_MARGIN model-grid pixels in-plane (3-4 native voxels of an LGG scan)
HEALTHY_MARGIN = 2


def _slice_intensity_score(intensity_map: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    values = np.full(len(intensity_map), np.nan)
    for z in range(len(intensity_map)):
        if foreground[z].any():
            values[z] = np.percentile(intensity_map[z][foreground[z]], 99)
    return values


def position_strata(centrality: np.ndarray) -> np.ndarray:
    """Each slice's eighth of :func:`slice_centrality` (0 .. POSITION_STRATA - 1): slices of about the same brain
    level, for AUROC within position (:func:`medflowad.metrics.stratified_auroc`)."""
    return np.minimum(np.floor(centrality * POSITION_STRATA), POSITION_STRATA - 1)


def slice_centrality(keep: np.ndarray) -> np.ndarray:
    """Per slice: 1 for the middle of the scan's scored slices, falling linearly to 0 at the first and last.

    Measured along the slice axis between the first and the last scored slice; NaN where not scored.
    """
    centrality = np.full(len(keep), np.nan)
    scored = np.nonzero(keep)[0]
    if len(scored) == 1:
        centrality[scored] = 1.0
    elif len(scored) > 1:
        relative = (scored - scored[0]) / (scored[-1] - scored[0])
        centrality[scored] = 1.0 - 2.0 * np.abs(relative - 0.5)
    return centrality


def healthy_voxels(lesion: np.ndarray) -> np.ndarray:
    """Voxels more than HEALTHY_MARGIN 6-neighbour steps from any lesion voxel: a lesion's rim of partial volume
    and unlabelled oedema is neither lesion nor healthy tissue."""
    return ~ndimage.binary_dilation(lesion, iterations=HEALTHY_MARGIN)


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    denominator = prediction.sum() + truth.sum()
    return float(2 * np.logical_and(prediction, truth).sum() / denominator) if denominator else 1.0


def best_dice(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Maximum Dice over all thresholds (from the precision-recall curve): (dice, threshold)."""
    precision, recall, thresholds = precision_recall_curve(truth, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return float(f1[best]), float(thresholds[best]) if len(thresholds) else float("nan")


def evaluate_scans(
    model_dir: Path, inputs: Sequence[str | Path], mask_replace: tuple[str, str], out: Path | None = None,
    pattern: str | None = None, device: str = "auto", batch_size: int = 64, fpr: float | None = None,
    on_scan: Callable[[str], None] | None = None,
) -> dict:
    model = load_mri_model(Path(model_dir), device)
    fpr = model.config.fpr if fpr is None else fpr
    voxel_fpr = model.config.voxel_fpr
    scans = select_scans(inputs, pattern, mask_replace)
    if not scans:
        raise ValueError("no scans with lesion masks found")
    seen = scans_the_model_saw(model.folder)
    leaked = [str(s) for s in scans if absolute_scan_path(s) in seen]
    slice_scores: dict[str, list] = {n: [] for n in (*SLICE_SCORES, *SLICE_BASELINES)}
    slice_labels: list[np.ndarray] = []
    slice_rows: list[dict] = []
    normative = calibrated_normative_maps(model.calibration)
    voxel_scores: dict[str, list] = {n: [] for n in (*map_names(model.config.model.levels), *normative)}
    voxel_labels: list[np.ndarray] = []
    voxel_healthy: list[np.ndarray] = []
    failed = []
    for path in scans:
        try:
            lesion_file = load_scan(companion_path(path, mask_replace))
            prepared = prepare_volume(load_scan(path), model.config.preprocessing, lesion_mask=lesion_file)
            analysis = analyse(model, prepared, batch_size)
            lesion = mask_on_scan(lesion_file, prepared.native)
        except ScanError as exc:
            failed.append({"scan": str(path), "error": str(exc)})
            continue
        keep = prepared.keep
        for name in SLICE_SCORES:
            slice_scores[name].append(analysis.slice_scores[name][keep])
        slice_scores["intensity"].append(
            _slice_intensity_score(analysis.maps["intensity"], prepared.foreground)[keep])
        slice_scores["position"].append(slice_centrality(keep)[keep])
        slice_labels.append(prepared.lesion_slices[keep])
        this_scan = {name: values[-1] for name, values in slice_scores.items()}
        for i, z in enumerate(np.nonzero(keep)[0]):
            slice_rows.append({"scan": str(path), "slice": int(z), "lesion": int(prepared.lesion_slices[z]),
                               **{name: float(v[i]) for name, v in this_scan.items()}})
        scored = prepared.scored
        region = to_native(scored.astype(np.float32), prepared, mode="nearest") > 0.5
        for name, values in voxel_scores.items():
            values.append(to_native(analysis.maps[name], prepared)[region])
        voxel_labels.append(lesion[region])
        voxel_healthy.append(healthy_voxels(lesion)[region])
        if on_scan is not None:
            on_scan(str(path))
    if not slice_labels:
        raise ValueError("no scan could be evaluated: " + "; ".join(f["error"] for f in failed))

    labels = np.concatenate(slice_labels)
    position_stratum = position_strata(np.concatenate(slice_scores["position"]))
    truth, healthy = np.concatenate(voxel_labels), np.concatenate(voxel_healthy)
    result: dict = {"scans": len(slice_labels), "failed": failed, "fpr": fpr, "voxel_fpr": voxel_fpr,
                    "trained_or_calibrated": leaked,
                    "slices": len(labels), "lesion_slices": int(labels.sum()),
                    "voxels": len(truth), "lesion_voxels": int(truth.sum()), "slice": {}, "voxel": {}}
    for name, values in slice_scores.items():
        scores = np.concatenate(values)
        both = len(np.unique(labels)) == 2
        result["slice"][name] = {
            "auroc": float(roc_auc_score(labels, scores)) if both else float("nan"),
            "auprc": float(average_precision_score(labels, scores)) if both else float("nan"),
            "auroc_within_position": stratified_auroc(labels, scores, position_stratum),
        }
    for name, values in voxel_scores.items():
        scores = np.concatenate(values)
        threshold = model.healthy_voxel_threshold(name, fpr)
        # at the model's own voxel FPR, when it sets one (the anomaly mask's threshold)
        mask_threshold = model.healthy_voxel_threshold(name, voxel_fpr) if voxel_fpr is not None else None
        best, best_threshold = best_dice(scores, truth)
        result["voxel"][name] = {
            "auprc": float(average_precision_score(truth, scores)),
            "dice_at_healthy_fpr": dice(scores > threshold, truth) if threshold is not None else float("nan"),
            "threshold": threshold if threshold is not None else float("nan"),
            "healthy_fpr_realised": (float(np.mean(scores[healthy] > threshold))
                                     if threshold is not None and healthy.any() else float("nan")),
            "lesion_share_flagged": (float(np.mean(scores[truth] > threshold))
                                     if threshold is not None and truth.any() else float("nan")),
            "dice_at_voxel_fpr": dice(scores > mask_threshold, truth) if mask_threshold is not None else float("nan"),
            "best_dice_optimistic": best,
            "best_dice_threshold": best_threshold,
        }
    if out is not None:
        write_json(Path(out) / "metrics.json", result)
        write_text(Path(out) / "slices.csv", csv_text(slice_rows, ["scan", "slice", "lesion", *slice_scores]))
        write_text(Path(out) / "table.md", metrics_markdown(result))
    return result


def slice_table(rows: dict[str, dict]) -> list[str]:
    """Markdown lines of the slice-level table."""
    lines = ["| slice score | AUROC | AUPRC | AUROC within position eighths |", "|---|---|---|---|"]
    return lines + [f"| {n} | {m['auroc']:.3f} | {m['auprc']:.3f} | {m['auroc_within_position']:.3f} |"
                    for n, m in rows.items()]


def metrics_markdown(result: dict) -> str:
    lines = [f"Scans: {result['scans']}, scored slices: {result['slices']} ({result['lesion_slices']} with lesion), "
             f"foreground voxels: {result['voxels']} ({result['lesion_voxels']} lesion).", ""]
    if result.get("trained_or_calibrated"):
        lines += [f"**{len(result['trained_or_calibrated'])} of these scans trained or calibrated the model: the "
                  "figures below are not a test of it.**", ""]
    lines += slice_table(result["slice"])
    lines += ["", f"| voxel map | AUPRC | Dice at {result['fpr']:.0%} healthy FPR | healthy / lesion voxels flagged "
              "there | Dice at the model's voxel FPR | best Dice (optimistic, label-tuned) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {m['auprc']:.3f} | {m['dice_at_healthy_fpr']:.3f} | "
              f"{m.get('healthy_fpr_realised', math.nan):.3f} / {m.get('lesion_share_flagged', math.nan):.3f} | "
              f"{m.get('dice_at_voxel_fpr', math.nan):.3f} | {m['best_dice_optimistic']:.3f} |"
              for n, m in result["voxel"].items()]
    return "\n".join(lines) + "\n"
