"""Which healthy scans train and which calibrate: the draw, its seed, and series selection."""

from pathlib import Path

from medflowad.mri.config import MriConfig
from medflowad.mri.model import split_healthy_scans


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
