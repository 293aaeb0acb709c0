"""Slice scores and voxel maps of one prepared scan, scan aggregation and conformal calibration.

Maps are per-location likelihood contributions on the model grid, spread over the pixels of each location
(a location of scale i covers 2^i x 2^i pixels) as its value divided by those pixels: ``nearest`` evenly
over the block, so a slice's ``llr`` map sums to its ``llr`` score and its ``last_scale`` map to its
``last_scale`` score; ``bilinear`` interpolated between the blocks' centres, which keeps the sums up to the
slice's edge and puts a map's boundaries where the values change rather than on the block grid (see
``MAP_SPREADS``). ``llr_c<i>`` is scale i's share of the ``llr`` map (they add up to it): the finer the
scale, the smaller the region one value describes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from medflowad.data.scans import PreparedScan
from medflowad.flows.glow import Glow
from medflowad.mri.normative import robust_centre_spread
from medflowad.scores import likelihoods, scores_from_likelihoods

# *_fg: the map's mean over the slice's foreground (nats per pixel). Unlike the whole-slice sums, they do
# not grow with the share of predictable background, which varies from slice to slice.
# intensity_normative: the mean of the slice's highest normative intensity values (medflowad.mri.normative);
# intensity_scan_z: the share of the slice bright against its own scan (scan_z_area). Models calibrated before
# either have none (NaN, no p-value).
SLICE_SCORES = ("llr", "llr_fg", "last_scale", "last_scale_fg", "nll", "intensity_normative", "intensity_scan_z")
OPTIONAL_SCORES = ("intensity_normative", "intensity_scan_z")
WHOLE_SLICE_SCORES = ("llr", "last_scale", "nll")
MAP_TYPES = ("llr", "last_scale", "intensity")  # intensity: the normalised image (baseline)
# |robust z| of the normalised image against the scan's own brain: the two-sided intensity baseline of
# PROTOCOL part D (T1 lesions may be darker or brighter than tissue). Older calibrations lack it.
TWO_SIDED_BASELINE = "intensity_abs_z"
# The signed robust z of the normalised image before its clip at 1 against the scan's own brain, smoothed
# in-plane: bright lesions on FLAIR, read per scan (a large tumour compresses its own scan's percentile
# normalisation, so the plain intensity does not put scans on one footing; unclipped, a lesion brighter than
# all tissue outranks the brightest healthy voxels). Chosen on LGG's development split and a blob planted in a
# healthy FLAIR (docs/results.md); older calibrations lack it.
SCAN_Z_MAP = "intensity_scan_z"
SCAN_Z_SIGMA = 1.5  # model-grid pixels
# The slice score of that map: the share of the slice's pixels above SCAN_Z_AREA_LEVEL, averaged with the scored
# slices before and after it (lesions are 3D; a slice at a tumour's edge shows little of it). Chosen on LGG's
# development split by slice AUROC within position among the 99th percentile, maximum, top-k means and areas
# above 1.5-3 (docs/results.md).
SCAN_Z_AREA_LEVEL = 2.0
# The scan z where the flow agrees: min(scan z, the llr map's robust z against the same brain), an AND of the
# two. The scan z follows a lesion's outline and lights bright healthy spots too; the llr covers lesions and
# spills 4-8 pixels past them (its locations are blocks) but stays low on those spots, so the smaller of the two
# keeps the lesion with the scan z's outline. Measured on LGG: development patients (seven outlier-loss flows
# of five settings) and, once, the test patients (docs/results.md); older calibrations lack it.
SCAN_Z_AND_LLR_MAP = "scan_z_and_llr"
# How per-location values become pixels: "nearest" (blocks; models calibrated before 2026-12-06) or "bilinear"
# (chosen on LGG's development split: higher voxel AUPRC for the plain and the outlier-loss model,
# docs/results.md). A model's calibration holds thresholds of the maps it was calibrated with, so the spread is
# part of its config (MriConfig.map_spread).
MAP_SPREADS = ("nearest", "bilinear")


def scale_map_names(levels: int) -> tuple[str, ...]:
    """Names of the per-scale llr maps (``llr_c1`` .. ``llr_cL``), analysed beside MAP_TYPES."""
    return tuple(f"llr_c{i + 1}" for i in range(levels))


def map_names(levels: int) -> tuple[str, ...]:
    """Every map ``analyse_scan`` returns for a model with ``levels`` scales."""
    return (*MAP_TYPES, TWO_SIDED_BASELINE, SCAN_Z_MAP, SCAN_Z_AND_LLR_MAP, *scale_map_names(levels))


@dataclass
class ScanAnalysis:
    slice_scores: dict[str, np.ndarray]  # (Z,) each, NaN on slices that are not scored
    maps: dict[str, np.ndarray]  # (Z, S, S) each, on the model grid, zero outside the foreground; map_names()
    # share of the scored voxels beyond their location's healthy range (medflowad.mri.normative.BEYOND_SHARE);
    # NaN where the model has no healthy range of the intensity
    beyond_range_share: float = math.nan

    def scan_scores(self, top_fraction: float) -> dict[str, float]:
        return {name: aggregate(values, top_fraction) for name, values in self.slice_scores.items()}


def aggregate(slice_scores: np.ndarray, top_fraction: float) -> float:
    """Scan score: mean of the highest ceil(top_fraction * n) scored slices (NaN if none is scored)."""
    values = np.sort(slice_scores[np.isfinite(slice_scores)])[::-1]
    if len(values) == 0:
        return float("nan")
    k = max(1, math.ceil(top_fraction * len(values)))
    return float(values[:k].mean())


def spread_to_pixels(maps: list[np.ndarray], size: int, mode: str = "nearest") -> np.ndarray:
    """(N, size, size): per-scale maps (N, h_i, w_i) upsampled to ``size`` (``mode`` of MAP_SPREADS), each
    divided by its pixels per location, and summed.

    ``bilinear`` places a location's value at its block's centre and interpolates between centres (half-pixel
    centres, ``align_corners=False``; beyond the outermost centres the edge value holds), so a constant map
    stays constant and a map's mass is kept except within half a block of the slice's edge."""
    total = np.zeros((maps[0].shape[0], size, size), dtype=np.float64)
    for m in maps:
        factor = size // m.shape[-1]
        if mode == "nearest":
            total += np.repeat(np.repeat(m, factor, axis=-2), factor, axis=-1) / factor**2
        elif mode == "bilinear":
            coarse = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float64))[:, None]
            total += torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                                     align_corners=False)[:, 0].numpy() / factor**2
        else:
            raise ValueError(f"map spread must be one of {', '.join(MAP_SPREADS)}, got {mode!r}")
    return total


def analyse_slices(
    slices: torch.Tensor, in_model: Glow, general_model: Glow, batch_size: int = 64,
    classes: np.ndarray | None = None, spread: str = "nearest",
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Scores (N,) and maps (N, S, S) for uint8 slices (N, 1, S, S); one pass of each model.

    ``classes`` (N,): each slice's position class for a position-aware in-distribution model
    (:mod:`medflowad.mri.position`); None: the class mixture (slices of unknown level). ``spread``: how
    per-location values become pixels (MAP_SPREADS)."""
    size = slices.shape[-1]
    labels = None if classes is None else torch.as_tensor(np.asarray(classes), dtype=torch.long)
    p_in = likelihoods(in_model, slices, batch_size, keep_maps=True, labels=labels)
    p_g = likelihoods(general_model, slices, batch_size, keep_maps=True)
    scores = scores_from_likelihoods(math.prod(slices.shape[1:]), p_in, p_g)
    per_scale = [g - i for g, i in zip(p_g.maps, p_in.maps, strict=True)]
    maps = {
        "llr": spread_to_pixels(per_scale, size, spread),
        "last_scale": spread_to_pixels([-p_in.maps[-1]], size, spread),
        **{name: spread_to_pixels([m], size, spread)
           for name, m in zip(scale_map_names(len(per_scale)), per_scale, strict=True)},
    }
    return {k: scores[k] for k in WHOLE_SLICE_SCORES}, maps


def analyse_scan(prepared: PreparedScan, in_model: Glow, general_model: Glow, batch_size: int = 64,
                 classes: np.ndarray | None = None, spread: str = "nearest") -> ScanAnalysis:
    """Slice scores and maps of every slice; ``classes`` (Z,): position classes, ``spread``: how per-location
    values become pixels (see :func:`analyse_slices`)."""
    z, size = prepared.num_slices, prepared.slices.shape[-1]
    keep = np.nonzero(prepared.keep)[0]
    slice_scores = {name: np.full(z, np.nan) for name in SLICE_SCORES}
    maps = {name: np.zeros((z, size, size), dtype=np.float32) for name in map_names(in_model.config.levels)}
    if len(keep):
        scores, kept_maps = analyse_slices(prepared.slices[keep], in_model, general_model, batch_size,
                                           None if classes is None else classes[keep], spread)
        for name in WHOLE_SLICE_SCORES:
            slice_scores[name][keep] = scores[name]
        foreground = prepared.foreground[keep]
        pixels = np.maximum(foreground.sum(axis=(1, 2)), 1)
        for name, kept in kept_maps.items():
            maps[name][keep] = kept * foreground
        for name in ("llr", "last_scale"):
            slice_scores[f"{name}_fg"][keep] = maps[name][keep].sum(axis=(1, 2), dtype=np.float64) / pixels
    # Baseline of Meissen et al. (2021): the normalised image itself as the anomaly map.
    maps["intensity"] = intensity_map(prepared)
    scored = prepared.scored
    maps[TWO_SIDED_BASELINE] = np.abs(intensity_scan_z(maps["intensity"], scored))  # on the model's input
    maps[SCAN_Z_MAP] = smoothed_within(intensity_scan_z(unclipped_intensity_map(prepared), scored), scored,
                                       SCAN_Z_SIGMA)
    slice_scores[SCAN_Z_MAP] = scan_z_area(maps[SCAN_Z_MAP], prepared.keep)
    maps[SCAN_Z_AND_LLR_MAP] = np.minimum(maps[SCAN_Z_MAP], intensity_scan_z(maps["llr"], scored))
    return ScanAnalysis(slice_scores, maps)


def scan_z_area(scan_z: np.ndarray, keep: np.ndarray, level: float = SCAN_Z_AREA_LEVEL) -> np.ndarray:
    """(Z,) per scored slice: the share of its S x S pixels where ``scan_z`` exceeds ``level``, averaged with
    the scored slices next to it in order (the first and last count themselves twice); NaN where not scored.

    The share is of the whole model grid, not of the slice's brain, so a small brain section at the top of
    the head does not score high for a few bright pixels.
    """
    out = np.full(len(scan_z), np.nan)
    scored = np.nonzero(keep)[0]
    if len(scored) == 0:
        return out
    out[scored] = mean_with_neighbours((scan_z[scored] > level).mean(axis=(1, 2), dtype=np.float64))
    return out


def mean_with_neighbours(values: np.ndarray) -> np.ndarray:
    """(N,) each value averaged with the one before and after it; the first and last count themselves twice."""
    padded = np.pad(values, 1, mode="edge")
    return (padded[:-2] + padded[1:-1] + padded[2:]) / 3


def intensity_map(prepared: PreparedScan) -> np.ndarray:
    """(Z, S, S) the normalised image (0-1) inside the foreground, zero outside."""
    return prepared.slices[:, 0].numpy().astype(np.float32) / 255.0 * prepared.foreground


def unclipped_intensity_map(prepared: PreparedScan) -> np.ndarray:
    """(Z, S, S) the normalised image before its clip at 1 inside the foreground, zero outside; the clipped
    image (:func:`intensity_map`) where the preparation did not keep it."""
    if prepared.unclipped is None:
        return intensity_map(prepared)
    return (prepared.unclipped * prepared.foreground).astype(np.float32)


# Which image the intensity's healthy range (its normative map) reads: the model's input, clipped at 1, or the
# normalised image before the clip, where a lesion brighter than the brightest healthy tissue keeps its
# brightness. The presets say "unclipped" (chosen on protocol D's development split, docs/results.md); a model
# folder without the key was calibrated on the clipped image and keeps it (MriConfig.normative_intensity).
NORMATIVE_INTENSITY_READS = {"clipped": intensity_map, "unclipped": unclipped_intensity_map}


def intensity_scan_z(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """(image - median) / (1.4826 MAD) with median and MAD over ``region`` (zero outside it).

    The median and MAD of a brain are those of its healthy tissue while lesions fill less than half of it.
    """
    out = np.zeros(image.shape, dtype=np.float32)
    values = image[region]
    if values.size == 0:
        return out
    centre, spread = robust_centre_spread(values)
    out[region] = (values - centre) / max(spread, 1e-6)
    return out


def smoothed_within(image: np.ndarray, region: np.ndarray, sigma: float) -> np.ndarray:
    """(Z, S, S) in-plane Gaussian smoothing (``sigma`` pixels) that averages over ``region`` only, zero outside.

    sum_j g_ij r_j x_j / sum_j g_ij r_j: a normalised convolution, so values at the brain's edge are not pulled
    towards the zeros outside it, and a map constant inside the region stays constant.
    """
    weight = ndimage.gaussian_filter(region.astype(np.float32), (0, sigma, sigma))
    total = ndimage.gaussian_filter(np.where(region, image, 0.0).astype(np.float32), (0, sigma, sigma))
    return np.where(region, total / np.maximum(weight, 1e-6), 0.0).astype(np.float32)


def conformal_p_value(score: float, calibration: np.ndarray) -> float:
    """(1 + #{healthy calibration scores >= score}) / (1 + n): valid under exchangeability."""
    if not np.isfinite(score):
        return float("nan")
    return float((1 + np.count_nonzero(calibration >= score)) / (1 + len(calibration)))


def threshold_at_fpr(calibration: np.ndarray, fpr: float) -> float:
    """Smallest threshold t with at most ``fpr`` of healthy calibration scores strictly above t."""
    values = np.sort(calibration[np.isfinite(calibration)])
    if len(values) == 0:
        raise ValueError("empty calibration set")
    index = min(len(values) - 1, math.ceil((1 - fpr) * len(values)) - 1)
    return float(values[max(index, 0)])


def flag_resolution_problem(n_calibration: int, fpr: float) -> str | None:
    """Why no scan can be flagged, if the calibration set is too small for ``fpr`` (else None).

    The smallest conformal p-value is 1 / (1 + n), so flags at rate ``fpr`` need n >= 1/fpr - 1.
    """
    smallest = 1 / (1 + n_calibration)
    if smallest <= fpr:
        return None
    return (f"with {n_calibration} healthy calibration scans no p-value is below {smallest:.3f}, so no scan can be "
            f"flagged at FPR {fpr:g}: calibrate on at least {math.ceil(1 / fpr - 1)} healthy scans or raise the FPR")
