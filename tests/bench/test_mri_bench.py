"""Reduced protocol-B benchmark on a synthetic data root laid out like the real one: outputs complete."""

import io
import json
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml
from medflowad.cli.app import app
from PIL import Image
from typer.testing import CliRunner

from tests.mri.conftest import TINY_MRI, brain_like, save_nifti


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(array / array.max() * 255, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bench_mri_reduced(tmp_path, monkeypatch):
    medical = tmp_path / "data" / "medical"
    lgg = medical / "lgg_flair128"
    lgg.mkdir(parents=True)
    affine = np.diag([2.0, 2.0, 1.0, 1.0])
    rows = []
    for i in range(5):
        blob = (20, 26, 6)
        volume = brain_like(shape=(48, 56, 12), seed=40 + i, blob=blob if i >= 1 else None)
        save_nifti(lgg / f"P{i}_flair.nii.gz", volume, affine)
        mask = (volume == 300).astype(np.uint8) if i >= 1 else np.zeros(volume.shape, np.uint8)
        save_nifti(lgg / f"P{i}_mask.nii.gz", mask, affine)
        rows.append(f"P{i}\t{'train' if i < 3 else 'test'}")
    split = tmp_path / "split.tsv"
    split.write_text("patient\tsplit\n" + "\n".join(rows) + "\n")
    with zipfile.ZipFile(medical / "brain_tumor_mri_2d.zip", "w") as archive:
        for split_name in ("Training", "Testing"):
            for cls, blob in (("notumor", None), ("glioma", (20, 20, 0))):
                for j in range(6):
                    picture = brain_like(shape=(40, 40, 1), seed=60 + j + (cls == "glioma") * 10, blob=blob)[..., 0]
                    archive.writestr(f"{split_name}/{cls}/{j}.png", _png(picture.astype(float)))
    (medical / "brain_tumor_mri_2d_duplicates.tsv").write_text(
        "group\tfile\n1\tTraining/notumor/0.png\n1\tTesting/notumor/0.png\n")
    (medical / "head_ct").mkdir()
    Image.open(io.BytesIO(_png(brain_like(shape=(40, 40, 1), seed=80)[..., 0].astype(float)))).save(
        medical / "head_ct" / "000.png")
    (medical / "nifti_samples").mkdir()
    save_nifti(medical / "nifti_samples" / "other.nii.gz", brain_like(shape=(40, 40, 10), seed=81), np.eye(4))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY_MRI, "val_fraction": 0.34}))

    args = ["bench", "mri", "-o", str(tmp_path / "bench"), "--data", str(tmp_path / "data"), "-c", str(config),
            "--split", str(split), "--general-steps", "4", "--in-steps", "3", "--tumor-steps", "2", "--channels-last",
            "--brain", "auto", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    bench = tmp_path / "bench"
    for trained in ("flair/general", "flair/in", "flair_outlier/in", "tumor2d/model"):
        assert yaml.safe_load((bench / trained / "config.yaml").read_text())["channels_last"] is True, trained
    metrics = json.loads((bench / "metrics.json").read_text())
    lesion = metrics["lesion"]
    assert lesion["scans"] == 2
    assert {"llr", "llr_fg", "last_scale", "nll", "intensity", "llr_outlier", "llr_fg_outlier"} <= set(lesion["slice"])
    voxel_maps = {"llr", "last_scale", "intensity", "llr_outlier", "llr_c1", "llr_c2", "llr_c1_outlier"}
    assert voxel_maps <= set(lesion["voxel"])
    assert np.isfinite(lesion["voxel"]["llr_c1"]["dice_at_healthy_fpr"])  # calibrated with the per-scale maps
    tumor = metrics["tumor_2d"]
    assert tumor["dropped_duplicates"] == 1 and tumor["notumor_test"] == 5
    assert set(tumor["classes"]) == {"glioma"} and 0 <= tumor["classes"]["glioma"]["llr"] <= 1
    assert len(list((bench / "maps").glob("*_anomaly.nii.gz"))) == 2
    overlays = list((bench / "overlays").glob("*.png"))
    assert overlays and all(p.read_bytes()[:4] == b"\x89PNG" for p in overlays)
    assert "intensity" in (bench / "results.md").read_text()

    # The pool holds every slice of the train patients' FLAIR that the models train on, lesion or not, and
    # nothing of the calibration or test patients.
    def sources(manifest: Path) -> dict[str, int]:
        return {s["path"]: s["slices"] for s in json.loads(manifest.read_text())["sources"]}

    pool = {k: v for k, v in sources(bench / "pool" / "manifest.json").items() if k.startswith(str(lgg))}
    healthy_train = sources(bench / "flair" / "data" / "healthy_train" / "manifest.json")
    assert set(pool) == set(healthy_train) and len(pool) == 2
    assert not set(pool) & set(sources(bench / "flair" / "data" / "healthy_val" / "manifest.json"))
    with_lesion = {scan: bool(nib.load(lgg / Path(scan).name.replace("_flair", "_mask")).get_fdata().any())
                   for scan in pool}
    assert sum(with_lesion.values()) == 1  # P1 trains, P2 is held apart for calibration
    for scan, slices in pool.items():  # lesions: drop_slices (the default): lesion slices do not train
        assert slices > healthy_train[scan] if with_lesion[scan] else slices == healthy_train[scan], scan

    # Rerun with the data folder named relatively: same scans, so the pool and models are reused.
    monkeypatch.chdir(tmp_path)
    relative = [*args]
    relative[relative.index("--data") + 1] = "data"
    again = CliRunner().invoke(app, relative)
    assert again.exit_code == 0, again.output
    assert "building the general pool" not in again.output and "training the FLAIR" not in again.output
    refused = CliRunner().invoke(app, [*args, "--no-pool-train-flair"])
    assert refused.exit_code != 0 and "train FLAIR scans" in refused.output
