"""Shared fixtures: tiny synthetic image sets written in the formats medflowad reads."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from medflowad.data.synthetic import synthetic_images


@pytest.fixture
def blobs_npz(tmp_path: Path) -> Path:
    path = tmp_path / "blobs.npz"
    np.savez(path, images=synthetic_images(size=8, n=256, seed=1), labels=np.arange(256) % 2)
    return path


@pytest.fixture
def blobs_test_npz(tmp_path: Path) -> Path:
    path = tmp_path / "blobs_test.npz"
    np.savez(path, images=synthetic_images(size=8, n=64, seed=2))
    return path


@pytest.fixture
def stripes_npz(tmp_path: Path) -> Path:
    path = tmp_path / "stripes.npz"
    np.savez(path, images=synthetic_images(size=8, n=128, seed=3, kind="stripes"))
    return path


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("preparation_cache")


@pytest.fixture(autouse=True)
def _preparation_cache(_session_cache, monkeypatch):
    """Prepared scans go to a cache of this test session, never to the user's ~/.cache/medflowad."""
    monkeypatch.setenv("MEDFLOWAD_CACHE", str(_session_cache))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


def data_root() -> Path | None:
    """Real data for integration tests: MEDFLOWAD_DATA (default ../shared/data beside the repo)."""
    root = Path(os.environ.get("MEDFLOWAD_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    return root if root.is_dir() else None
