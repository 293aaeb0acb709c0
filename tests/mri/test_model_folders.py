"""Broken MRI model folders: every way load_mri_model refuses one gives one clear error naming the file, and
`medflowad score` turns it into a one-line message with exit code 2 and no traceback."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from medflowad.cli.app import app
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from medflowad.mri.model import load_mri_model
from medflowad.storage import ModelFolderError
from tests.mri.conftest import brain_like, save_nifti


def _edit_yaml(path: Path, change: Callable[[dict], None]) -> None:
    values = yaml.safe_load(path.read_text())
    change(values)
    path.write_text(yaml.safe_dump(values))


def _drop_calibration_key(folder: Path) -> None:
    tensors = load_file(str(folder / "calibration.safetensors"))
    del tensors["voxel/llr"]
    save_file(tensors, str(folder / "calibration.safetensors"))


BREAKAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "no mri.yaml": (lambda f: (f / "mri.yaml").unlink(), r"not an MRI model folder \(no mri\.yaml"),
    "no calibration": (lambda f: (f / "calibration.safetensors").unlink(),
                       r"no calibration\.safetensors \(training did not finish\)"),
    "stale calibration": (_drop_calibration_key, r"calibration lacks voxel/llr \(made by an older medflowad\)"),
    "other architecture": (lambda f: _edit_yaml(f / "in" / "config.yaml", lambda v: v["model"].update(hidden=8)),
                           r"in/model\.safetensors: weights do not fit the configured architecture \(wrong shape"),
    "no weights": (lambda f: (f / "general" / "model.safetensors").unlink(),
                   r"general: no model\.safetensors \(training not finished\?\)"),
    "hostile yaml tag": (lambda f: (f / "mri.yaml").write_text("!!python/object/apply:os.system ['touch pwned']\n"),
                         r"mri\.yaml: not valid medflowad YAML \(could not determine a constructor"),
    "unknown key": (lambda f: _edit_yaml(f / "mri.yaml", lambda v: v.update(colour="blue")),
                    r"mri\.yaml: unknown key\(s\) colour"),
    "wrong type": (lambda f: _edit_yaml(f / "mri.yaml", lambda v: v.update(fpr="often")),
                   r"mri\.yaml\.fpr: expected float, got 'often'"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_broken_model_folder_is_refused_naming_the_file(tiny_mri_model, tmp_path, breakage):
    folder = tmp_path / "model"
    shutil.copytree(tiny_mri_model, folder)
    damage, message = BREAKAGES[breakage]
    damage(folder)
    with pytest.raises(ModelFolderError, match=message):
        load_mri_model(folder, device="cpu")
    scan = save_nifti(tmp_path / "s.nii.gz", brain_like(seed=5), np.eye(4))
    result = CliRunner().invoke(app, ["score", str(scan), "-m", str(folder), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2, result.output
    assert str(folder) in result.output and "Traceback" not in result.output
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
