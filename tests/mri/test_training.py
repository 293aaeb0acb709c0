"""What training accepts (pools and general models prepared like the model, scans named as the model's
modality, the data a folder's models trained on) and what it trains on (the healthy parts of lesion
patients)."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from medflowad.mri.config import MriConfig, mri_config_from_dict
from medflowad.mri.pool import build_pool
from medflowad.mri.training import train_mri_model
from tests.mri.conftest import TINY_MRI, brain_like, save_nifti


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
    from medflowad.mri.training import _healthy_slices
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


def test_train_without_config_takes_the_modalitys_preset():
    """T1 gets its measured choices (the normative intensity as map and score, N4, landmarks, unclipped range,
    a 0.1 % voxel mask) on mri_cpu's Glow and training; CT its HU window; FLAIR, T2 and PD mri_cpu, whose brains'
    medians go to 0.4."""
    from medflowad.mri.config import default_mri_preset, load_mri_config

    assert [default_mri_preset(m) for m in ("t1", "ct", "flair", "t2", "pd")] == \
        ["t1_cpu", "ct_cpu", "mri_cpu", "mri_cpu", "mri_cpu"]
    t1, general, demo = (load_mri_config(name) for name in ("t1_cpu", "mri_cpu", "mri_demo"))
    assert t1.modality == "t1" and t1.model == general.model and t1.in_steps == general.in_steps
    for setting in ("mask_map", "scan_score", "voxel_fpr", "normative_intensity", "standardise_intensity"):
        assert getattr(t1, setting) == getattr(demo, setting), setting
    # FLAIR's median anchor was measured on FLAIR only; T1 keeps 0.5-99.5 -> 0-1
    assert t1.preprocessing == general.preprocessing.overridden(n4=True, percentiles=(0.5, 99.5), upper_level=1.0)
    assert (general.preprocessing.percentiles, general.preprocessing.upper_level) == ((0.5, 50.0), 0.4)
    assert general.mask_map is None and not general.preprocessing.n4
