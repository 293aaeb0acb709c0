"""`prepare` killed with SIGKILL mid-batch: every entry folder and table left is whole, and the same command
completes the batch with the results of an uninterrupted run."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medflowad.prep.stage import read_entry
from tests.prep.conftest import head_motion, moved_template_scan, oblique_head_grid
from tests.test_kill import _cli, _finish, _kill_after, _visible_outputs_are_complete, pytestmark  # noqa: F401


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in ("seconds", "cached")} for r in csv.DictReader(f)]


def test_prepare_killed_mid_batch_then_rerun_completes(tmp_path, monkeypatch):
    affine, shape = oblique_head_grid()
    scans = tmp_path / "scans"
    scans.mkdir()
    for i, degrees in enumerate((4.0, 8.0, 12.0)):
        moved_template_scan(scans / f"head{i}.nii.gz", head_motion(degrees), affine, shape)
    command = ["prepare", str(scans), "--space", "standard", "--brain", "auto", "-q", "-o"]
    monkeypatch.setenv("MEDFLOWAD_CACHE", str(tmp_path / "cache_straight"))
    code, output = _finish(_cli([*command, str(tmp_path / "straight")]))
    assert code == 0, output

    monkeypatch.setenv("MEDFLOWAD_CACHE", str(tmp_path / "cache"))  # the subprocesses inherit it
    out = tmp_path / "killed"
    process = _cli([*command, str(out)])
    deadline = time.monotonic() + 120
    while not (out / "preparation.csv").is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _kill_after(process, 1.0), "the batch ended before the kill"
    _visible_outputs_are_complete(out)
    for entry in [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]:
        key = json.loads((entry / "preparation.json").read_text())["key"]
        assert read_entry(entry, key) is not None, entry  # whole entries only
    code, output = _finish(_cli([*command, str(out)]))
    assert code == 0, output
    assert _rows(out / "preparation.csv") == _rows(tmp_path / "straight" / "preparation.csv")
    for i in range(3):  # registration runs multithreaded in ITK: equal up to float rounding (seen: 2e-7)
        for name, tolerance in (("standard.nii.gz", 1e-5), ("brain_mask.nii.gz", 0), ("standard_brain_mask.nii.gz", 0)):
            straight = np.asarray(nib.load(str(tmp_path / "straight" / f"head{i}" / name)).dataobj)
            rerun = np.asarray(nib.load(str(out / f"head{i}" / name)).dataobj)
            np.testing.assert_allclose(rerun, straight, rtol=0, atol=tolerance, err_msg=f"head{i} {name}")
