r"""Normative voxel maps: each location's map value against the healthy range at that location.

Healthy anatomy makes some places systematically less likely than others (edges, ventricles, sulci), far
more than a lesion moves a map, so one threshold for the whole brain flags anatomy. The healthy calibration
scans give every location l a robust centre and spread of a map's values,

.. math:: m_l = \operatorname{median}\{v\},\qquad s_l = 1.4826\,\operatorname{median}|v - m_l|,

over the healthy voxels v at l and its in-plane 3x3 neighbourhood (and the neighbouring levels), since
calibration scans are few. The normative map of a model map is the robust z-score
:math:`(\text{map}_l - m_l) / s_l` (higher: less likely than healthy tissue there).

The intensity can deviate either way (lesions darker or brighter than the tissue at their place), but dark
values are ordinary where CSF may lie (sulci and ventricles, which affine registration does not align), so
a two-sided z flags anatomy. Its normative map is instead the distance beyond the healthy range at the
location, in units of its spread,

.. math:: d_l = \max(x - h_l,\; \ell_l - x,\; 0) / s_l,

with :math:`\ell_l, h_l` the ``RANGE_QUANTILE`` and 100 - ``RANGE_QUANTILE`` percentiles of the healthy
values in a wider neighbourhood (in-plane radius ``RANGE_RADIUS``, and the neighbouring levels): a dark
voxel counts only where no healthy scan is that dark nearby.

A location is (level, row, column) on the model grid. In standard space the level is the slice itself (a
slice index is a brain level in every scan); on a scan's own grid it is the slice's relative position
between the first and the last scored slice, in ``NATIVE_LEVELS`` bins (an approximation: brains cropped
to their extent share rough, not exact, anatomy per pixel). Locations with fewer than ``MIN_VALUES``
healthy values take the map's global centre and spread; spreads are floored at ``SPREAD_FLOOR`` of the
global spread so that a near-constant location cannot blow a z-score up.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import numpy as np

from medflowad.data.scans import PreparedScan

NORMATIVE_MAPS = ("llr", "last_scale", "intensity")  # each gets "<name>_normative"
# No model is fit to the intensity, so its statistics come from every healthy scan, training ones included,
# and its calibration from leaving subjects out (medflowad.mri.calibration.subject_folds).
MODEL_FREE = "intensity"
TOP_PIXELS = 20  # slice score: mean of the slice's highest normative values (20 pixels: about 1.8 cm^2 at 3 mm)
RANGE_QUANTILE = 1.0  # the healthy range of the intensity: its 1st to 99th percentile at the location
RANGE_RADIUS = 2  # in-plane neighbourhood of the range: 5x5 pixels (15 mm at 3 mm pixels)
MAX_SOURCES = 64  # slices pooled per level at most (64 x 25 neighbours = 1,600 values per location)
CALIBRATION_FOLDS = 5  # the intensity's calibration: subjects in at most 5 folds, each against the others
NATIVE_LEVELS = 16
MIN_VALUES = 10
SPREAD_FLOOR = 0.01
MAD_TO_SD = 1.4826
# A scan's share of scored voxels outside their location's healthy range (at any distance). The calibration
# stores it for each healthy scan, measured against the other subjects' range (a few per cent by the range's
# 1st-99th percentiles). A scan above UNLIKE_HEALTHY_FACTOR times the largest of them is unlike every healthy
# calibration head as a whole, not in one place: another scanner, sequence or contrast agent, or widespread
# disease. On protocol D's development split (docs/results.md) healthy left-out heads lay at 1.6-2.4 %, painted
# copies at 1.5-2.6 % and heads simulated with another contrast and shading at 11.8-13.0 %.
BEYOND_SHARE = "beyond_range_share"
UNLIKE_HEALTHY_FACTOR = 2.0
LIMIT_SETTER_FACTOR = 3.0  # calibration scans this far above the median share are pointed out


def calibrated_normative_maps(calibration: dict[str, np.ndarray]) -> tuple[str, ...]:
    """Names of the normative maps (``<map>_normative``) a model's calibration has statistics for."""
    return tuple(f"{name}_normative" for name in NORMATIVE_MAPS if f"normative/{name}/centre" in calibration)


def is_healthy_range(calibration: dict[str, np.ndarray], name: str) -> bool:
    """Whether map ``name``'s normative version is a distance beyond the healthy range (the intensity, in
    calibrations that hold its range) rather than a z-score."""
    return f"normative/{name}/low" in calibration


def slice_levels(prepared: PreparedScan, standard: bool) -> np.ndarray:
    """(Z,) location level of each slice; -1 for slices that are not scored."""
    levels = np.full(prepared.num_slices, -1)
    scored = np.nonzero(prepared.keep)[0]
    if standard:
        levels[scored] = scored
    elif len(scored):
        span = max(scored[-1] - scored[0], 1)
        levels[scored] = np.minimum(((scored - scored[0]) / span * NATIVE_LEVELS).astype(int), NATIVE_LEVELS - 1)
    return levels


def level_count(prepared: PreparedScan, standard: bool) -> int:
    return prepared.num_slices if standard else NATIVE_LEVELS


def robust_centre_spread(values: np.ndarray) -> tuple[float, float]:
    """(median, 1.4826 * median absolute deviation): a robust mean and standard deviation."""
    centre = float(np.median(values))
    return centre, float(MAD_TO_SD * np.median(np.abs(values - centre)))


def _per_level(maps: list[np.ndarray], healthy: list[np.ndarray], levels: list[np.ndarray],
               count: int) -> list[list[np.ndarray]]:
    """Each level's healthy slices (NaN elsewhere), over all scans."""
    per_level: list[list[np.ndarray]] = [[] for _ in range(count)]
    for values, mask, level in zip(maps, healthy, levels, strict=True):
        for z in np.nonzero(level >= 0)[0]:
            per_level[level[z]].append(np.where(mask[z], values[z], np.nan).astype(np.float32))
    return per_level


def _pooled(per_level: list[list[np.ndarray]], level: int, neighbour_levels: bool, radius: int) -> np.ndarray | None:
    """(values, S, S): every healthy value of a location's neighbourhood (in-plane radius, and the
    neighbouring levels), NaN-padded; None when the level has no slice. At most MAX_SOURCES slices, an even
    seeded draw, so that large calibration sets stay fast (the statistics are quantiles)."""
    sources = [*per_level[level]]
    if neighbour_levels:
        sources += [s for near in (level - 1, level + 1) if 0 <= near < len(per_level) for s in per_level[near]]
    if not sources:
        return None
    if len(sources) > MAX_SOURCES:
        keep = np.random.default_rng(level).choice(len(sources), MAX_SOURCES, replace=False)
        sources = [sources[i] for i in sorted(keep)]
    stack = np.stack(sources)
    size = stack.shape[-1]
    padded = np.pad(stack, ((0, 0), (radius, radius), (radius, radius)), constant_values=np.nan)
    offsets = range(-radius, radius + 1)
    return np.concatenate([padded[:, radius + dr: radius + dr + size, radius + dc: radius + dc + size]
                           for dr in offsets for dc in offsets])


def _neighbourhoods(maps: list[np.ndarray], healthy: list[np.ndarray], levels: list[np.ndarray], count: int,
                    neighbour_levels: bool, radius: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(level, pooled values (n, S, S), locations with at least MIN_VALUES of them) for every level that has some."""
    per_level = _per_level(maps, healthy, levels, count)
    for level in range(count):
        pooled = _pooled(per_level, level, neighbour_levels, radius)
        if pooled is None:
            continue
        enough = np.isfinite(pooled).sum(axis=0) >= MIN_VALUES
        if enough.any():
            yield level, pooled, enough


def _everything(maps: list[np.ndarray], healthy: list[np.ndarray]) -> np.ndarray:
    everything = np.concatenate([v[m & np.isfinite(v)] for v, m in zip(maps, healthy, strict=True)])
    if everything.size == 0:
        raise ValueError("no healthy calibration voxels for the normative maps")
    return everything


def fit_normative(maps: list[np.ndarray], healthy: list[np.ndarray], levels: list[np.ndarray], count: int,
                  neighbour_levels: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-location (centre, spread), each (count, S, S), from calibration scans' maps (Z, S, S), their
    healthy-voxel masks (Z, S, S) and slice levels (Z,)."""
    size = maps[0].shape[-1]
    global_centre, global_spread = robust_centre_spread(_everything(maps, healthy))
    floor = max(SPREAD_FLOOR * global_spread, 1e-6)
    centre = np.full((count, size, size), global_centre, dtype=np.float32)
    spread = np.full((count, size, size), max(global_spread, floor), dtype=np.float32)
    for level, pooled, enough in _neighbourhoods(maps, healthy, levels, count, neighbour_levels, radius=1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN locations are handled by `enough`
            median = np.nanmedian(pooled, axis=0)
            mad = MAD_TO_SD * np.nanmedian(np.abs(pooled - median), axis=0)
        centre[level][enough] = median[enough]
        spread[level][enough] = np.maximum(mad[enough], floor)
    return centre, spread


def fit_healthy_range(maps: list[np.ndarray], healthy: list[np.ndarray], levels: list[np.ndarray], count: int,
                      neighbour_levels: bool, radius: int = RANGE_RADIUS) -> tuple[np.ndarray, np.ndarray]:
    """Per-location (low, high), each (count, S, S): the ``RANGE_QUANTILE`` and 100 - ``RANGE_QUANTILE``
    percentiles of the healthy values within ``radius`` pixels (and the neighbouring levels);
    locations with fewer than ``MIN_VALUES`` values take the global percentiles."""
    size = maps[0].shape[-1]
    global_low, global_high = np.percentile(_everything(maps, healthy), [RANGE_QUANTILE, 100 - RANGE_QUANTILE])
    low = np.full((count, size, size), global_low, dtype=np.float32)
    high = np.full((count, size, size), global_high, dtype=np.float32)
    for level, pooled, enough in _neighbourhoods(maps, healthy, levels, count, neighbour_levels, radius):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            bounds = np.nanpercentile(pooled, [RANGE_QUANTILE, 100 - RANGE_QUANTILE], axis=0)
        low[level][enough], high[level][enough] = bounds[0][enough], bounds[1][enough]
    return low, high


def beyond_healthy_range(values: np.ndarray, region: np.ndarray, level: np.ndarray, low: np.ndarray,
                         high: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """(Z, S, S) distance beyond the location's healthy range in units of its spread, either way, inside
    ``region`` (zero there within the range, and elsewhere)."""
    out = np.zeros(values.shape, dtype=np.float32)
    for z in np.nonzero(level >= 0)[0]:
        lz = min(level[z], len(low) - 1)
        beyond = np.maximum(np.maximum(values[z] - high[lz], low[lz] - values[z]), 0.0)
        out[z] = np.where(region[z], beyond / spread[lz], 0.0)
    return out


def beyond_share(beyond: np.ndarray, region: np.ndarray) -> float:
    """Share of ``region``'s voxels whose distance beyond the healthy range (``beyond``) is above zero."""
    return float(np.mean(beyond[region] > 0)) if region.any() else float("nan")


def unlike_healthy_limit(calibration: dict[str, np.ndarray]) -> float | None:
    """The share beyond the healthy range above which a scan is unlike the healthy calibration heads (None for
    calibrations made before the share was stored)."""
    shares = calibration.get(f"scan/{BEYOND_SHARE}")
    return None if shares is None or not len(shares) else UNLIKE_HEALTHY_FACTOR * float(np.max(shares))


def calibration_shares(calibration: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, float]:
    """Each healthy calibration scan's share beyond the others' healthy range, by name (``names`` in the
    order the calibration took the scans, training scans first); empty where the calibration has no shares
    or left a scan without one."""
    shares = calibration.get(f"scan/{BEYOND_SHARE}")
    if shares is None or len(shares) != len(names):
        return {}
    return {name: float(share) for name, share in zip(names, shares, strict=True)}


def limit_setter_note(shares: dict[str, float]) -> str | None:
    """A note when the unlike-healthy limit is set by one calibration scan far beyond the others (its share
    above LIMIT_SETTER_FACTOR times their median): a patient, another protocol or a failed preparation among
    the healthy scans would make the check blind."""
    if len(shares) < 3:
        return None
    name, largest = max(shares.items(), key=lambda item: item[1])
    median = float(np.median(list(shares.values())))
    if not largest > LIMIT_SETTER_FACTOR * median:
        return None
    return (f"{name} lies beyond the other healthy scans' range in {100 * largest:.1f} % of its brain (median "
            f"of the calibration scans {100 * median:.1f} %) and so sets the limit of unlike_healthy "
            f"({100 * UNLIKE_HEALTHY_FACTOR * largest:.1f} %); check that it is healthy and of the same protocol")


def normative_map(values: np.ndarray, region: np.ndarray, level: np.ndarray, centre: np.ndarray,
                  spread: np.ndarray) -> np.ndarray:
    """(Z, S, S) robust z-scores inside ``region`` (zero elsewhere) for a scan with slice levels ``level``."""
    out = np.zeros(values.shape, dtype=np.float32)
    for z in np.nonzero(level >= 0)[0]:
        level_z = min(level[z], len(centre) - 1)
        out[z] = np.where(region[z], (values[z] - centre[level_z]) / spread[level_z], 0.0)
    return out


def slice_top_mean(values: np.ndarray, region: np.ndarray, k: int = TOP_PIXELS) -> np.ndarray:
    """(Z,) mean of the ``k`` highest values of each slice inside ``region`` (all of them when fewer); NaN for
    slices with no region."""
    out = np.full(len(values), np.nan)
    for z in range(len(values)):
        inside = values[z][region[z]]
        if inside.size:
            out[z] = float(np.sort(inside)[-k:].mean())
    return out
