"""Which healthy scans train and which calibrate (drawn by subject or visit), and the modality a scan's name
states."""

from pathlib import Path

import numpy as np
import pytest

from medflowad.data.readers import split_series
from medflowad.mri.config import MriConfig
from medflowad.mri.selection import modality_in_name, split_healthy_scans
from tests.mri.conftest import brain_like, save_nifti, write_dicom_series


def _scans(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        (folder / f"s{i:02d}_flair.nii.gz").touch()  # listing only: nothing is read
    return folder


def test_calibration_seed_fixes_the_draw_while_the_training_seed_varies(tmp_path):
    folder = _scans(tmp_path / "healthy", 20)
    train0, val0 = split_healthy_scans([folder], MriConfig(seed=0))
    assert len(val0) == 4 and len(train0) == 16 and not set(train0) & set(val0)  # val_fraction 0.2, by scan
    # The training seed moves the draw by default ...
    assert any(split_healthy_scans([folder], MriConfig(seed=s))[1] != val0 for s in range(1, 4))
    for s in range(1, 4):  # ... and calibration_seed pins it
        assert split_healthy_scans([folder], MriConfig(seed=s, calibration_seed=0)) == (train0, val0)
    assert split_healthy_scans([folder], MriConfig(seed=0, calibration_seed=5)) == \
        split_healthy_scans([folder], MriConfig(seed=5))


def test_series_of_one_dicom_folder_are_drawn_together(tmp_path):
    """Two series of one visit never end up one in training and one in calibration."""
    volume = save_nifti(tmp_path / "v.nii.gz", brain_like(shape=(12, 12, 4), seed=1), np.eye(4))
    healthy = tmp_path / "healthy"
    healthy.mkdir()
    for visit in range(4):
        for series, description in ((visit * 10 + 1, "T2 FLAIR"), (visit * 10 + 2, "FLAIR repeat")):
            write_dicom_series(volume, healthy / f"visit{visit}", series=series, description=description)
    for seed in range(6):
        train, val = split_healthy_scans([healthy], MriConfig(seed=seed, val_fraction=0.25))
        assert len(train) == 6 and len(val) == 2
        visits_of = {split_series(s)[0] for s in train}, {split_series(s)[0] for s in val}
        assert len(visits_of[1]) == 1 and not visits_of[0] & visits_of[1], seed


def test_sessions_of_one_bids_subject_are_drawn_together(tmp_path):
    """A subject's second session never calibrates a model trained on the first."""
    bids = tmp_path / "bids"
    for subject in range(1, 6):
        for session in (1, 2):
            anat = bids / f"sub-{subject:02d}" / f"ses-{session}" / "anat"
            anat.mkdir(parents=True)
            (anat / f"sub-{subject:02d}_ses-{session}_FLAIR.nii.gz").touch()
    flat = tmp_path / "flat"
    flat.mkdir()
    for subject in ("a", "b", "c", "d", "e"):
        for run in (1, 2):
            (flat / f"sub-{subject}_run-{run}_FLAIR.nii.gz").touch()
    (flat / "sub-folder-scan.nii.gz").touch()  # not a BIDS name: its own subject
    def subject(path: Path) -> str:  # by hand: the file name up to its first underscore
        return path.name.split("_")[0] if "_" in path.name else path.name

    for folder, subjects in ((bids, 5), (flat, 6)):
        for seed in range(6):
            train, val = split_healthy_scans([folder], MriConfig(seed=seed, val_fraction=0.2))
            held, trained = {subject(p) for p in val}, {subject(p) for p in train}
            assert len(held) == 1 and not held & trained and len(held | trained) == subjects, (folder, seed)
            assert len(val) in (1, 2) and len(train) + len(val) == 2 * subjects - (folder == flat)


@pytest.mark.parametrize(("name", "modality"), [
    ("sub-01_ses-1_FLAIR.nii.gz", "flair"), ("TCGA_CS_4943_20000902_flair.nii.gz", "flair"),
    ("sub-01_T2w.nii.gz", "t2"), ("IXI002-Guys-0828-T1.nii.gz", "t1"), ("sub-02_acq-mprage_T1w.nii.gz", "t1"),
    ("patient7_T2_FLAIR.nii.gz", "flair"), ("head_ct_004.nii.gz", "ct"), ("patient12.nii.gz", None),
    ("t1_t2_maps.nii.gz", None), ("sub-03_acq-ctx_T1w.nii.gz", "t1"),
])
def test_modality_in_name(name, modality):
    assert modality_in_name(Path(name)) == modality
