"""The whole CLI on real scans: pool build -> train --modality -> score -> evaluate, in well under a minute."""

import csv
import json
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from medflowad.cli.app import app
from typer.testing import CliRunner

from medflowad.data.slice_sets import load_slice_tensors
from medflowad.mri.config import mri_config_from_dict
from medflowad.prep import prepare
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
                                 "-c", str(config), "--batch-size", "8", "-q"])
    assert result.exit_code == 0, result.output
    for name in ("mri.yaml", "calibration.safetensors", "calibration.json", "metrics.json",
                 "in/model.safetensors", "general/model.safetensors"):
        assert (tmp_path / "model" / name).exists(), name
    assert yaml.safe_load((tmp_path / "model" / "in" / "config.yaml").read_text())["optim"]["batch_size"] == 8
    assert yaml.safe_load((tmp_path / "model" / "general" / "config.yaml").read_text())["optim"]["batch_size"] == 8
    _no_lesion_reaches_training(tmp_path / "model", tmp_path / "healthy")

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
                                      "intensity_scan_z", "intensity", "position"}
    assert set(metrics["voxel"]) == {"llr", "last_scale", "intensity", "intensity_abs_z", "intensity_scan_z",
                                     "scan_z_and_llr",
                                     "llr_c1", "llr_c2",
                                     "llr_normative", "last_scale_normative", "intensity_normative"}
    with open(tmp_path / "eval" / "slices.csv") as f:
        slice_rows = list(csv.DictReader(f))
    assert len(slice_rows) == metrics["slices"]
    assert sum(int(r["lesion"]) for r in slice_rows) == metrics["lesion_slices"]
    assert all(0 <= float(r["position"]) <= 1 for r in slice_rows)
    # slice AUROC by counting pairs (lesion slice scored above a lesion-free one; ties count half)
    positives = [float(r["llr"]) for r in slice_rows if r["lesion"] == "1"]
    negatives = [float(r["llr"]) for r in slice_rows if r["lesion"] == "0"]
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    assert metrics["slice"]["llr"]["auroc"] == pytest.approx(wins / (len(positives) * len(negatives)), abs=1e-9)
    assert time.perf_counter() - started < 60


def _no_lesion_reaches_training(model: Path, scans: Path) -> None:
    """Every stored training slice is a slice z of its source whose lesion mask (read with nibabel) is empty at z,
    and every scored lesion-free z trains. LGG volumes are axial and RAS with the slices along the third axis, so
    prepared slice z is volume slice z."""
    config = mri_config_from_dict(yaml.safe_load((model / "mri.yaml").read_text()))
    tensors = load_slice_tensors(model / "data" / "healthy_train")
    manifest = json.loads((model / "data" / "healthy_train" / "manifest.json").read_text())
    for i, source in enumerate(manifest["sources"]):
        scan = Path(source["path"])
        lesion = np.asarray(nib.load(str(scans / scan.name.replace("_flair", "_mask"))).dataobj) > 0
        lesion_z = lesion.any(axis=(0, 1))
        assert lesion_z.any()  # a patient: there are lesion slices to leave out
        prepared = prepare(scan, config.preprocessing)  # without the mask: the slices alone
        assert prepared.num_slices == lesion.shape[2]
        stored = tensors["images"][tensors["source_index"] == i]
        trained_z = sorted(next(z for z in range(prepared.num_slices) if torch.equal(prepared.slices[z], image))
                           for image in stored)
        assert not lesion_z[trained_z].any()
        assert trained_z == [z for z in range(prepared.num_slices) if prepared.keep[z] and not lesion_z[z]]
