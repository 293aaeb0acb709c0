"""What training accepts: which healthy scans train and which calibrate, and pools and general models
prepared like the model."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from medflowad.data.readers import split_series
from medflowad.mri.config import MriConfig, mri_config_from_dict
from medflowad.mri.model import modality_in_name, split_healthy_scans, train_mri_model
from medflowad.mri.pool import build_pool
from tests.mri.conftest import TINY_MRI, brain_like, save_nifti, write_dicom_series


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


def test_pool_or_general_model_prepared_otherwise_is_refused(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    save_nifti(source / "other.nii.gz", brain_like(shape=(40, 40, 10), seed=3), np.eye(4))
    tiny = mri_config_from_dict(TINY_MRI)
    build_pool([source], tmp_path / "pool", tiny.preprocessing)
    other = mri_config_from_dict({**TINY_MRI, "preprocessing": {**TINY_MRI["preprocessing"], "percentiles": [1, 99]}})
    differs = r"pool: prepared with other preprocessing .*percentiles \[0\.5, 99\.5\] there, \[1, 99\] here"
    with pytest.raises(ValueError, match=differs):
        train_mri_model(other, [source], tmp_path / "model", pool=tmp_path / "pool", echo=lambda m: None)

    general = tmp_path / "flair" / "general"
    general.mkdir(parents=True)
    (tmp_path / "flair" / "mri.yaml").write_text(yaml.safe_dump(tiny.to_dict()))
    with pytest.raises(ValueError, match=r"general: prepared with other preprocessing"):
        train_mri_model(other, [source], tmp_path / "model", general_model=general, echo=lambda m: None)


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


def test_scans_named_as_another_modality_are_pointed_out(tmp_path):
    healthy = tmp_path / "bids"
    healthy.mkdir()
    for subject in range(4):
        for suffix in ("FLAIR", "T1w"):
            (healthy / f"sub-{subject}_{suffix}.nii.gz").write_bytes(b"")  # listing only: none is readable
    notes = []
    with pytest.raises(ValueError, match="no readable"):
        train_mri_model(MriConfig(modality="flair"), [healthy], tmp_path / "model", general_model=tmp_path / "g",
                        echo=notes.append)
    assert any(n.startswith("note: 4 of 8 healthy scans are named as another modality than flair (sub-")
               and "--pattern '*flair*'" in n for n in notes), notes
    notes.clear()
    with pytest.raises(ValueError, match="no readable"):
        train_mri_model(MriConfig(modality="flair"), [healthy], tmp_path / "model2", general_model=tmp_path / "g",
                        pattern="*flair*", echo=notes.append)
    assert not any("another modality" in n for n in notes)


def test_a_model_folder_is_not_resumed_with_other_data(tmp_path, monkeypatch):
    """Same folder, same data paths, other contents: before, the finished models were reused as they were and
    the folder's manifests described scans they never trained on."""
    healthy = tmp_path / "healthy"
    healthy.mkdir()
    for i in range(3):
        save_nifti(healthy / f"h{i}.nii.gz", brain_like(seed=40 + i), np.eye(4))
    source = tmp_path / "pool_src"
    source.mkdir()
    save_nifti(source / "other.nii.gz", brain_like(shape=(40, 40, 10), seed=3), np.eye(4))
    config = mri_config_from_dict(TINY_MRI)
    build_pool([source], tmp_path / "pool", config.preprocessing)
    model = tmp_path / "model"
    train_mri_model(config, [healthy], model, pool=tmp_path / "pool", show_progress=False, echo=lambda m: None)
    monkeypatch.chdir(tmp_path)  # the same scans named relatively are the same data
    train_mri_model(config, [Path("healthy")], model, pool=Path("pool"), show_progress=False, echo=lambda m: None)

    (healthy / "h2.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"model holds models trained on other data \(changed: healthy_"):
        train_mri_model(config, [healthy], model, pool=tmp_path / "pool", show_progress=False, echo=lambda m: None)
    save_nifti(healthy / "h2.nii.gz", brain_like(seed=42), np.eye(4))
    save_nifti(source / "another.nii.gz", brain_like(shape=(40, 40, 10), seed=4), np.eye(4))
    build_pool([source], tmp_path / "pool", config.preprocessing, overwrite=True)
    with pytest.raises(ValueError, match=r"changed: pool_slices_sha256"):
        train_mri_model(config, [healthy], model, pool=tmp_path / "pool", show_progress=False, echo=lambda m: None)


def test_calibration_takes_only_the_healthy_parts_of_lesion_patients(tiny_mri_model, tmp_path):
    """Slices with lesion and voxels within LESION_MARGIN pixels (4-neighbour steps in-plane) of a lesion stay out
    of the calibration distributions; checked on the intensity map, which is the prepared image itself."""
    from medflowad.data.readers import load_scan
    from medflowad.mri.calibration import LESION_MARGIN, calibrate
    from medflowad.mri.model import load_mri_model
    from medflowad.prep import prepare_volume

    volume = brain_like(seed=7, blob=(24, 28, 7))
    lesion = (volume == 300).astype(np.uint8)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    model = load_mri_model(tiny_mri_model, "cpu", calibrated=False)
    prepared = prepare_volume(load_scan(save_nifti(tmp_path / "p_flair.nii.gz", volume, affine)),
                              model.config.preprocessing,
                              lesion_mask=load_scan(save_nifti(tmp_path / "p_mask.nii.gz", lesion, affine)))
    assert prepared.lesion_slices[prepared.keep].any() and not prepared.lesion_slices[prepared.keep].all()
    calibration = calibrate(model, [prepared])
    # Independent: Manhattan distance in-plane from every pixel to the nearest lesion pixel, by brute force.
    z_idx, r_idx, c_idx = np.nonzero(prepared.lesion > 0)
    expected = []
    image = prepared.slices[:, 0].numpy() / 255.0
    for z in np.nonzero(prepared.keep)[0]:
        for r, c in zip(*np.nonzero(prepared.foreground[z]), strict=True):
            near = (z_idx == z) & (np.abs(r_idx - r) + np.abs(c_idx - c) <= LESION_MARGIN)
            if not near.any():
                expected.append(image[z, r, c])
    assert np.allclose(np.sort(calibration["voxel/intensity"]), np.sort(np.asarray(expected, dtype=np.float32)))
    healthy = prepared.keep & ~prepared.lesion_slices
    assert len(calibration["slice/llr"]) == healthy.sum()


def test_masked_healthy_slices_keep_every_slice_and_mask_the_lesion_zone(tmp_path):
    """lesions: mask trains on every scored slice with a likelihood mask that is 0 exactly within LESION_MARGIN
    4-neighbour steps of a lesion pixel (brute force); drop_slices keeps the lesion-free slices, unmasked."""
    from medflowad.data.readers import load_scan
    from medflowad.mri.calibration import LESION_MARGIN
    from medflowad.mri.model import _healthy_slices
    from medflowad.prep import prepare_volume

    volume = brain_like(seed=8, blob=(24, 28, 7))
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    prepared = prepare_volume(load_scan(save_nifti(tmp_path / "p_flair.nii.gz", volume, affine)),
                              mri_config_from_dict(TINY_MRI).preprocessing,
                              lesion_mask=load_scan(save_nifti(tmp_path / "p_mask.nii.gz",
                                                               (volume == 300).astype(np.uint8), affine)))
    healthy = _healthy_slices([prepared], "mask")
    images, masks = healthy.images, healthy.masks
    assert len(images) == prepared.keep.sum() and masks is not None and healthy.labels is None
    lesion = prepared.lesion > 0
    for i, z in enumerate(np.nonzero(prepared.keep)[0]):
        rows, cols = np.nonzero(lesion[z])
        for r in range(lesion.shape[1]):
            for c in range(lesion.shape[2]):
                near = bool(len(rows)) and bool((np.abs(rows - r) + np.abs(cols - c) <= LESION_MARGIN).any())
                assert masks[i, 0, r, c] == (0 if near else 1)
    dropped = _healthy_slices([prepared], "drop_slices")
    assert dropped.masks is None and len(dropped.images) == (prepared.keep & ~prepared.lesion_slices).sum()
