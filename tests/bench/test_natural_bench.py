"""Reduced protocol-A benchmark on tiny zips laid out like the real data: outputs complete and well formed."""

import io
import json
import zipfile

import numpy as np
import pytest
import yaml
from medflowad.cli.app import app
from PIL import Image
from typer.testing import CliRunner

from medflowad.bench.natural import symlog_threshold
from medflowad.data.synthetic import synthetic_images


def _zip(path, folders: dict[str, np.ndarray]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for folder, images in folders.items():
            for i, image in enumerate(images):
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="PNG")
                archive.writestr(f"{folder}/c{i % 2}/{i:03d}.png", buffer.getvalue())


def test_bench_natural_reduced(tmp_path):
    natural = tmp_path / "data" / "natural"
    natural.mkdir(parents=True)
    blobs = lambda n, seed: synthetic_images(n, size=8, seed=seed)  # noqa: E731
    stripes = synthetic_images(40, size=8, seed=9, kind="stripes")
    _zip(natural / "cifar10.zip", {"train": blobs(64, 1), "test": blobs(40, 2)})
    _zip(natural / "tinyimagenet32.zip", {"train": np.concatenate([blobs(32, 3), stripes[:32]]), "val": stripes})
    _zip(natural / "flowers32.zip", {"all": synthetic_images(40, size=8, seed=5, kind="stripes")})
    head_ct = tmp_path / "data" / "medical" / "head_ct"  # greyscale and 16x16: converted to the model's input
    head_ct.mkdir(parents=True)
    for i, image in enumerate(synthetic_images(12, size=16, channels=1, seed=6)[..., 0]):
        Image.fromarray(image).save(head_ct / f"{i:03d}.png")
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump({
        "model": {"in_channels": 3, "image_size": [8, 8], "levels": 2, "steps": 1, "hidden": 8},
        "data": {"translate": 0.0, "test_limit": 0},
        "optim": {"batch_size": 16, "warmup_steps": 1},
        "outlier": {"batch_size": 8}, "device": "cpu", "checkpoint_every": 2, "eval_every": 2,
    }))
    extra = tmp_path / "extra.npz"
    np.savez(extra, images=synthetic_images(24, size=8, seed=7, kind="stripes"))
    args = ["bench", "natural", "-o", str(tmp_path / "bench"), "--data", str(tmp_path / "data"),
            "--preset", str(preset), "--general-steps", "3", "--finetune-steps", "2", "--limit", "0",
            "--ood", f"extra={extra}", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    bench = tmp_path / "bench"
    metrics = json.loads((bench / "metrics.json").read_text())
    sets = {r["set"] for r in metrics["rows"]}
    scores = {r["score"] for r in metrics["rows"]}
    assert sets == {"tinyimagenet_val", "flowers", "head_ct", "extra"}  # no brain MRI 2D zip in this data folder
    assert {"nll", "llr", "llr_outlier", "last_scale", "input_complexity", "c_1", "c_2"} == scores
    assert all(0 <= r["auroc"] <= 1 and 0 <= r["fpr95"] <= 1 for r in metrics["rows"])
    assert set(metrics["spearman"]) == {"cifar10_test", "tinyimagenet_val", "flowers", "head_ct", "extra"}
    assert set(metrics["bits_per_dim"]["flowers"]) == {"general", "in", "in_outlier"}
    text = (bench / "results.md").read_text()
    assert "| extra (n=24) |" in text and "Spearman" in text
    for png in ("score_histograms.png", "per_scale_auroc.png"):
        assert (bench / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second run reuses the trained models (no retraining) and gives the same table.
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "training" not in again.output
    assert json.loads((bench / "metrics.json").read_text())["rows"] == metrics["rows"]


def test_histograms_switch_to_symlog_only_for_far_spread_scores():
    rng = np.random.default_rng(0)
    in_distribution = rng.normal(0, 100, 2000)  # interquartile range about 135
    near = np.concatenate([in_distribution, rng.normal(300, 100, 2000)])
    far = np.concatenate([in_distribution, rng.normal(20000, 5000, 2000)])
    assert symlog_threshold(in_distribution, near) is None
    iqr = np.subtract(*np.percentile(in_distribution, [75, 25]))
    assert symlog_threshold(in_distribution, far) == pytest.approx(iqr)
