"""``score --report``: one self-contained report.html for a scored batch.

Per scan: the model's scan score (``scan_score``), its p-value and flag, a montage of axial slices of the scan
with the mask map (``mask_map``: llr, intensity_scan_z, scan_z_and_llr or a normative map) overlaid where it
exceeds the healthy voxel threshold, as in the anomaly mask, and the scan's score on the histogram of the
healthy calibration scans' scores. Figures are PNGs embedded as base64, so the file can be mailed or archived
alone. Slices are shown in radiological convention (patient right on the
image left, anterior up), at the scan's own resolution, with the map as written to the NIfTI file.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # figures without pyplot: no global state, no display needed
from monai.data import MetaTensor

from medflowad.data.scans import PreparedScan, orient_ras, volume_to_display
from medflowad.mri.analysis import flag_resolution_problem
from medflowad.storage import write_text

MONTAGE_SLICES = 12
# What each scan score and mask map is, in the report's words ({top}: the model's top_fraction in percent).
SCORE_MEANINGS = {
    "llr": "the mean of the top {top} of slice log-likelihood ratios (log p of the general model minus log p of "
           "the in-distribution model: higher is less like the healthy scans), nats",
    "intensity_normative": "the mean over the top {top} of slices of each slice's 20 highest normative intensity "
                           "values (how far the intensity lies outside the healthy range at that place, in "
                           "healthy spreads)",
    "intensity_scan_z": "the mean over the top {top} of slices of each slice's share of pixels brighter than 2 "
                        "robust standard deviations above the scan's own brain (averaged with the neighbouring "
                        "slices)",
}
MAP_LABELS = {"llr": "llr above healthy voxel threshold (nats/pixel)",
              "llr_normative": "normative llr z above healthy voxel threshold",
              "last_scale_normative": "normative last-scale z above healthy voxel threshold",
              "intensity_normative": "beyond the healthy intensity range (spreads), above the voxel threshold",
              "intensity_scan_z": "intensity z against the scan's brain, above the voxel threshold",
              "scan_z_and_llr": "min(intensity z, llr z) against the scan's brain, above the voxel threshold"}


@dataclass
class ScanFigures:
    montage: bytes  # PNG
    histogram: bytes  # PNG


def _display_volume(data: np.ndarray, affine: torch.Tensor) -> tuple[np.ndarray, tuple[float, float]]:
    """(Z, rows, cols) radiological slices of a native-grid volume, and the (row, col) pixel spacing."""
    tensor = torch.as_tensor(np.asarray(data, dtype=np.float32))
    volume = MetaTensor(tensor.reshape(1, *tensor.shape[-3:]), affine=affine)
    oriented = orient_ras(volume)
    spacing = np.sqrt((oriented.affine[:3, :3].numpy() ** 2).sum(axis=0))
    return volume_to_display(oriented[0].numpy()), (float(spacing[1]), float(spacing[0]))


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight", facecolor=figure.get_facecolor())
    return buffer.getvalue()


def pick_slices(image: np.ndarray, anomaly: np.ndarray, count: int = MONTAGE_SLICES) -> list[int]:
    """Evenly spaced slices through the head, always including the slice with the most anomaly."""
    occupied = (image > np.percentile(image, 5)).mean(axis=(1, 2))
    candidates = np.nonzero(occupied >= 0.25 * occupied.max())[0] if occupied.max() > 0 else np.arange(len(image))
    chosen = set(candidates[np.linspace(0, len(candidates) - 1, min(count, len(candidates))).round().astype(int)])
    if anomaly.any():
        worst = int(anomaly.sum(axis=(1, 2)).argmax())
        if worst not in chosen:
            chosen.remove(min(chosen, key=lambda z: abs(z - worst)))
            chosen.add(worst)
    return sorted(int(z) for z in chosen)


def scan_figures(prepared: PreparedScan, native_map: np.ndarray, threshold: float, map_name: str, scan_score: float,
                 score_name: str, healthy_scores: np.ndarray, score_threshold: float, title: str) -> ScanFigures:
    """The montage (``native_map``, named ``map_name``, where above ``threshold``) and the calibration
    histogram of the scan score ``score_name`` of one scan."""
    affine = prepared.native.affine
    image, (row_mm, col_mm) = _display_volume(prepared.native[0].numpy(), affine)
    anomaly, _ = _display_volume(native_map, affine)
    above = np.where(anomaly > threshold, anomaly, np.nan)
    slices = pick_slices(image, np.nan_to_num(above, nan=0.0) > 0)
    finite = image[image > 0] if (image > 0).any() else image.ravel()
    low, high = np.percentile(finite, [1, 99.5])
    top = float(np.nanmax(above)) if np.isfinite(above).any() else threshold + 1.0
    columns = min(6, len(slices))
    rows = int(np.ceil(len(slices) / columns))
    figure = Figure(figsize=(2.2 * columns, 2.2 * rows * image.shape[1] * row_mm / (image.shape[2] * col_mm) + 0.4))
    axes = figure.subplots(rows, columns, squeeze=False)
    figure.patch.set_facecolor("black")
    overlay = None
    for ax, z in zip(axes.ravel(), slices, strict=False):
        ax.imshow(image[z], cmap="gray", vmin=low, vmax=high, aspect=row_mm / col_mm, interpolation="nearest")
        overlay = ax.imshow(above[z], cmap="autumn", vmin=threshold, vmax=max(top, threshold + 1e-6), alpha=0.75,
                            aspect=row_mm / col_mm, interpolation="nearest")
        ax.set_title(f"slice {z}", color="white", fontsize=8)
        ax.text(0.02, 0.5, "R", color="cyan", fontsize=8, transform=ax.transAxes, va="center")
        ax.text(0.98, 0.5, "L", color="cyan", fontsize=8, transform=ax.transAxes, va="center", ha="right")
    for ax in axes.ravel():
        ax.axis("off")
    if overlay is not None:
        bar = figure.colorbar(overlay, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01)
        bar.set_label(MAP_LABELS.get(map_name, f"{map_name} above healthy voxel threshold"), color="white",
                      fontsize=8)
        bar.ax.tick_params(colors="white", labelsize=7)
    figure.suptitle(title, color="white", fontsize=10)
    montage = _png(figure)

    figure = Figure(figsize=(5.0, 2.4))
    ax = figure.subplots()
    finite_scores = healthy_scores[np.isfinite(healthy_scores)]
    ax.hist(finite_scores, bins=max(5, min(30, len(finite_scores) // 2)), color="#7a9cc6",
            label=f"healthy calibration scans (n={len(finite_scores)})")
    ax.axvline(score_threshold, color="black", linestyle="--", linewidth=1, label="flag threshold")
    ax.axvline(scan_score, color="#d62728", linewidth=2.5, label="this scan")
    ax.set_xlabel(f"scan score ({score_name})")
    ax.set_ylabel("scans")
    ax.legend(fontsize=7, loc="upper left")
    histogram = _png(figure)
    return ScanFigures(montage, histogram)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.flag { color: #b00; font-weight: bold; }
.error { color: #b00; }
section { border-top: 1px solid #ddd; margin-top: 2em; padding-top: 1em; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
.note { color: #555; font-size: 0.9em; }
"""


def _beyond_range(row: dict) -> str:
    """The share of the brain beyond its healthy range, marked where the scan is unlike every healthy head."""
    share = row.get("beyond_range_share")
    if share is None or not math.isfinite(share):
        return ""
    unlike = ' <span class="flag">unlike healthy heads</span>' if row.get("unlike_healthy") is True else ""
    return f"{100 * share:.1f} %{unlike}"


def write_report(path: Path, rows: list[dict], figures: dict[str, ScanFigures], model_name: str, modality: str,
                 fpr: float, n_healthy: int, score: str = "llr", top_fraction: float = 0.1) -> None:
    """Write report.html atomically from the score rows and each scored scan's figures, about scan score
    ``score`` (the mean of a scan's top ``top_fraction`` of slice scores)."""
    top = f"{100 * top_fraction:g}%"
    e = html.escape
    problem = flag_resolution_problem(n_healthy, fpr)
    problem = f' <b class="flag">Note: {e(problem)}.</b>' if problem else ""
    flagged = sum(1 for r in rows if r.get(f"{score}_flag"))
    failed = sum(1 for r in rows if r["status"] != "ok")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>medflowad report: {len(rows)} scans</title><style>{_STYLE}</style></head><body>",
        "<h1>medflowad anomaly report</h1>",
        f'<p class="note">Model <code>{e(model_name)}</code> ({e(modality)}); written '
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. Scan score: {score}, "
        f"{SCORE_MEANINGS.get(score, 'aggregated over the top {top} of slices').format(top=top)}. p-value (conformal): "
        f"(1 + healthy calibration scans scoring at least as high) / (1 + {n_healthy}). A scan is flagged "
        f"when p &le; {fpr:g}.{problem}</p>",
        f"<p><b>{len(rows)}</b> scans: <b>{flagged}</b> flagged, <b>{failed}</b> failed.</p>",
        "<table><tr><th>scan</th><th>status</th><th>score</th><th>p-value</th><th>flag</th>"
        "<th>flagged voxels</th><th>beyond healthy range</th><th>scored slices</th></tr>",
    ]
    for r in rows:
        sid = e(r["scan_id"])
        if r["status"] == "ok":
            flag = '<span class="flag">yes</span>' if r[f"{score}_flag"] else "no"
            name = f'<a href="#{sid}">{sid}</a>' if r["scan_id"] in figures else sid  # earlier runs' scans: no figures
            parts.append(f'<tr><td>{name}</td><td>ok</td><td>{r[score]:.1f}</td>'
                         f"<td>{r[f'{score}_p']:.3f}</td><td>{flag}</td><td>{r['flagged_voxels']}</td>"
                         f"<td>{_beyond_range(r)}</td>"
                         f"<td>{r['scored_slices']}/{r['slices']}</td></tr>")
        else:
            parts.append(f'<tr><td>{sid}</td><td class="error">failed</td><td colspan="6" class="error">'
                         f"{e(r['error'])}</td></tr>")
    parts.append("</table>")
    for r in rows:
        if r["status"] != "ok" or r["scan_id"] not in figures:
            continue
        sid = e(r["scan_id"])
        verdict = '<span class="flag">flagged</span>' if r[f"{score}_flag"] else "not flagged"
        parts += [
            f'<section id="{sid}"><h2>{sid}</h2>',
            f"<p>score {r[score]:.1f}, p = {r[f'{score}_p']:.3f}: {verdict}. Map: <code>{e(r['map'])}</code>; "
            f"source: <code>{e(r['path'])}</code>.</p>",
            _img(figures[r["scan_id"]].montage, f"{r['scan_id']} axial montage with anomaly map"),
            _img(figures[r["scan_id"]].histogram, f"{r['scan_id']} score on the healthy histogram"),
            "</section>",
        ]
    parts.append("</body></html>")
    write_text(path, "\n".join(parts))
