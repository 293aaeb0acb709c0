"""A small model trained and scored in standard space: every command prepares through the same cached stage."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import yaml

from medflowad.mri.config import mri_config_from_dict
from medflowad.mri.evaluate import evaluate_scans
from medflowad.mri.pool import build_pool
from medflowad.mri.score import score_scans
from medflowad.mri.training import train_mri_model
from medflowad.prep import stage
from tests.prep.conftest import head_motion, moved_template_scan, oblique_head_grid

TINY_STANDARD = {
    "modality": "t1",
    "preprocessing": {"image_size": 32, "space": "standard", "brain": "auto", "slice_mm": 6.0},
    "model": {"in_channels": 1, "image_size": [32, 32], "levels": 2, "steps": 2, "hidden": 16},
    "batch_size": 16, "general_steps": 10, "in_steps": 8, "device": "cpu", "val_fraction": 0.34,
}


@pytest.fixture(scope="module")
def standard_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("standard")
    cache = root / "cache"
    affine, shape = oblique_head_grid()
    heads = [moved_template_scan(root / f"head_{i}.nii.gz", head_motion(3.0 * i, (2.0 * i, -i, 1.0)), affine, shape)
             for i in range(4)]
    (root / "pool_src").mkdir()
    pool_head = moved_template_scan(root / "pool_src" / "other.nii.gz", head_motion(-5.0), affine, shape)
    patient = moved_template_scan(root / "patient_t1.nii.gz", head_motion(4.0), affine, shape,
                                  point_mm=np.array([24.0, -20.0, 22.0]))
    mask = nib.load(str(patient))
    lesion = (np.asarray(mask.dataobj) > 255 * 1.5).astype(np.uint8)
    nib.save(nib.Nifti1Image(lesion, mask.affine), str(root / "patient_mask.nii.gz"))
    config = mri_config_from_dict(TINY_STANDARD)
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDFLOWAD_CACHE", str(cache))
    build_pool([pool_head.parent], root / "pool", config.preprocessing)
    train_mri_model(config, heads, root / "model", pool=root / "pool", show_progress=False, echo=lambda m: None)
    mp.undo()
    return root, cache, patient, pool_head


def test_standard_space_model_scores_onto_the_native_grid_from_the_cache(standard_model, tmp_path, monkeypatch):
    root, cache, patient, _ = standard_model
    stored = yaml.safe_load((root / "model" / "mri.yaml").read_text())["preprocessing"]
    assert stored["space"] == "standard" and stored["slice_mm"] == 6.0
    monkeypatch.setenv("MEDFLOWAD_CACHE", str(cache))
    result = score_scans([patient], root / "model", tmp_path / "first", device="cpu")
    assert result.all_ok, result.rows
    written = nib.load(str(tmp_path / "first" / "patient_t1_anomaly.nii.gz"))
    scan = nib.load(str(patient))
    assert written.shape == scan.shape and np.allclose(written.affine, scan.affine, atol=1e-4)
    values = np.asarray(written.dataobj)
    brain = np.asarray(scan.dataobj) > 0.1 * np.percentile(np.asarray(scan.dataobj), 99)
    assert np.count_nonzero(values[~brain]) < 0.01 * np.count_nonzero(values), "map leaks outside the brain"
    assert np.count_nonzero(values[brain]) > 0.5 * brain.sum()

    # Standard space: the voxel mask flags the normative llr at the healthy voxel threshold.
    from medflowad.mri.analysis import threshold_at_fpr
    from medflowad.mri.model import load_mri_model

    model = load_mri_model(root / "model", "cpu")
    normative = np.asarray(nib.load(str(tmp_path / "first" / "patient_t1_normative.nii.gz")).dataobj)
    mask = np.asarray(nib.load(str(tmp_path / "first" / "patient_t1_anomaly_mask.nii.gz")).dataobj).astype(bool)
    threshold = threshold_at_fpr(model.calibration["voxel/llr_normative"], model.config.fpr)
    assert np.array_equal(mask, normative > threshold)

    def no_registration(*args, **kwargs):
        raise AssertionError("registered again although the cache holds the result")

    monkeypatch.setattr(stage, "register_affine", no_registration)
    again = score_scans([patient], root / "model", tmp_path / "second", device="cpu")
    assert again.all_ok, again.rows
    assert np.array_equal(np.asarray(nib.load(str(tmp_path / "second" / "patient_t1_anomaly.nii.gz")).dataobj),
                          values)


def test_pool_and_evaluate_prepare_in_standard_space(standard_model, monkeypatch):
    root, cache, patient, pool_head = standard_model
    manifest = yaml.safe_load((root / "pool" / "manifest.json").read_text())
    assert manifest["preprocessing"]["space"] == "standard"
    assert [(s["path"].endswith(pool_head.name), s["slices"] > 0) for s in manifest["sources"]] == [(True, True)]
    monkeypatch.setenv("MEDFLOWAD_CACHE", str(cache))
    result = evaluate_scans(root / "model", [patient], ("_t1", "_mask"), device="cpu")
    assert result["scans"] == 1 and result["lesion_voxels"] > 0
    # Voxel metrics are measured inside the brain: the region holds no background voxel of the scan.
    scan = np.asarray(nib.load(str(patient)).dataobj)
    assert result["voxels"] <= np.count_nonzero(scan > 0)
