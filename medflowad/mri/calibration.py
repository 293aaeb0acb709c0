"""Calibration of an MRI model on its held-apart healthy scans: slice, scan and voxel distributions, and the
per-location statistics of the normative maps (:mod:`medflowad.mri.normative`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from medflowad.data.scans import PreparedScan
from medflowad.mri.analysis import (
    NORMATIVE_INTENSITY_READS,
    SLICE_SCORES,
    aggregate,
    analyse_scan,
    threshold_at_fpr,
)
from medflowad.mri.landmarks import LANDMARK_PERCENTILES, standard_landmarks, standardise
from medflowad.mri.normative import (
    BEYOND_SHARE,
    CALIBRATION_FOLDS,
    MODEL_FREE,
    NORMATIVE_MAPS,
    beyond_healthy_range,
    beyond_share,
    fit_healthy_range,
    fit_normative,
    level_count,
    normative_map,
    slice_levels,
    slice_top_mean,
)
from medflowad.mri.position import scan_position_classes

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
    voxels = prepared.scored
    if prepared.lesion is not None:
        slices &= ~prepared.lesion_slices
        voxels &= ~lesion_zone(prepared)
    return slices, voxels


def calibrate(model: MriModel, healthy_val: list[PreparedScan], healthy_train: Sequence[PreparedScan] = (),
              subjects: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Healthy validation distributions of slice scores, scan scores and brain (foreground) voxel map values,
    and the per-location statistics of the normative maps.

    Calibration scans with lesion masks (held-apart patients) contribute their healthy parts only
    (:func:`healthy_parts`): lesion-free slices, voxels away from the lesion, and a scan score from the
    lesion-free slices; lesion values would raise every threshold meant to bound false positives.

    The model maps' normative statistics come from ``healthy_val`` alone (the models were fit to the training
    scans, whose maps are too healthy). The intensity's come from ``healthy_train`` and ``healthy_val``
    together, since no model was fit to it; its normative map, slice and scan scores are then calibrated by
    leaving subjects out (``subjects``: one key per scan, training scans first; default: one per scan): each
    scan is measured against statistics of other subjects only (one subject at a time up to five, then
    five folds).
    """
    # every slice score analyse_scan computes; the normative intensity's comes from _model_free_calibration
    slice_values: dict[str, list] = {n: [] for n in SLICE_SCORES if n != f"{MODEL_FREE}_normative"}
    scan_values: dict[str, list] = {n: [] for n in slice_values}
    voxel_values: dict[str, list] = {}
    # the model maps' per-location statistics; the intensity's come from _model_free_calibration
    kept_maps: dict[str, list] = {name: [] for name in NORMATIVE_MAPS if name != MODEL_FREE}
    healthy_masks, levels = [], []
    standard = model.config.preprocessing.space == "standard"
    for prepared in healthy_val:
        analysis = analyse_scan(prepared, model.in_model, model.general_model,
                                classes=scan_position_classes(model.config, prepared), spread=model.config.map_spread)
        healthy_slices, healthy_voxels = healthy_parts(prepared)
        for name in slice_values:
            kept = np.where(healthy_slices, analysis.slice_scores[name], np.nan)
            slice_values[name].append(kept[np.isfinite(kept)])
            scan_values[name].append(aggregate(kept, model.config.top_fraction))
        for name, values in analysis.maps.items():  # every map of map_names()
            voxel_values.setdefault(name, []).append(values[healthy_voxels])
        for name in kept_maps:
            kept_maps[name].append(analysis.maps[name])
        healthy_masks.append(healthy_voxels)
        levels.append(slice_levels(prepared, standard))
    rng = np.random.default_rng(model.config.seed)
    calibration = {}
    count = level_count(healthy_val[0], standard)
    for name in kept_maps:
        centre, spread = fit_normative(kept_maps[name], healthy_masks, levels, count, neighbour_levels=standard)
        calibration[f"normative/{name}/centre"], calibration[f"normative/{name}/spread"] = centre, spread
        # In-sample: each calibration voxel is one of hundreds of values at its location (neighbourhood pooling).
        voxel_values[f"{name}_normative"] = [
            normative_map(values, mask, level, centre, spread)[mask]
            for values, mask, level in zip(kept_maps[name], healthy_masks, levels, strict=True)]
    model_free = _model_free_calibration(list(healthy_train) + list(healthy_val), subjects, standard,
                                         model.config.top_fraction,
                                         NORMATIVE_INTENSITY_READS[model.config.normative_intensity],
                                         model.config.standardise_intensity)
    if model_free:
        voxel_values[f"{MODEL_FREE}_normative"] = model_free.pop("voxel")
        calibration.update(model_free)
    for name in slice_values:
        calibration[f"slice/{name}"] = np.concatenate(slice_values[name])
        scan = np.asarray(scan_values[name], dtype=np.float64)
        calibration[f"scan/{name}"] = scan[np.isfinite(scan)]  # a scan without healthy slice has no score
    for name, parts in voxel_values.items():
        values = np.concatenate(parts).astype(np.float32)  # the maps are float32: nothing is lost
        if len(values) > VOXEL_SAMPLE:
            values = rng.choice(values, VOXEL_SAMPLE, replace=False)
        calibration[f"voxel/{name}"] = values
    return calibration


def subject_folds(subjects: Sequence[str]) -> list[set[str]]:
    """The distinct subjects in at most CALIBRATION_FOLDS folds (one subject each when there are no more),
    dealt out in a fixed seeded order, so that every fold is measured against statistics of the others."""
    distinct = list(dict.fromkeys(subjects))
    order = np.random.default_rng(0).permutation(len(distinct))
    folds = min(CALIBRATION_FOLDS, len(distinct))
    return [{distinct[j] for j in order[k::folds]} for k in range(folds)]


def left_out_beyond_maps(maps: list[np.ndarray], healthy: list[np.ndarray], regions: list[np.ndarray],
                         levels: list[np.ndarray], count: int, standard: bool,
                         subjects: Sequence[str]) -> Iterator[tuple[int, np.ndarray]]:
    """(i, scan i's distance beyond the healthy range) for every scan, the range fitted on the healthy voxels of
    the subjects outside its fold (:func:`subject_folds`), never on its own subject's."""
    for fold in subject_folds(subjects):
        rest = [i for i, s in enumerate(subjects) if s not in fold]
        others = ([maps[i] for i in rest], [healthy[i] for i in rest], [levels[i] for i in rest], count, standard)
        _, spread = fit_normative(*others)
        low, high = fit_healthy_range(*others)
        for i in (i for i, s in enumerate(subjects) if s in fold):
            yield i, beyond_healthy_range(maps[i], regions[i], levels[i], low, high, spread)


def _model_free_calibration(scans: list[PreparedScan], subjects: Sequence[str] | None, standard: bool,
                            top_fraction: float, read: Callable[[PreparedScan], np.ndarray],
                            standardise_intensity: bool = False) -> dict:
    """Normative intensity statistics (centre, spread and healthy range) of the image ``read`` takes from each
    healthy scan (analysis.NORMATIVE_INTENSITY_READS; with ``standardise_intensity`` mapped onto the mean of the
    healthy scans' intensity landmarks, stored as ``normative/intensity/landmarks``), from every healthy scan, and its
    calibration with subjects left out (:func:`subject_folds`: one at a time up to five subjects, then five
    folds): slice and scan scores, healthy voxel values (under "voxel", a list per scan) of
    :func:`~medflowad.mri.normative.beyond_healthy_range`, and each scan's share of healthy voxels beyond the
    range (``scan/beyond_range_share``, :data:`~medflowad.mri.normative.BEYOND_SHARE`). Empty with fewer than
    two subjects: there is no one to leave out against."""
    subjects = list(subjects) if subjects is not None else [str(i) for i in range(len(scans))]
    if len(subjects) != len(scans):
        raise ValueError(f"{len(subjects)} subject keys for {len(scans)} healthy scans")
    if len(set(subjects)) < 2:
        return {}
    maps = [read(p) for p in scans]
    regions = [p.scored for p in scans]
    landmarks = None
    if standardise_intensity:
        landmarks = standard_landmarks(maps, regions)
        maps = [standardise(m, r, landmarks) for m, r in zip(maps, regions, strict=True)]
    parts = [healthy_parts(p) for p in scans]
    levels = [slice_levels(p, standard) for p in scans]
    count = level_count(scans[0], standard)
    healthy = [v for _, v in parts]
    centre, spread = fit_normative(maps, healthy, levels, count, neighbour_levels=standard)
    low, high = fit_healthy_range(maps, healthy, levels, count, neighbour_levels=standard)
    name = f"{MODEL_FREE}_normative"
    result: dict = {f"normative/{MODEL_FREE}/centre": centre, f"normative/{MODEL_FREE}/spread": spread,
                    f"normative/{MODEL_FREE}/low": low, f"normative/{MODEL_FREE}/high": high}
    if landmarks is not None:
        result[f"normative/{MODEL_FREE}/landmarks"] = landmarks
    per_scan: dict[int, tuple[np.ndarray, np.ndarray, float, float]] = {}  # voxels, slices, scan score, share
    for i, values in left_out_beyond_maps(maps, healthy, regions, levels, count, standard, subjects):
        healthy_slices, healthy_voxels = parts[i]
        per_slice = np.where(healthy_slices, slice_top_mean(values, regions[i] & healthy_voxels), np.nan)
        per_scan[i] = (values[healthy_voxels], per_slice[np.isfinite(per_slice)],
                       aggregate(per_slice, top_fraction), beyond_share(values, healthy_voxels))
    in_order = [per_scan[i] for i in range(len(scans))]  # as the scans were given, whatever the folds
    result["voxel"] = [voxels for voxels, _, _, _ in in_order]
    scan = np.array([score for _, _, score, _ in in_order], dtype=np.float64)
    result[f"slice/{name}"] = np.concatenate([per_slice for _, per_slice, _, _ in in_order])
    result[f"scan/{name}"] = scan[np.isfinite(scan)]
    shares = np.array([share for _, _, _, share in in_order], dtype=np.float64)
    result[f"scan/{BEYOND_SHARE}"] = shares[np.isfinite(shares)]
    return result


def validate_calibration(calibration: dict[str, np.ndarray], image_size: int, path: str) -> None:
    """Refuse a calibration file that is not one medflowad wrote for this model: unknown entries, healthy
    score samples that are not 1-D floating-point arrays, per-location statistics that are not finite
    (levels, S, S) arrays on the model's grid, one shape per map."""
    shapes: dict[str, tuple] = {}
    for key, values in calibration.items():
        kind, _, name = key.partition("/")
        if kind not in ("slice", "scan", "voxel", "normative") or not name:
            raise ValueError(f"{path}: unknown entry {key!r} (a calibration holds slice/, scan/, voxel/ and "
                             "normative/ entries)")
        if not np.issubdtype(values.dtype, np.floating):
            raise ValueError(f"{path}: {key} holds {values.dtype} values, not floating point")
        if kind != "normative":
            if values.ndim != 1:
                raise ValueError(f"{path}: {key} has shape {values.shape}, expected one value per healthy sample")
            continue
        map_name = name.split("/")[0]
        if name.endswith("/landmarks"):  # intensity landmarks (medflowad.mri.landmarks): increasing, finite
            if values.shape != (len(LANDMARK_PERCENTILES),) or not np.isfinite(values).all() \
                    or (np.diff(values) < 0).any():
                raise ValueError(f"{path}: {key} has shape {values.shape} or values that are not finite and "
                                 f"increasing, expected {len(LANDMARK_PERCENTILES)} intensity landmarks")
            continue
        if values.ndim != 3 or values.shape[1:] != (image_size, image_size) or not np.isfinite(values).all():
            raise ValueError(f"{path}: {key} has shape {values.shape} or non-finite values, expected finite "
                             f"(levels, {image_size}, {image_size}) statistics on the model grid")
        if shapes.setdefault(map_name, values.shape) != values.shape:
            raise ValueError(f"{path}: {key} has shape {values.shape}, other statistics of {map_name} "
                             f"{shapes[map_name]}")


def calibration_summary(calibration: dict[str, np.ndarray], fpr: float) -> dict:
    return {
        "fpr": fpr,
        "counts": {k: len(v) for k, v in calibration.items() if not k.startswith("normative/")},
        "thresholds": {k: threshold_at_fpr(v, fpr) for k, v in calibration.items()
                       if len(v) and not k.startswith("normative/")},
    }
