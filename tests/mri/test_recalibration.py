"""`medflowad calibrate`: a trained model calibrated on another site's healthy scans, weights untouched."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.app import app
from medflowad.mri.model import RECALIBRATION_FILE, load_mri_model, model_fingerprint
from medflowad.mri.recalibration import WEIGHT_FILES, recalibrate_model
from medflowad.mri.score import score_scans
from tests.mri.conftest import brain_like, oblique_lps_affine, save_nifti

SHADING = 0.3  # the other site: every head under the same left-right field


def _site_head(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.linspace(-1, 1, 48)[:, None, None]
    return save_nifti(path, (brain_like(seed=seed) * np.exp(SHADING * x)).astype(np.int16), oblique_lps_affine())


def test_recalibrated_model_keeps_the_weights_and_takes_the_new_sites_healthy_range(tiny_mri_model, tmp_path):
    """Calibrated on three shaded heads, the model finds a new shaded head like its healthy heads, where the
    model as trained marks it unlike them; its weight files are the source's byte for byte, its calibration is
    new, and what calibrated it is recorded."""
    site = [_site_head(tmp_path / "site" / f"head_{i}.nii.gz", 40 + i) for i in range(3)]
    (tmp_path / "model").mkdir()  # an empty folder is taken; the model is staged beside it and renamed in
    record = recalibrate_model(tiny_mri_model, [tmp_path / "site"], tmp_path / "model", device="cpu")
    folder = tmp_path / "model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "site"]  # no staging folder left
    for name in WEIGHT_FILES:
        assert (folder / name).read_bytes() == (tiny_mri_model / name).read_bytes(), name
    calibration = "calibration.safetensors"
    assert (folder / calibration).read_bytes() != (tiny_mri_model / calibration).read_bytes()
    assert json.loads((folder / RECALIBRATION_FILE).read_text()) == record
    assert sorted(record["calibration_scans"]) == sorted(str(p.resolve()) for p in site)
    assert record["subjects"] == 3 and record["source_model_sha256"] == model_fingerprint(tiny_mri_model)
    assert sorted(record["beyond_range_shares"]) == sorted(record["calibration_scans"])
    assert record["limit_note"] is None  # three heads alike
    assert len(load_mri_model(folder, "cpu").calibration["scan/beyond_range_share"]) == 3

    new_head = _site_head(tmp_path / "new.nii.gz", 23)
    before = score_scans([new_head], tiny_mri_model, tmp_path / "out_before", device="cpu").rows[0]
    after = score_scans([new_head], folder, tmp_path / "out_after", device="cpu").rows[0]
    assert before["unlike_healthy"] is True and after["unlike_healthy"] is False
    assert after["beyond_range_share"] < before["beyond_range_share"] / 3

    # a calibration scan, and a scan that trained the source model's weights, are pointed out when scored
    trained = json.loads((tiny_mri_model / "data" / "healthy_train" / "manifest.json").read_text())["sources"][0]
    warning = score_scans([site[0], Path(trained["path"])], folder, tmp_path / "out_seen", device="cpu").warning
    assert "1 of these scans trained the model and 1 calibrated it" in warning


def test_recalibration_refuses_one_subject_and_an_existing_model(tiny_mri_model, tmp_path):
    for session in (1, 2):  # two sessions of one BIDS subject
        _site_head(tmp_path / "one" / f"sub-01_ses-{session}_T1w.nii.gz", 50 + session)
    with pytest.raises(ValueError, match="needs healthy scans of at least two subjects"):
        recalibrate_model(tiny_mri_model, [tmp_path / "one"], tmp_path / "model", device="cpu")
    assert not (tmp_path / "model").exists()  # nothing half-written
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        recalibrate_model(tiny_mri_model, [tmp_path / "one"], tiny_mri_model, device="cpu")


def test_calibrate_command_writes_a_model_that_scores(tiny_mri_model, tmp_path):
    """... and says so when a healthy scan is named as another modality than the model's (a FLAIR model here)."""
    _site_head(tmp_path / "site" / "head_0.nii.gz", 60)
    _site_head(tmp_path / "site" / "head_1_T1w.nii.gz", 61)
    (tmp_path / "site" / "notes.nii.gz").write_bytes(b"not a scan")
    runner = CliRunner()
    result = runner.invoke(app, ["calibrate", str(tmp_path / "site"), "--model", str(tiny_mri_model),
                                 "--out", str(tmp_path / "model"), "-q"])
    assert result.exit_code == 0, result.output
    assert "calibrated on 2 scans of 2 subjects" in result.output
    assert "skipped" in result.output and "notes.nii.gz" in result.output
    assert "1 of 3 healthy scans are named as another modality than flair" in " ".join(result.output.split())
    result = runner.invoke(app, ["score", str(tmp_path / "site" / "head_0.nii.gz"), "--model",
                                 str(tmp_path / "model"), "--out", str(tmp_path / "scored"), "-q"])
    assert result.exit_code == 0, result.output


def test_a_head_unlike_the_other_calibration_heads_is_named(tiny_mri_model, tmp_path):
    """Three plain heads and one shaded one calibrate: the shaded one would set the unlike-healthy limit, and
    calibrate says so by name."""
    (tmp_path / "site").mkdir()
    for i in range(3):
        save_nifti(tmp_path / "site" / f"plain_{i}.nii.gz", brain_like(seed=70 + i), oblique_lps_affine())
    _site_head(tmp_path / "site" / "odd.nii.gz", 73)
    result = CliRunner().invoke(app, ["calibrate", str(tmp_path / "site"), "--model", str(tiny_mri_model),
                                      "--out", str(tmp_path / "model"), "-q"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "model" / RECALIBRATION_FILE).read_text())
    shares = record["beyond_range_shares"]
    odd = next(name for name in shares if name.endswith("odd.nii.gz"))
    assert shares[odd] == max(shares.values()) and record["limit_note"].startswith(f"{odd} lies beyond")
    assert "check that it is healthy" in " ".join(result.output.split())


def test_score_command_marks_an_unlike_scan_in_its_table(tiny_mri_model, tmp_path):
    head = _site_head(tmp_path / "shaded.nii.gz", 80)
    result = CliRunner().invoke(app, ["score", str(head), "--model", str(tiny_mri_model), "--out",
                                      str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "unlike" in text and "shaded lies beyond the healthy range" in text


def test_an_interrupted_calibration_leaves_no_folder(tiny_mri_model, tmp_path, monkeypatch):
    for i in range(2):
        _site_head(tmp_path / "site" / f"head_{i}.nii.gz", 90 + i)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("medflowad.mri.recalibration.write_tensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        recalibrate_model(tiny_mri_model, [tmp_path / "site"], tmp_path / "model", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]  # neither the model nor its staging folder
