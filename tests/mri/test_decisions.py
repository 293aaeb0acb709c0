"""The decisions `score` and calibration make, recomputed with numpy from what they wrote (NIfTI read with
nibabel, calibration.safetensors read with safetensors.numpy, tables read as CSV): voxel masks, scan and slice
p-values and flags, --fpr, the calibration's voxel samples and thresholds, and scans with nothing to score."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from medflowad.mri.analysis import analyse_scan
from medflowad.mri.config import mri_config_from_dict
from medflowad.mri.model import load_mri_model
from medflowad.mri.score import Thresholds, score_scans
from medflowad.prep import prepare
from medflowad.storage import ModelFolderError
from tests.mri.conftest import brain_like, oblique_lps_affine, save_nifti


def _threshold(values: np.ndarray, fpr: float) -> float:
    """The smallest healthy value t with at most ``fpr`` of the healthy values strictly above it (brute force)."""
    return float(min(v for v in np.unique(values) if np.mean(values > v) <= fpr))


def _p_value(score: float, healthy: np.ndarray) -> float:
    return (1 + int(np.sum(healthy >= score))) / (1 + len(healthy))


@pytest.fixture(scope="module")
def scored(tiny_mri_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("decisions")
    scans = [save_nifti(root / "blob.nii.gz", brain_like(seed=31, blob=(20, 30, 6)), oblique_lps_affine()),
             save_nifti(root / "plain.nii.gz", brain_like(seed=32), np.diag([0.9, 0.9, 4.0, 1.0]))]
    for fpr in (0.05, 0.3):
        assert score_scans(scans, tiny_mri_model, root / f"out_{fpr}", device="cpu", fpr=fpr).all_ok
    return root, load_file(str(tiny_mri_model / "calibration.safetensors"))


def _rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("fpr", [0.05, 0.3])
def test_voxel_mask_is_the_map_above_the_healthy_threshold(scored, fpr):
    root, calibration = scored
    threshold = _threshold(calibration["voxel/llr"], fpr)  # the tiny model: native grid, llr mask, voxel_fpr = fpr
    for sid in ("blob", "plain"):
        anomaly = np.asarray(nib.load(str(root / f"out_{fpr}" / f"{sid}_anomaly.nii.gz")).dataobj)
        mask = np.asarray(nib.load(str(root / f"out_{fpr}" / f"{sid}_anomaly_mask.nii.gz")).dataobj)
        assert np.array_equal(mask.astype(bool), anomaly > threshold)
    low = np.asarray(nib.load(str(root / "out_0.05" / "blob_anomaly_mask.nii.gz")).dataobj)
    high = np.asarray(nib.load(str(root / "out_0.3" / "blob_anomaly_mask.nii.gz")).dataobj)
    assert high.sum() > low.sum() and np.all(high >= low)  # a higher FPR only adds voxels


@pytest.mark.parametrize("fpr", [0.05, 0.3])
def test_scan_and_slice_p_values_and_flags_follow_the_conformal_formula(scored, fpr):
    root, calibration = scored
    rows = _rows(root / f"out_{fpr}" / "scores.csv")
    assert len(rows) == 2
    for row in rows:
        for name in ("llr", "last_scale", "nll"):
            p = _p_value(float(row[name]), calibration[f"scan/{name}"])
            assert float(row[f"{name}_p"]) == pytest.approx(p, abs=1e-9)
            assert row[f"{name}_flag"] == str(p <= fpr)
    slices = _rows(root / f"out_{fpr}" / "slices.csv")
    scored_rows = [r for r in slices if r["scored"] == "True"]
    assert scored_rows and len(scored_rows) < len(slices)
    for row in scored_rows:
        assert float(row["llr_p"]) == pytest.approx(_p_value(float(row["llr"]), calibration["slice/llr"]), abs=1e-9)
    assert all(r["llr_p"] == "" for r in slices if r["scored"] == "False")  # unscored: no p-value (empty cell)


def test_fpr_changes_flags_and_masks_only(scored):
    root, _ = scored
    low, high = _rows(root / "out_0.05" / "scores.csv"), _rows(root / "out_0.3" / "scores.csv")
    for a, b in zip(low, high, strict=True):
        for name in ("llr", "llr_p", "last_scale", "last_scale_p"):
            assert a[name] == b[name]
    for sid in ("blob", "plain"):
        maps = [np.asarray(nib.load(str(root / f"out_{fpr}" / f"{sid}_anomaly.nii.gz")).dataobj) for fpr in (0.05, 0.3)]
        assert np.array_equal(*maps)


def test_calibration_voxels_are_the_scored_foreground_and_its_thresholds_their_quantiles(tiny_mri_model):
    """The calibration holds one llr value per foreground pixel of the scored slices of its healthy scan(s)
    (fewer than the sample cap here), no background pixel and no pixel of an unscored slice; calibration.json's
    thresholds are the brute-force thresholds of the stored arrays."""
    calibration = load_file(str(tiny_mri_model / "calibration.safetensors"))
    model = load_mri_model(tiny_mri_model, device="cpu")
    config = mri_config_from_dict(yaml.safe_load((tiny_mri_model / "mri.yaml").read_text()))
    sources = json.loads((tiny_mri_model / "data" / "healthy_val" / "manifest.json").read_text())["sources"]
    expected = []
    for source in sources:
        prepared = prepare(source["path"], config.preprocessing)
        region = prepared.scored
        assert region.sum() < prepared.keep.sum() * region.shape[1] * region.shape[2]  # background is left out
        expected.append(analyse_scan(prepared, model.in_model, model.general_model).maps["llr"][region])
    expected = np.sort(np.concatenate(expected).astype(np.float32))
    np.testing.assert_allclose(np.sort(calibration["voxel/llr"]), expected, rtol=0, atol=1e-5)
    summary = json.loads((tiny_mri_model / "calibration.json").read_text())
    for key in ("voxel/llr", "slice/llr", "scan/llr", "voxel/intensity"):
        assert summary["thresholds"][key] == pytest.approx(_threshold(calibration[key], summary["fpr"]), abs=1e-6)
        assert summary["counts"][key] == len(calibration[key])


def test_a_calibration_without_the_mask_maps_healthy_voxels_is_an_error_naming_the_map(tiny_mri_model):
    """The mask's threshold is the healthy voxels' quantile (above); without those voxels there is none to take."""
    model = load_mri_model(tiny_mri_model, "cpu")
    assert Thresholds.of(model, 0.05).mask_threshold == _threshold(model.calibration["voxel/llr"], 0.05)
    del model.calibration["voxel/llr"]
    with pytest.raises(ModelFolderError, match="no healthy voxels of llr"):
        Thresholds.of(model, 0.05)


def test_a_scan_with_no_slice_to_score_is_an_error_that_says_why(tiny_mri_model, tmp_path):
    """A brain mask of two specks far apart: some foreground, but no slice reaches min_foreground of its area."""
    volume = brain_like(seed=33)
    mask = np.zeros(volume.shape, np.uint8)
    mask[10:12, 27:29, 3:11] = mask[36:38, 27:29, 3:11] = 1  # inside the head, 26 voxels apart
    save_nifti(tmp_path / "specks.nii.gz", volume, np.eye(4))
    save_nifti(tmp_path / "specks_brain.nii.gz", mask, np.eye(4))
    save_nifti(tmp_path / "good.nii.gz", volume, np.eye(4))
    save_nifti(tmp_path / "good_brain.nii.gz", np.ones(volume.shape, np.uint8), np.eye(4))
    result = score_scans([tmp_path / "specks.nii.gz", tmp_path / "good.nii.gz"], tiny_mri_model, tmp_path / "out",
                         device="cpu", brain_masks=(".nii.gz", "_brain.nii.gz"))
    rows = {r["scan_id"]: r for r in result.rows}
    assert rows["specks"]["status"] == "error"
    assert "specks.nii.gz: no slice has enough foreground to score" in rows["specks"]["error"]
    assert rows["good"]["status"] == "ok" and not list((tmp_path / "out").glob("specks_*"))


def test_flair_models_flag_by_the_scan_z_by_default_and_others_by_the_llr(tiny_mri_model, tmp_path):
    """With no mask_map and no scan_score in its config, a FLAIR model thresholds intensity_scan_z (written as
    <id>_scan_z, a z-score) at its healthy voxel threshold, the 3x bright blob is where the map peaks, and scans
    are flagged by the scan z's slice score against its healthy calibration scans; the same model called T2
    keeps the llr mask and scan score and writes no scan z."""
    import shutil

    scan = save_nifti(tmp_path / "s.nii.gz", brain_like(seed=23, blob=(30, 20, 8)), oblique_lps_affine())
    blob_index = (30, 20, 8)
    for modality in ("flair", "t2"):
        model_dir = tmp_path / modality
        shutil.copytree(tiny_mri_model, model_dir)
        config = yaml.safe_load((model_dir / "mri.yaml").read_text())
        config.update(modality=modality, mask_map=None, scan_score=None)
        (model_dir / "mri.yaml").write_text(yaml.safe_dump(config))
        out = tmp_path / f"out_{modality}"
        result = score_scans([scan], model_dir, out, device="cpu")
        assert result.all_ok, result.rows
        calibration = load_mri_model(model_dir, "cpu").calibration
        mask = np.asarray(nib.load(str(out / "s_anomaly_mask.nii.gz")).dataobj).astype(bool)
        headline = "intensity_scan_z" if modality == "flair" else "llr"
        assert json.loads((out / "scores.json").read_text())["scan_score"] == headline
        row = _rows(out / "scores.csv")[0]
        healthy = calibration[f"scan/{headline}"]
        assert float(row[f"{headline}_p"]) == pytest.approx(_p_value(float(row[headline]), healthy))
        if modality == "t2":
            assert not (out / "s_scan_z.nii.gz").exists()
            llr = np.asarray(nib.load(str(out / "s_anomaly.nii.gz")).dataobj)
            assert np.array_equal(mask, llr > _threshold(calibration["voxel/llr"], 0.05))
            continue
        written = nib.load(str(out / "s_scan_z.nii.gz"))
        assert written.header.get_intent()[0] == "z score"
        np.testing.assert_allclose(written.affine, nib.load(str(scan)).affine, atol=1e-5)
        scan_z = np.asarray(written.dataobj)
        assert np.array_equal(mask, scan_z > _threshold(calibration["voxel/intensity_scan_z"], 0.05))
        peak = np.unravel_index(np.argmax(scan_z), scan_z.shape)
        assert np.linalg.norm(np.subtract(peak, blob_index)) <= 3.0, peak
        assert mask[blob_index] and json.loads((out / "scores.json").read_text())["mask_map"] == "intensity_scan_z"
        # a later run's report draws the earlier scan from its written scan z map
        other = save_nifti(tmp_path / "t.nii.gz", brain_like(seed=24), oblique_lps_affine())
        later = score_scans([other], model_dir, out, device="cpu", report=True)
        assert later.all_ok and "no report figures" not in (later.warning or ""), later.warning
        assert (out / "report.html").read_text().count("<img") >= 2


def test_scan_z_and_llr_is_the_smaller_of_the_scan_z_and_the_llrs_robust_z_and_can_be_the_mask(tiny_mri_model,
                                                                                                tmp_path):
    """The map is min(intensity_scan_z, (llr - median) / (1.4826 MAD)) over the scored brain, zero outside it
    (recomputed here with numpy from the same analysis's llr); chosen as mask_map, ``score`` writes it as
    <id>_scan_z_and_llr (a z-score on the scan's grid) and the mask is it above its healthy voxel threshold."""
    import shutil

    model = load_mri_model(tiny_mri_model, "cpu")
    scan = save_nifti(tmp_path / "s.nii.gz", brain_like(seed=25, blob=(30, 20, 8)), oblique_lps_affine())
    prepared = prepare(scan, model.config.preprocessing)
    maps = analyse_scan(prepared, model.in_model, model.general_model).maps
    region = prepared.scored
    llr = maps["llr"][region].astype(np.float64)
    llr_z = (llr - np.median(llr)) / (1.4826 * np.median(np.abs(llr - np.median(llr))))
    expected = np.minimum(maps["intensity_scan_z"][region], llr_z)
    np.testing.assert_allclose(maps["scan_z_and_llr"][region], expected, rtol=0, atol=1e-4)
    assert not maps["scan_z_and_llr"][~region].any()

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_mri_model, model_dir)
    config = yaml.safe_load((model_dir / "mri.yaml").read_text())
    config.update(modality="flair", mask_map="scan_z_and_llr")
    (model_dir / "mri.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert score_scans([scan], model_dir, out, device="cpu").all_ok
    written = nib.load(str(out / "s_scan_z_and_llr.nii.gz"))
    assert written.header.get_intent()[0] == "z score"
    np.testing.assert_allclose(written.affine, nib.load(str(scan)).affine, atol=1e-5)
    mask = np.asarray(nib.load(str(out / "s_anomaly_mask.nii.gz")).dataobj).astype(bool)
    healthy = load_mri_model(model_dir, "cpu").calibration["voxel/scan_z_and_llr"]
    assert np.array_equal(mask, np.asarray(written.dataobj) > _threshold(healthy, 0.05))
    assert not (out / "s_scan_z.nii.gz").exists()
    assert json.loads((out / "scores.json").read_text())["mask_map"] == "scan_z_and_llr"
