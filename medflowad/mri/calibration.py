"""Calibration of an MRI model on its held-apart healthy scans: slice, scan and voxel distributions, and the
per-location statistics of the normative maps (:mod:`medflowad.mri.normative`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from medflowad.data.scans import PreparedScan
from medflowad.mri.analysis import SLICE_SCORES, aggregate, analyse_scan, threshold_at_fpr
from medflowad.mri.normative import NORMATIVE_MAPS, fit_normative, level_count, normative_map, slice_levels

if TYPE_CHECKING:
    from medflowad.mri.model import MriModel

VOXEL_SAMPLE = 200_000  # healthy voxels kept per map type for voxel thresholds
LESION_MARGIN = 2  # model-grid pixels around a lesion that are not healthy calibration voxels


def lesion_zone(prepared: PreparedScan) -> np.ndarray:
    """(Z, S, S) pixels within LESION_MARGIN in-plane 4-neighbour steps of a lesion pixel."""
    in_plane = np.zeros((1, 3, 3), dtype=bool)
    in_plane[0] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_dilation(prepared.lesion > 0, structure=in_plane, iterations=LESION_MARGIN)


def healthy_parts(prepared: PreparedScan) -> tuple[np.ndarray, np.ndarray]:
    """(scored slices without lesion (Z,), scored voxels at least LESION_MARGIN pixels from any lesion (Z, S, S)).

    Without a lesion mask every scored slice and voxel counts as healthy.
    """
    slices = prepared.keep.copy()
    voxels = prepared.foreground & prepared.keep[:, None, None]
    if prepared.lesion is not None:
        slices &= ~prepared.lesion_slices
        voxels &= ~lesion_zone(prepared)
    return slices, voxels


def calibrate(model: MriModel, healthy_val: list[PreparedScan]) -> dict[str, np.ndarray]:
    """Healthy validation distributions of slice scores, scan scores and brain (foreground) voxel map values.

    Calibration scans with lesion masks (held-apart patients) contribute their healthy parts only
    (:func:`healthy_parts`): lesion-free slices, voxels away from the lesion, and a scan score from the
    lesion-free slices; lesion values would raise every threshold meant to bound false positives.
    """
    slice_values: dict[str, list] = {n: [] for n in SLICE_SCORES}
    scan_values: dict[str, list] = {n: [] for n in SLICE_SCORES}
    voxel_values: dict[str, list] = {}
    kept_maps: dict[str, list] = {name: [] for name in NORMATIVE_MAPS}  # for the per-location statistics
    healthy_masks, levels = [], []
    standard = model.config.preprocessing.space == "standard"
    for prepared in healthy_val:
        analysis = analyse_scan(prepared, model.in_model, model.general_model)
        healthy_slices, healthy_voxels = healthy_parts(prepared)
        for name, values in analysis.slice_scores.items():
            kept = np.where(healthy_slices, values, np.nan)
            slice_values[name].append(kept[np.isfinite(kept)])
            scan_values[name].append(aggregate(kept, model.config.top_fraction))
        for name, values in analysis.maps.items():  # MAP_TYPES and the per-scale llr maps
            voxel_values.setdefault(name, []).append(values[healthy_voxels])
        for name in NORMATIVE_MAPS:
            kept_maps[name].append(analysis.maps[name])
        healthy_masks.append(healthy_voxels)
        levels.append(slice_levels(prepared, standard))
    rng = np.random.default_rng(model.config.seed)
    calibration = {}
    count = level_count(healthy_val[0], standard)
    for name in NORMATIVE_MAPS:
        centre, spread = fit_normative(kept_maps[name], healthy_masks, levels, count, neighbour_levels=standard)
        calibration[f"normative/{name}/centre"], calibration[f"normative/{name}/spread"] = centre, spread
        # In-sample: each calibration voxel is one of hundreds of values at its location (neighbourhood pooling).
        voxel_values[f"{name}_normative"] = [
            normative_map(values, mask, level, centre, spread)[mask]
            for values, mask, level in zip(kept_maps[name], healthy_masks, levels, strict=True)]
    for name in SLICE_SCORES:
        calibration[f"slice/{name}"] = np.concatenate(slice_values[name])
        scan = np.asarray(scan_values[name], dtype=np.float64)
        calibration[f"scan/{name}"] = scan[np.isfinite(scan)]  # a scan without healthy slice has no score
    for name, parts in voxel_values.items():
        values = np.concatenate(parts).astype(np.float64)
        if len(values) > VOXEL_SAMPLE:
            values = rng.choice(values, VOXEL_SAMPLE, replace=False)
        calibration[f"voxel/{name}"] = values
    return calibration


def calibration_summary(calibration: dict[str, np.ndarray], fpr: float) -> dict:
    return {
        "fpr": fpr,
        "counts": {k: len(v) for k, v in calibration.items() if not k.startswith("normative/")},
        "thresholds": {k: threshold_at_fpr(v, fpr) for k, v in calibration.items()
                       if len(v) and not k.startswith("normative/")},
    }
