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
from tests.mri.conftest import TINY_MRI, brain_like, save_nifti


def _edit_yaml(path: Path, change: Callable[[dict], None]) -> None:
    values = yaml.safe_load(path.read_text())
    change(values)
    path.write_text(yaml.safe_dump(values))


def _edit_tensors(path: Path, change: Callable[[dict], None]) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file({k: v.copy(order="C") for k, v in tensors.items()}, str(path))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


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
    "truncated weights": (lambda f: _truncate(f / "in" / "model.safetensors"),
                          r"in/model\.safetensors: cannot read safetensors file"),
    "float64 weights": (lambda f: _edit_tensors(f / "in" / "model.safetensors",
                                                lambda t: t.update({k: v.astype(np.float64) for k, v in t.items()})),
                        r"in/model\.safetensors: weights do not fit .*wrong dtype"),
    "NaN weights": (lambda f: _edit_tensors(f / "general" / "model.safetensors",
                                            lambda t: t.update({k: v * np.nan for k, v in list(t.items())[:1]})),
                    r"general/model\.safetensors: non-finite weights"),
    "truncated calibration": (lambda f: _truncate(f / "calibration.safetensors"),
                              r"calibration\.safetensors: cannot read safetensors file"),
    "calibration of 2-D samples": (lambda f: _edit_tensors(f / "calibration.safetensors",
                                                           lambda t: t.update({"voxel/llr": t["voxel/llr"][:, None]})),
                                   r"calibration\.safetensors: voxel/llr has shape \(\d+, 1\)"),
    "statistics off the grid": (lambda f: _edit_tensors(
        f / "calibration.safetensors", lambda t: t.update({"normative/llr/centre": t["normative/llr/centre"][:, :5]})),
        r"normative/llr/centre has shape \(16, 5, 32\)"),
    "extra calibration entry": (lambda f: _edit_tensors(f / "calibration.safetensors",
                                                        lambda t: t.update({"weights": np.zeros(3, np.float32)})),
                                r"calibration\.safetensors: unknown entry 'weights'"),
    "binary mri.yaml": (lambda f: (f / "mri.yaml").write_bytes(b"\xff\xfe\x00 garbage"),
                        r"mri\.yaml: not a text file"),
    "mri.yaml a list": (lambda f: (f / "mri.yaml").write_text("- 1\n- 2\n"),
                        r"mri\.yaml: expected a mapping of settings, got list"),
    "hostile Glow config": (lambda f: (f / "in" / "config.yaml").write_text("!!python/object/apply:os.system ['x']"),
                            r"in/config\.yaml: not valid medflowad YAML"),
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
    for command in (["score", str(scan), "-m", str(folder), "-o", str(tmp_path / "out"), "-q"],
                    ["evaluate", "-m", str(folder), "--scans", str(scan), "-o", str(tmp_path / "eval"), "-q"],
                    ["export", str(folder), "--out", str(tmp_path / "bundle")]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, (command[0], result.output)
        assert str(folder) in " ".join(result.output.split()) and "Traceback" not in result.output, command[0]
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "out" / "s_anomaly.nii.gz").exists()


def test_a_damaged_general_model_is_refused_by_train(tiny_mri_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_mri_model, folder)
    _truncate(folder / "general" / "model.safetensors")
    healthy = [save_nifti(tmp_path / f"h{i}.nii.gz", brain_like(seed=i), np.eye(4)) for i in range(2)]
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_MRI))
    result = CliRunner().invoke(app, ["train", "--modality", "flair", "--data", str(healthy[0]), "--data",
                                      str(healthy[1]), "--general-model", str(folder / "general"), "-c", str(config),
                                      "-o", str(tmp_path / "new"), "-q"])
    assert result.exit_code == 2, result.output
    assert "general/model.safetensors: cannot read safetensors file" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_a_damaged_manifest_is_named(tiny_mri_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_mri_model, folder)
    (folder / "data" / "healthy_train" / "manifest.json").write_text("{not json")
    scan = save_nifti(tmp_path / "s.nii.gz", brain_like(seed=5), np.eye(4))
    result = CliRunner().invoke(app, ["score", str(scan), "-m", str(folder), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "healthy_train/manifest.json: not a medflowad slice-set manifest" in " ".join(result.output.split())


def test_damaged_pool_manifest_and_training_record_are_named(tiny_mri_model, tmp_path):
    from medflowad.mri.config import mri_config_from_dict
    from medflowad.mri.pool import build_pool

    healthy = [save_nifti(tmp_path / f"h{i}.nii.gz", brain_like(seed=i), np.eye(4)) for i in range(2)]
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_MRI))
    pool = tmp_path / "pool"
    build_pool([healthy[0]], pool, mri_config_from_dict(TINY_MRI).preprocessing)
    (pool / "manifest.json").write_text("[1, 2")
    train = ["train", "--modality", "flair", "--data", str(healthy[0]), "--data", str(healthy[1]),
             "-c", str(config), "-q", "-o"]
    result = CliRunner().invoke(app, [*train, str(tmp_path / "a"), "--pool", str(pool)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "pool/manifest.json: not a readable manifest" in " ".join(result.output.split())

    folder = tmp_path / "model"
    shutil.copytree(tiny_mri_model, folder)
    (folder / "data" / "trained_on.json").write_text("not json")
    result = CliRunner().invoke(app, [*train, str(folder), "--general-model", str(folder / "general")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "trained_on.json: not a readable record of the training data" in " ".join(result.output.split())
