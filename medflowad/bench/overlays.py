"""Overlay figures of benchmarks: image, lesion contour and anomaly maps, for the slices with the largest lesions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medflowad.mri.model import analyse, load_mri_model
from medflowad.prep import prepare
from medflowad.storage import atomic_write


def lesion_overlays(model_dir: Path, scans: Sequence[Path], out: Path, count: int, device: str,
                    mask_replace: tuple[str, str], maps: Sequence[tuple[str, str]]) -> list[Path]:
    """One PNG per slice for the ``count`` slices with the largest lesion area (one per scan): the prepared
    image with the lesion's contour, then each ``(title, map name)`` of ``maps`` the model gives over it.
    Returns the files written.

    Each map's colours span its own range on the slice, so panels are not comparable by colour; where the model's
    calibration holds the map's healthy voxels, a dashed contour marks what it flags at the model's ``fpr``
    (the threshold ``evaluate`` measures Dice at), which is comparable from map to map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = load_mri_model(model_dir, device)
    candidates = []
    for path in scans:
        prepared = prepare(path, model.config.preprocessing, mask_replace)
        areas = prepared.lesion.sum(axis=(1, 2)) * prepared.keep
        if areas.max() > 0:
            candidates.append((areas.max(), path, int(areas.argmax()), prepared))
    written = []
    for _, path, z, prepared in sorted(candidates, key=lambda c: -c[0])[:count]:
        analysis = analyse(model, prepared)
        panels = [("image + lesion", None, None)] + [
            (title, analysis.maps[name][z], model.healthy_voxel_threshold(name, model.config.fpr))
            for title, name in maps if name in analysis.maps]
        fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2))
        image = prepared.slices[z, 0].numpy()
        for ax, (title, overlay, threshold) in zip(axes, panels, strict=True):
            ax.imshow(image, cmap="gray")
            if overlay is not None:
                shown = np.ma.masked_where(~prepared.foreground[z], overlay)
                ax.imshow(shown, cmap="inferno", alpha=0.6)
            if threshold is not None:
                flagged = (overlay > threshold) & prepared.foreground[z]
                if flagged.any():
                    ax.contour(flagged.astype(float), levels=[0.5], colors="lime", linewidths=0.8, linestyles="dashed")
            ax.contour(prepared.lesion[z], levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        fig.suptitle(f"{path.name} slice {z} ({model_dir.name}); cyan: lesion, dashed green: flagged at "
                     f"{model.config.fpr:.0%} healthy voxel FPR", fontsize=9)
        fig.tight_layout()
        target = out / f"{path.name.replace('.nii.gz', '')}_slice{z}.png"
        atomic_write(target, lambda tmp, f=fig: f.savefig(tmp, format="png", dpi=90))
        plt.close(fig)
        written.append(target)
    return written

