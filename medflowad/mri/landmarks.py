"""Intensity landmark standardisation (Nyul & Udupa, 1999), for the normative intensity.

The preparation normalises each brain by two percentiles, which lines up scans of one scanner and sequence
but not the tissues of another: where grey and white matter fall between 0 and 1 depends on the sequence, so
against healthy heads of one site a healthy head of another is "outside the healthy range" almost
everywhere. Standardising maps a scan's brain histogram onto a standard one: the intensity at each landmark
percentile ``q_k`` of the scan's brain is taken to the standard's landmark ``s_k`` (the mean of the healthy
calibration scans' landmarks), linearly in between,

    f(x) = s_k + (x - q_k) (s_{k+1} - s_k) / (q_{k+1} - q_k)    for q_k <= x <= q_{k+1},

and beyond the first and last landmark with the end segments' slopes, so a lesion brighter than all healthy
tissue stays brighter than it. A lesion is a small part of the brain and moves the landmarks little.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Percentiles of the brain's intensities that are matched: deciles and the preparation's own end points.
LANDMARK_PERCENTILES = (0.5, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 99.5)


def intensity_landmarks(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The intensities at :data:`LANDMARK_PERCENTILES` of ``image[region]`` (float64)."""
    values = image[region]
    if values.size == 0:
        raise ValueError("no voxels in the region to take intensity landmarks from")
    return np.percentile(values.astype(np.float64), LANDMARK_PERCENTILES)


def standard_landmarks(images: Sequence[np.ndarray], regions: Sequence[np.ndarray]) -> np.ndarray:
    """The standard scale: the mean of the scans' landmarks."""
    return np.mean([intensity_landmarks(i, r) for i, r in zip(images, regions, strict=True)], axis=0)


def standardise(image: np.ndarray, region: np.ndarray, standard: np.ndarray) -> np.ndarray:
    """``image`` with its landmarks inside ``region`` mapped piecewise linearly onto ``standard`` (module
    docstring), float32, zero outside ``region``."""
    standard = np.asarray(standard, dtype=np.float64)
    if standard.shape != (len(LANDMARK_PERCENTILES),):
        raise ValueError(f"standard landmarks have shape {standard.shape}, expected ({len(LANDMARK_PERCENTILES)},)")
    # Ties (a brain with large constant parts) would make a segment of zero width: keep the landmarks
    # strictly increasing by a negligible step.
    own = np.maximum.accumulate(intensity_landmarks(image, region)) + 1e-9 * np.arange(len(standard))
    x = image[region].astype(np.float64)
    mapped = np.interp(x, own, standard)
    low_slope = (standard[1] - standard[0]) / (own[1] - own[0])
    high_slope = (standard[-1] - standard[-2]) / (own[-1] - own[-2])
    mapped = np.where(x < own[0], standard[0] + (x - own[0]) * low_slope, mapped)
    mapped = np.where(x > own[-1], standard[-1] + (x - own[-1]) * high_slope, mapped)
    out = np.zeros(image.shape, dtype=np.float32)
    out[region] = mapped
    return out


__all__ = ["LANDMARK_PERCENTILES", "intensity_landmarks", "standard_landmarks", "standardise"]
