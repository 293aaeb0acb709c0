"""Preparing the next scan while this one is scored (`score --prepare-ahead`, the default): the preparation
really runs ahead, its errors surface at their own scan, and a batch gives the same tables and maps either way."""

from __future__ import annotations

import csv
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medflowad.mri.score import ScanPreparer, score_scans
from tests.mri.conftest import brain_like, oblique_lps_affine, save_nifti


def test_taking_a_scan_starts_the_next_ones_preparation_in_another_thread():
    started: dict[str, threading.Event] = {name: threading.Event() for name in "abc"}
    threads: dict[str, str] = {}

    def prepare_one(path: Path) -> str:
        threads[path.name] = threading.current_thread().name
        started[path.name].set()
        if path.name == "b":
            raise ValueError("b: unreadable")
        return f"prepared {path.name}"

    preparer = ScanPreparer([Path("a"), Path("b"), Path("c")], prepare_one, ahead=True)
    try:
        assert preparer.take() == "prepared a"
        assert started["b"].wait(10)  # b is under way before anyone takes it
        assert threads["b"].startswith("medflowad-prepare")
        assert not started["c"].is_set()  # one scan ahead, no more
        with pytest.raises(ValueError, match="b: unreadable"):  # b's error belongs to b
            preparer.take()
        assert preparer.take() == "prepared c"
    finally:
        preparer.close()
    in_order = ScanPreparer([Path("c"), Path("a")], prepare_one, ahead=False)
    assert in_order.take() == "prepared c" and in_order.pool is None


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_a_batch_scored_with_and_without_preparing_ahead_is_the_same(tiny_mri_model, tmp_path):
    scans = [save_nifti(tmp_path / "one.nii.gz", brain_like(seed=41, blob=(20, 30, 6)), oblique_lps_affine()),
             save_nifti(tmp_path / "empty.nii.gz", np.zeros((48, 56, 14), dtype=np.int16), np.eye(4)),
             save_nifti(tmp_path / "two.nii.gz", brain_like(seed=42), np.diag([0.9, 0.9, 4.0, 1.0]))]
    results = {ahead: score_scans(scans, tiny_mri_model, tmp_path / f"out_{ahead}", device="cpu",
                                  prepare_ahead=ahead) for ahead in (True, False)}
    assert [r["status"] for r in results[True].rows] == ["ok", "error", "ok"]
    ahead, in_turn = (_rows(tmp_path / f"out_{a}" / "scores.csv") for a in (True, False))
    assert ahead == in_turn and "empty.nii.gz" in ahead[1]["error"]
    assert _rows(tmp_path / "out_True" / "slices.csv") == _rows(tmp_path / "out_False" / "slices.csv")
    written = sorted(p.name for p in (tmp_path / "out_True").glob("*.nii.gz"))
    assert written == sorted(p.name for p in (tmp_path / "out_False").glob("*.nii.gz")) and len(written) >= 6
    for name in written:
        a, b = (np.asarray(nib.load(str(tmp_path / f"out_{x}" / name)).dataobj) for x in (True, False))
        assert np.array_equal(a, b), name
