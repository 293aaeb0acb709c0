"""`medflowad bench speed --quick`: every part runs and reports figures that are consistent with each other."""

from __future__ import annotations

import json

import pytest
import torch
from medflowad.cli.app import app
from typer.testing import CliRunner


@pytest.mark.slow
def test_quick_speed_bench_reports_every_part(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFLOWAD_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["bench", "speed", "-o", str(tmp_path / "speed"), "--quick", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    speed = json.loads((tmp_path / "speed" / "speed.json").read_text())
    from medflowad.devices import native_bfloat16

    rows = [(g["architecture"], g["layout"], g["train_precision"]) for g in speed["glow"]]
    fast_path = ([("cifar10_cpu", "default", "bfloat16"), ("cifar10_cpu", "nhwc", "bfloat16")]
                 if native_bfloat16(torch.device("cpu")) else [])
    assert rows == [("cifar10_cpu", "default", "float32"), ("cifar10_cpu", "nhwc", "float32"), *fast_path]
    assert all(g["train_images_per_s"] > 0 and g["score_images_per_s"] > 0 for g in speed["glow"])
    stages = speed["scan_stages"]["seconds_per_stage"]
    assert set(stages) == {"read", "prepare", "models", "maps", "write"} and all(v > 0 for v in stages.values())
    assert speed["scan_stages"]["seconds_per_scan"] == pytest.approx(sum(stages.values()), abs=0.01)
    assert [r["scans"] for r in speed["scan_scaling"]] == [1, 2]
    assert [r["processes"] for r in speed["ddp"]] == [1, 2] and all(r["steps"] == 3 for r in speed["ddp"])
    assert "| DDP processes" in (tmp_path / "speed" / "speed.md").read_text()
