"""MONAI bundle export: MONAI's own runner executes the bundle and reproduces `medflowad score` (a wiring test:
the decisions are checked independently in tests/mri/test_decisions.py), and the metadata states the facts."""

import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from medflowad.cli.app import app
from typer.testing import CliRunner

from medflowad.mri.bundle import export_monai_bundle
from medflowad.mri.score import score_scans
from tests.mri.conftest import brain_like, oblique_lps_affine, save_nifti


def test_monai_bundle_runner_gives_the_maps_of_score(tiny_mri_model, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    save_nifti(scans / "p1.nii.gz", brain_like(seed=41, blob=(20, 30, 6)), oblique_lps_affine())
    save_nifti(scans / "p2.nii.gz", brain_like(seed=42), np.diag([0.9, 0.9, 4.0, 1.0]))
    bundle = export_monai_bundle(tiny_mri_model, tmp_path / "bundle")
    for name in ("configs/metadata.json", "configs/inference.json", "models/in/model.safetensors",
                 "models/general/model.safetensors", "models/mri.yaml", "docs/README.md"):
        assert (bundle / name).is_file(), name
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["required_packages_version"]["medflowad"]
    image = metadata["network_data_format"]["inputs"]["image"]
    # the workflow reads whole scans of any grid and writes maps on each scan's grid: no fixed shape
    assert image["modality"] == "MR" and image["spatial_shape"] == ["*", "*", "*"]
    assert metadata["network_data_format"]["outputs"]["pred"]["spatial_shape"] == ["*", "*", "*"]
    assert "log p_general(x) - log p_in(x)" in metadata["description"]
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert "network_def" not in inference and "general_def" not in inference

    out = tmp_path / "bundle_out"
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
         "--bundle_root", str(bundle), "--input_dir", str(scans), "--output_dir", str(out), "--device", "cpu"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    reference = score_scans([scans], tiny_mri_model, tmp_path / "score_out", device="cpu", report=True)
    assert reference.all_ok
    for sid in ("p1", "p2"):
        for kind in ("anomaly", "last_scale", "anomaly_mask"):
            ours = nib.load(str(out / f"{sid}_{kind}.nii.gz"))
            theirs = nib.load(str(tmp_path / "score_out" / f"{sid}_{kind}.nii.gz"))
            np.testing.assert_allclose(ours.affine, theirs.affine)
            np.testing.assert_allclose(np.asarray(ours.dataobj), np.asarray(theirs.dataobj), rtol=0, atol=1e-5)
    with open(out / "scores.csv") as a, open(tmp_path / "score_out" / "scores.csv") as b:
        for row_a, row_b in zip(csv.DictReader(a), csv.DictReader(b), strict=True):
            assert row_a["scan_id"] == row_b["scan_id"]
            assert float(row_a["llr"]) == pytest.approx(float(row_b["llr"]), abs=1e-4)
            assert row_a["llr_p"] == row_b["llr_p"]
    assert (out / "report.html").is_file()


def test_export_refuses_to_overwrite_and_unknown_formats(tiny_mri_model, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(tiny_mri_model), "--out", str(target)])
    assert result.exit_code == 2 and "not empty" in result.output
    assert (target / "keep.txt").read_text() == "user data"
    result = runner.invoke(app, ["export", str(tiny_mri_model), "--out", str(tmp_path / "b"), "--format", "onnx"])
    assert result.exit_code == 2 and "monai-bundle" in result.output
    result = runner.invoke(app, ["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "bundled" in result.output


def test_bundle_metadata_names_the_scanner_of_the_modality(tmp_path):
    from medflowad.mri.bundle import metadata

    model = {"image_size": [64, 64]}
    for modality, scanner in (("ct", "CT"), ("t1", "MR"), ("flair", "MR")):
        described = metadata(tmp_path, {"modality": modality, "model": model})
        assert described["network_data_format"]["inputs"]["image"]["modality"] == scanner
        assert f"brain {scanner} scans" in described["task"]
