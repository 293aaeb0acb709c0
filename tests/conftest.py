"""Shared fixtures: tiny synthetic image sets written in the formats medflowad reads."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch


def smooth_images(n: int, size: int = 8, channels: int = 3, seed: int = 0, kind: str = "blobs") -> np.ndarray:
    """(N, H, W, C) uint8 images with structure a flow can learn quickly.

    ``blobs``: a soft bright disc on a dark background; ``stripes``: high-frequency stripes.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.empty((n, size, size, channels), dtype=np.uint8)
    for i in range(n):
        if kind == "blobs":
            cy, cx = rng.uniform(size * 0.3, size * 0.7, 2)
            r = rng.uniform(size * 0.15, size * 0.3)
            img = 40 + 170 / (1 + np.exp(((yy - cy) ** 2 + (xx - cx) ** 2) ** 0.5 - r))
        else:
            period = rng.uniform(1.5, 3.0)
            img = 128 + 100 * np.sin(2 * np.pi * (xx + rng.uniform(0, 3)) / period)
        tint = rng.uniform(0.8, 1.2, channels)
        noisy = img[..., None] * tint + rng.normal(0, 4, (size, size, channels))
        out[i] = np.clip(noisy, 0, 255).astype(np.uint8)
    return out


@pytest.fixture
def blobs_npz(tmp_path: Path) -> Path:
    path = tmp_path / "blobs.npz"
    np.savez(path, images=smooth_images(256, seed=1), labels=np.arange(256) % 2)
    return path


@pytest.fixture
def blobs_test_npz(tmp_path: Path) -> Path:
    path = tmp_path / "blobs_test.npz"
    np.savez(path, images=smooth_images(64, seed=2))
    return path


@pytest.fixture
def stripes_npz(tmp_path: Path) -> Path:
    path = tmp_path / "stripes.npz"
    np.savez(path, images=smooth_images(128, seed=3, kind="stripes"))
    return path


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


def data_root() -> Path | None:
    """Real data for integration tests: MEDFLOWAD_DATA (default ../shared/data beside the repo)."""
    root = Path(os.environ.get("MEDFLOWAD_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    return root if root.is_dir() else None
