"""Procedural images with known structure, for the bundled sample data, demos and tests."""

from __future__ import annotations

import numpy as np


def synthetic_images(n: int, size: int = 16, channels: int = 3, seed: int = 0, kind: str = "blobs") -> np.ndarray:
    """(N, H, W, C) uint8 images.

    ``blobs``: one soft bright disc of random centre and radius on a dark background, slightly tinted,
    with mild noise; ``stripes``: vertical sinusoidal stripes of random period and phase, same noise.
    A flow learns blobs within a few hundred steps; stripes are the obvious anomaly.
    """
    if kind not in ("blobs", "stripes"):
        raise ValueError(f"kind must be 'blobs' or 'stripes', got {kind!r}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.empty((n, size, size, channels), dtype=np.uint8)
    for i in range(n):
        if kind == "blobs":
            cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
            radius = rng.uniform(size * 0.15, size * 0.3)
            img = 40 + 170 / (1 + np.exp(np.hypot(yy - cy, xx - cx) - radius))
        else:
            period = rng.uniform(1.5, 3.0)
            img = 128 + 100 * np.sin(2 * np.pi * (xx + rng.uniform(0, 3)) / period)
        tint = rng.uniform(0.8, 1.2, channels)
        noisy = img[..., None] * tint + rng.normal(0, 4, (size, size, channels))
        out[i] = np.clip(noisy, 0, 255).astype(np.uint8)
    return out
