"""The whole CLI on real scans: pool build -> train --modality -> score -> evaluate, in well under a minute."""

import csv
import json
import shutil
import time

import nibabel as nib
import pytest
import yaml
from medflowad.cli.app import app
from typer.testing import CliRunner

from tests.conftest import data_root
from tests.mri.conftest import TINY_MRI

runner = CliRunner()


@pytest.mark.skipif(data_root() is None, reason="real data not found: set MEDFLOWAD_DATA")
def test_cli_end_to_end_on_real_scans(tmp_path):
    started = time.perf_counter()
    medical = data_root() / "medical"
    lgg = sorted((medical / "lgg_flair128").glob("*_flair.nii.gz"))
    healthy = tmp_path / "healthy"
    healthy.mkdir()
    for scan in lgg[:3]:
        shutil.copy(scan, healthy / scan.name)
        mask = scan.with_name(scan.name.replace("_flair", "_mask"))
        shutil.copy(mask, healthy / mask.name)
    config = tmp_path / "tiny_mri.yaml"
    config.write_text(yaml.safe_dump(TINY_MRI))

    head_ct = sorted((medical / "head_ct").glob("1*.png"))[:30]  # normal head CT slices
    args = ["pool", "build", *map(str, head_ct), str(medical / "nifti_samples" / "brainix" / "FLAIR.nii.gz"),
            "-o", str(tmp_path / "pool"), "-c", str(config), "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "pool" / "manifest.json").read_text())["total_slices"] > 30

    result = runner.invoke(app, ["train", "--modality", "flair", "--data", str(healthy), "--lesion-masks",
                                 "_flair=_mask", "--pool", str(tmp_path / "pool"), "-o", str(tmp_path / "model"),
                                 "-c", str(config), "-q"])
    assert result.exit_code == 0, result.output
    for name in ("mri.yaml", "calibration.safetensors", "calibration.json", "metrics.json",
                 "in/model.safetensors", "general/model.safetensors"):
        assert (tmp_path / "model" / name).exists(), name
    # Every LGG patient has lesion slices, so counting all kept slices instead of the lesion-free ones
    # trained on would show here.
    trained = json.loads((tmp_path / "model" / "metrics.json").read_text())
    for split in ("train", "val"):
        manifest = json.loads((tmp_path / "model" / "data" / f"healthy_{split}" / "manifest.json").read_text())
        assert trained[f"{split}_slices"] == sum(source["slices"] for source in manifest["sources"])

    targets = [lgg[10], medical / "nifti_samples" / "brainix" / "FLAIR.nii.gz"]
    result = runner.invoke(app, ["score", *map(str, targets), "-m", str(tmp_path / "model"),
                                 "-o", str(tmp_path / "scores"), "-q"])
    assert result.exit_code == 0, result.output
    for target in targets:
        written = nib.load(str(tmp_path / "scores" / target.name.replace(".nii.gz", "_anomaly.nii.gz")))
        assert written.shape == nib.load(str(target)).shape

    result = runner.invoke(app, ["evaluate", "-m", str(tmp_path / "model"), "--scans", str(lgg[10]),
                                 "--scans", str(lgg[11]), "-o", str(tmp_path / "eval"), "-q"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["slice"]) == {"llr", "llr_fg", "last_scale", "last_scale_fg", "nll", "intensity_normative",
                                      "intensity", "position"}
    assert set(metrics["voxel"]) == {"llr", "last_scale", "intensity", "intensity_abs_z", "llr_c1", "llr_c2",
                                     "llr_normative", "last_scale_normative", "intensity_normative"}
    with open(tmp_path / "eval" / "slices.csv") as f:
        slice_rows = list(csv.DictReader(f))
    assert len(slice_rows) == metrics["slices"]
    assert sum(int(r["lesion"]) for r in slice_rows) == metrics["lesion_slices"]
    assert all(0 <= float(r["position"]) <= 1 for r in slice_rows)
    assert 0 <= metrics["voxel"]["llr"]["auprc"] <= 1
    assert time.perf_counter() - started < 60
