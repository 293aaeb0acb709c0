"""Sharded scoring: parts (--num-parts/--part-id, or torchrun) merged give one process's tables row for row and
its maps; processes scoring into one folder at once keep each other's rows."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from medflowad.cli.app import app
from typer.testing import CliRunner

from medflowad.mri.score import merge_parts, score_scans
from tests.mri.conftest import brain_like, oblique_lps_affine, save_nifti


@pytest.fixture
def scans(tmp_path) -> Path:
    folder = tmp_path / "scans"
    folder.mkdir()
    for i in range(7):
        save_nifti(folder / f"s{i}.nii.gz", brain_like(seed=80 + i, blob=(20, 25, 6) if i % 3 == 0 else None),
                   oblique_lps_affine())
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 not a scan")  # a failing scan is a row too
    return folder


def _rows(path: Path, drop: tuple[str, ...] = ("seconds",)) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def _same_outputs(one: Path, other: Path) -> None:
    assert _rows(one / "scores.csv") == _rows(other / "scores.csv")
    assert _rows(one / "slices.csv") == _rows(other / "slices.csv")
    maps = sorted(p.name for p in one.glob("*.nii.gz"))
    assert maps and maps == sorted(p.name for p in other.glob("*.nii.gz"))
    for name in maps:
        assert np.array_equal(np.asarray(nib.load(str(one / name)).dataobj),
                              np.asarray(nib.load(str(other / name)).dataobj)), name


def test_two_parts_merged_equal_one_process(tiny_mri_model, scans, tmp_path):
    score_scans([scans], tiny_mri_model, tmp_path / "one", device="cpu")
    out = tmp_path / "sharded"
    for part_id in (1, 0):  # in any order
        result = score_scans([scans], tiny_mri_model, out, device="cpu", part=(part_id, 2))
        assert len(result.rows) == 4
    assert not (out / "scores.csv").exists()
    merged = merge_parts(out, report=True, model_dir=tiny_mri_model, device="cpu")
    assert len(merged.rows) == 8 and (out / "report.html").is_file()
    _same_outputs(tmp_path / "one", out)
    # a part run again with --continue skips its finished scans
    again = score_scans([scans], tiny_mri_model, out, device="cpu", part=(0, 2), resume=True)
    assert len(again.resumed) == 3  # its broken scan is tried again
    result = CliRunner().invoke(app, ["score-merge", str(tmp_path / "one")])
    assert result.exit_code == 2 and "no parts to merge" in result.output


def test_a_missing_part_is_named(tiny_mri_model, scans, tmp_path):
    score_scans([scans], tiny_mri_model, tmp_path / "out", device="cpu", part=(0, 3))
    result = CliRunner().invoke(app, ["score-merge", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "parts missing (part-1-of-3, part-2-of-3)" in " ".join(result.output.split())


CONCURRENT = """
import sys
import medflowad.mri.tables as tables
tables.TABLE_INTERVAL_S = 0.0  # rewrite the shared tables after every scan: the most chances to collide
from medflowad.cli.app import main
sys.argv = ["medflowad", *sys.argv[1:]]
main()
"""


def test_concurrent_processes_into_one_folder_lose_no_rows(tiny_mri_model, tmp_path):
    groups = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        groups.append([save_nifti(folder / f"{name}{i}.nii.gz", brain_like(seed=i + (0 if name == "a" else 50)),
                                  np.eye(4)) for i in range(6)])
    out = tmp_path / "shared"
    processes = [subprocess.Popen([sys.executable, "-c", CONCURRENT, "score", str(tmp_path / name), "-m",
                                   str(tiny_mri_model), "-o", str(out), "--device", "cpu", "-q"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8",
                                  errors="replace") for name in ("a", "b")]
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output
    rows = _rows(out / "scores.csv")
    assert sorted(r["scan_id"] for r in rows) == sorted(p.name.removesuffix(".nii.gz") for g in groups for p in g)
    slices = _rows(out / "slices.csv")
    assert {r["scan_id"] for r in slices} == {r["scan_id"] for r in rows}
    assert len(slices) == sum(int(r["slices"]) for r in rows)


@pytest.mark.slow
def test_score_under_torchrun_merges_its_parts(tiny_mri_model, scans, tmp_path):
    score_scans([scans], tiny_mri_model, tmp_path / "one", device="cpu")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "medflowad",
                          "score", str(scans), "-m", str(tiny_mri_model), "-o", str(tmp_path / "ddp"),
                          "--device", "cpu", "-q"], capture_output=True, encoding="utf-8", errors="replace",
                         timeout=300)
    assert run.returncode in (0, 1), run.stdout[-3000:] + run.stderr[-3000:]  # 1: the broken scan failed
    assert "merged 2 parts: 8 scans" in run.stdout
    # torchrun runs each process with one thread (OMP_NUM_THREADS=1): sums in another order, equal to float
    # precision; the rows, their order and every non-numeric cell are identical
    one, ddp = _rows(tmp_path / "one" / "scores.csv"), _rows(tmp_path / "ddp" / "scores.csv")
    assert [r["scan_id"] for r in one] == [r["scan_id"] for r in ddp]
    for a, b in zip(one, ddp, strict=True):
        for key, value in a.items():
            if key in ("llr", "llr_fg", "last_scale", "last_scale_fg", "nll", "intensity_normative") and value:
                assert float(b[key]) == pytest.approx(float(value), rel=1e-4, abs=1e-4), key
            elif not key.endswith("_p"):
                assert b[key] == value, key
    for path in sorted((tmp_path / "one").glob("*_anomaly.nii.gz")):
        np.testing.assert_allclose(np.asarray(nib.load(str(tmp_path / "ddp" / path.name)).dataobj),
                                   np.asarray(nib.load(str(path)).dataobj), rtol=0, atol=1e-4)
