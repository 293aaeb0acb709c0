"""The command line: help, info, a tiny train -> evaluate round trip, and clean errors."""

import json
import shutil
import subprocess

import numpy as np
import pytest
import yaml
from medflowad.cli.app import app
from PIL import Image
from typer.testing import CliRunner

from medflowad.config import load_config

runner = CliRunner()


def test_console_script_help_runs():
    exe = shutil.which("medflowad")
    if exe is None:
        pytest.skip("medflowad console script not installed (pip install -e .)")
    out = subprocess.run([exe, "--help"], capture_output=True, encoding="utf-8", errors="replace", check=True)
    assert "train" in out.stdout and "evaluate" in out.stdout


def test_train_help_and_info():
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    assert "--outlier-loss" in result.output
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    assert "torch" in result.output and "default device" in result.output


def _tiny_config(tmp_path, train, test):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"in_channels": 3, "image_size": [8, 8], "levels": 2, "steps": 1, "hidden": 8},
        "data": {"train": str(train), "test": str(test), "translate": 0.0, "test_limit": 0},
        "optim": {"steps": 6, "batch_size": 16, "warmup_steps": 2, "lr": 1e-3},
        "device": "cpu", "checkpoint_every": 3, "eval_every": 3,
    }))
    return path


def test_train_then_evaluate_round_trip(tmp_path, blobs_npz, blobs_test_npz, stripes_npz):
    config = _tiny_config(tmp_path, blobs_npz, blobs_test_npz)
    general = runner.invoke(app, ["train", "-c", str(config), "-o", str(tmp_path / "g"), "-q",
                                  "--train-data", str(stripes_npz)])
    assert general.exit_code == 0, general.output
    result = runner.invoke(app, ["train", "-c", str(config), "-o", str(tmp_path / "m"), "-q", "--steps", "4",
                                 "--init-from", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    assert "test bits/dim" in result.output
    saved = yaml.safe_load((tmp_path / "m" / "config.yaml").read_text())
    assert saved["optim"]["steps"] == 4 and saved["init_from"] == str(tmp_path / "g")

    result = runner.invoke(app, ["evaluate", "-m", str(tmp_path / "m"), "--general-model", str(tmp_path / "g"),
                                 "--in", str(blobs_test_npz), "--ood", f"stripes={stripes_npz}",
                                 "-o", str(tmp_path / "eval"), "-q"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    scores = {row["score"] for row in metrics["rows"]}
    assert {"nll", "llr", "last_scale", "c_1", "c_2", "input_complexity", "nll_general"} <= scores
    # AUROC of every score by counting pairs in the written per-image scores (OOD above in-distribution)
    inliers, outliers = np.load(tmp_path / "eval" / "scores_in.npz"), np.load(tmp_path / "eval" / "scores_stripes.npz")
    for row in metrics["rows"]:
        a, b = inliers[row["score"]], outliers[row["score"]]
        pairs = (b[:, None] > a[None, :]).sum() + 0.5 * (b[:, None] == a[None, :]).sum()
        assert row["auroc"] == pytest.approx(pairs / (len(a) * len(b)), abs=1e-12), row["score"]
    assert set(metrics["spearman"]) == {"in", "stripes"}
    table = (tmp_path / "eval" / "table.md").read_text()
    assert "| stripes (n=128) |" in table
    assert (tmp_path / "eval" / "scores_stripes.npz").exists()

    result = runner.invoke(app, ["evaluate", "-m", str(tmp_path / "m"), "--in", str(blobs_test_npz),
                                 "--ood", f"stripes={stripes_npz}", "--score", "last_scale", "--score", "nll",
                                 "-o", str(tmp_path / "eval2"), "-q", "--no-input-complexity"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "eval2" / "metrics.json").read_text())["rows"]
    assert [r["score"] for r in rows] == ["last_scale", "nll"]
    folder = tmp_path / "pictures" / "any"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    result = runner.invoke(app, ["evaluate", "-m", str(tmp_path / "m"), "--in", str(blobs_test_npz),
                                 "--ood", f"pictures={folder.parent}", "-o", str(tmp_path / "eval3"), "-q"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval3" / "metrics.json").read_text())
    assert metrics["sizes"]["pictures"] == 3 and metrics["skipped"]["pictures"][0].startswith(str(folder / "broken"))
    assert "pictures: 1 image file(s) could not be decoded" in (tmp_path / "eval3" / "table.md").read_text()
    result = runner.invoke(app, ["evaluate", "-m", str(tmp_path / "m"), "--in", str(blobs_test_npz),
                                 "--ood", f"stripes={stripes_npz}", "--score", "llr", "-q"])
    assert result.exit_code == 2 and "llr not available" in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["train", "-o", "x", "-c", "does_not_exist"], "no config file or preset"),
    (["evaluate", "-m", "nowhere", "--in", "a.npz", "--ood", "b=c.npz"], "model folder does not exist"),
    (["evaluate", "-m", "nowhere", "--in", "a.npz", "--ood", "bad"], "NAME=SPEC"),
    (["evaluate", "-m", "mri_model", "--in", "a.npz", "--ood", "b=c.npz"], "mri_model: an MRI model folder; evaluate "
     "it with --scans"),
    (["train", "-o", "x", "--pool", "p", "--calibration-seed", "0"], "--pool, --calibration-seed: MRI-mode options"),
    (["train", "-o", "x", "-c", "sample", "--lr", "-1"], "optim.lr must not be negative, got -1.0"),
    (["train", "-o", "x", "--modality", "t1", "--data", ".", "--general-steps", "0"], "greater than or equal to 1"),
    (["train", "-o", "x", "--modality", "t1", "--data", ".", "--train-data", "a.npz", "--init-from", "m"],
     "--train-data, --init-from: not used with --modality"),
    (["train", "-o", "x", "--modality", "t1", "--data", ".", "--test-data", "a.npz", "--general-data", "b.npz"],
     "--test-data, --general-data: not used with --modality"),
    (["score", "s.nii.gz", "-m", "demo", "-o", "x", "--batch-size", "0"], "greater than or equal to 1"),
    (["evaluate", "-m", "m", "--in", "a.npz", "--ood", "b=c.npz", "--limit", "0"], "greater than or equal to 1"),
    (["bench", "mri", "-o", "x", "--in-steps", "0"], "greater than or equal to 1"),
])
def test_errors_are_one_line_without_traceback(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mri_model").mkdir()
    (tmp_path / "mri_model" / "mri.yaml").write_text("modality: flair\n")
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.replace("│", " ").split())  # usage errors come in a wrapped panel
    assert "Traceback" not in result.output


def test_missing_training_data_is_named(tmp_path, blobs_test_npz):
    config = _tiny_config(tmp_path, tmp_path / "absent.npz", blobs_test_npz)
    result = runner.invoke(app, ["train", "-c", str(config), "-o", str(tmp_path / "m"), "-q"])
    assert result.exit_code == 2
    assert "absent.npz: no such file" in result.output


def test_cli_reference_is_current(tmp_path):
    """docs/cli.md is generated from the Typer app; regenerate it when this fails (command in docs/README.md)."""
    from pathlib import Path

    exe = shutil.which("typer")
    if exe is None:
        pytest.skip("typer command not installed")
    out = tmp_path / "cli.md"
    subprocess.run([exe, "medflowad.cli.app", "utils", "docs", "--name", "medflowad", "--output", str(out)],
                   check=True, capture_output=True)
    committed = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
    assert out.read_text() == committed.read_text()


def test_damaged_glow_folders_and_checkpoints_are_named(tmp_path, blobs_npz, blobs_test_npz):
    """train --init-from, evaluate and a resumed train meet a damaged folder: exit 2, the file, no traceback."""
    config = _tiny_config(tmp_path, blobs_npz, blobs_test_npz)
    assert runner.invoke(app, ["train", "-c", str(config), "-o", str(tmp_path / "g"), "-q"]).exit_code == 0
    weights = tmp_path / "g" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for args in (["train", "-c", str(config), "-o", str(tmp_path / "m"), "-q", "--init-from", str(tmp_path / "g")],
                 ["evaluate", "-m", str(tmp_path / "g"), "--in", str(blobs_test_npz), "--ood", f"b={blobs_npz}"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "g/model.safetensors: cannot read safetensors file" in " ".join(result.output.split())
        assert "Traceback" not in result.output

    from medflowad.training import train as run_training
    from medflowad.training.trainer import CHECKPOINT

    interrupted = tmp_path / "interrupted"
    run_training(load_config(config), interrupted, show_progress=False, stop_after=3)
    other = yaml.safe_load(config.read_text())
    other["model"]["hidden"] = 4
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    run_training(load_config(tmp_path / "other.yaml"), tmp_path / "other", show_progress=False, stop_after=3)
    checkpoint = interrupted / CHECKPOINT
    for damage, message in ((lambda: shutil.copyfile(tmp_path / "other" / CHECKPOINT, checkpoint),
                             "checkpoint.safetensors: does not fit this run"),
                            (lambda: checkpoint.write_bytes(b"\0" * 40), "checkpoint.safetensors: cannot read")):
        damage()
        result = runner.invoke(app, ["train", "-c", str(config), "-o", str(interrupted), "-q"])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    finished = tmp_path / "finished"
    assert runner.invoke(app, ["train", "-c", str(config), "-o", str(finished), "-q"]).exit_code == 0
    (finished / CHECKPOINT).write_bytes(b"{}" * 10)
    result = runner.invoke(app, ["train", "-c", str(config), "-o", str(finished), "-q"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "checkpoint.safetensors: cannot read checkpoint" in " ".join(result.output.split())
