"""`score` killed with SIGKILL mid-batch (inside a map's write, then at a random moment): every visible file is
whole, and `score --continue` gives the tables and maps of an uninterrupted run."""

from __future__ import annotations

import csv
import random
import signal
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.test_kill import (  # noqa: F401 (pytestmark and the scans fixture apply here too)
    _cli,
    _finish,
    _kill_after,
    _visible_outputs_are_complete,
    pytestmark,
    scans,
)


def _score_rows(folder: Path) -> list[dict]:
    with open(folder / "scores.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.mark.usefixtures("scans")  # six scans in tmp_path/scans
def test_score_killed_mid_batch_leaves_whole_files_and_continue_gives_the_same_results(tiny_mri_model, tmp_path):
    base = ["score", str(tmp_path / "scans"), "-m", str(tiny_mri_model), "--device", "cpu", "-q", "-o"]
    code, output = _finish(_cli([*base, str(tmp_path / "straight")]))
    assert code == 0, output
    out = tmp_path / "killed"
    # killed inside the write of the fourth map file, then at a random moment of the rerun
    code, _ = _finish(_cli([*base, str(out)], kill_name="_anomaly", kill_at=4))
    assert code == -signal.SIGKILL
    _visible_outputs_are_complete(out)
    process = _cli([*base, str(out), "--continue"])
    deadline = time.monotonic() + 120
    while not list(out.glob("s4_*.nii.gz")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    _kill_after(process, random.Random(3).uniform(0.0, 0.3))
    _visible_outputs_are_complete(out)
    code, output = _finish(_cli([*base, str(out), "--continue"]))
    assert code == 0, output
    assert _score_rows(out) == _score_rows(tmp_path / "straight")
    assert not list(out.glob(".s*.nii.gz.*.tmp"))  # the rerun cleared the killed writes' temporary files
    for path in sorted((tmp_path / "straight").glob("*.nii.gz")):
        assert np.array_equal(np.asarray(nib.load(str(path)).dataobj),
                              np.asarray(nib.load(str(out / path.name)).dataobj)), path.name
