"""Protocol D pieces: the fixed IXI split, the held-apart test set with painted copies, scan-level metrics."""

import json

import nibabel as nib
import numpy as np
import pytest

from medflowad.bench.mri import read_split
from medflowad.bench.t1 import make_test_set, scan_metrics
from tests.conftest import data_root


def test_the_shipped_split_holds_two_subjects_apart():
    split = read_split(None, "ixi_t1_split.tsv")
    assert len(split["train"]) == 5 and len(split["test"]) == 2
    assert not set(split["train"]) & set(split["test"])


def test_scan_metrics_rank_painted_against_healthy_and_count_flags():
    rows = [{"scan_id": "a_t1", "status": "ok", "llr": 1.0, "llr_flag": False},
            {"scan_id": "a-painted1_t1", "status": "ok", "llr": 3.0, "llr_flag": True},
            {"scan_id": "a-painted2_t1", "status": "ok", "llr": 0.5, "llr_flag": False},
            {"scan_id": "b_t1", "status": "ok", "llr": 2.0, "llr_flag": True},
            {"scan_id": "c_t1", "status": "error"}]
    for row in rows[:4]:
        for name in ("llr_fg", "last_scale", "last_scale_fg", "nll", "intensity_normative"):
            row[name], row[f"{name}_flag"] = row["llr"], row["llr_flag"]
    result = scan_metrics(rows, "too few calibration scans")
    assert (result["healthy"], result["painted"]) == (2, 2)
    # pairs (painted, healthy): 3>1, 3>2, 0.5<1, 0.5<2 -> 2 of 4
    assert result["scores"]["llr"] == {"auroc": 0.5, "flagged_painted": 1, "flagged_healthy": 1}
    assert result["flag_note"] == "too few calibration scans"
    assert np.isnan(result["scores"]["intensity_scan_z"]["auroc"])  # not in the rows: a score not calibrated


def test_held_apart_test_set_keeps_healthy_copies_and_paints_inside_the_brain(tmp_path):
    root = data_root()
    if root is None or not (root / "medical" / "ixi_t1_2mm").is_dir():
        pytest.skip("real IXI data not found (set MEDFLOWAD_DATA)")
    ixi = root / "medical" / "ixi_t1_2mm"
    subject = read_split(None, "ixi_t1_split.tsv")["test"][0]
    records = make_test_set(ixi, [subject], tmp_path, copies=1, lesions=2, seed=0)
    source = nib.load(str(ixi / f"{subject}_T1.nii.gz"))
    healthy = nib.load(str(tmp_path / f"{subject}_t1.nii.gz"))
    assert np.array_equal(healthy.get_fdata(), source.get_fdata())
    assert not np.asarray(nib.load(str(tmp_path / f"{subject}_t1_mask.nii.gz")).dataobj).any()
    painted = nib.load(str(tmp_path / records[1]["painted"]))
    mask = np.asarray(nib.load(str(tmp_path / records[1]["mask"])).dataobj).astype(bool)
    brain = np.asarray(nib.load(str(ixi / f"{subject}_dlmuse.nii.gz")).dataobj) > 0
    np.testing.assert_allclose(painted.affine, source.affine)
    assert mask.sum() == records[1]["lesion_voxels"] > 0 and not (mask & ~brain).any()
    changed = np.abs(painted.get_fdata() - source.get_fdata()) > 1  # int16 rounding aside
    assert changed[mask].mean() > 0.9 and not changed[~brain].any()
    listed = json.loads((tmp_path / "lesions.json").read_text())
    assert [r["painted"] for r in listed["scans"]] == [None, records[1]["painted"]]
