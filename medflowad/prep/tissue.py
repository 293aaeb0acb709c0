"""Tissue classes of a brain's intensities, and the voxels that fit none of them."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.cluster import KMeans

TISSUE_NAMES = ("csf", "grey", "white")  # T1 order: darkest to brightest
FIT_VOXELS = 200_000  # k-means sees at most this many brain voxels (seeded draw); every voxel is labelled


def tissue_classes(image: np.ndarray, brain: np.ndarray, seed: int = 0) -> tuple[np.ndarray, dict[str, float]]:
    """(labels, means): 0 outside the brain, 1 CSF, 2 grey, 3 white matter by a 3-class k-means of the
    brain's intensities (T1 contrast: CSF darkest, white matter brightest); means per class."""
    values = image[brain].reshape(-1, 1).astype(np.float64)
    if values.size < 30:
        raise ValueError(f"the brain mask holds {values.size} voxels, too few to find tissue classes")
    subsampled = len(values) > FIT_VOXELS
    fitted = values[np.random.default_rng(seed).choice(len(values), FIT_VOXELS, replace=False)] if subsampled \
        else values
    kmeans = KMeans(n_clusters=3, n_init=4, random_state=seed).fit(fitted)
    order = np.argsort(kmeans.cluster_centers_[:, 0])
    rank = np.empty(3, dtype=np.int64)
    rank[order] = np.arange(1, 4)
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[brain] = rank[kmeans.predict(values) if subsampled else kmeans.labels_]
    means = {name: float(kmeans.cluster_centers_[order[i], 0]) for i, name in enumerate(TISSUE_NAMES)}
    return labels, means


def beyond_tissues(image: np.ndarray, brain: np.ndarray, spacing: np.ndarray, spreads: float = 3.0,
                   margin_mm: float = 4.0) -> np.ndarray:
    """Brain voxels brighter than the brightest tissue class's mean by ``spreads`` of its standard deviation,
    or darker than the darkest's by as much, grown by ``margin_mm``: what no tissue class explains, such as
    a lesion brighter than white matter on T1 (a lesion between the classes is not found)."""
    labels, means = tissue_classes(image, brain)
    darkest, brightest = image[labels == 1], image[labels == 3]
    high = means[TISSUE_NAMES[-1]] + spreads * float(brightest.std())
    low = means[TISSUE_NAMES[0]] - spreads * float(darkest.std())
    outside = brain & ((image > high) | (image < low))
    radius = np.maximum(np.round(margin_mm / np.asarray(spacing, dtype=float)).astype(int), 0)
    if outside.any() and radius.any():
        ball = np.sum((np.indices(2 * radius + 1) - radius[:, None, None, None]) ** 2
                      / np.maximum(radius, 1)[:, None, None, None] ** 2, axis=0) <= 1
        outside = ndimage.binary_dilation(outside, structure=ball) & brain
    return outside
