"""Crash safety, proven by killing real processes with SIGKILL: at random moments and while a file is half
written. After each kill every visible output is complete and readable, and the same command (``score
--continue``) finishes with the results of a run that was never interrupted (training: bit for bit)."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from tests.mri.conftest import TINY_MRI, brain_like, oblique_lps_affine, save_nifti

pytestmark = [pytest.mark.slow, pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")]

# Runs the CLI with safetensors' writer (or the JSON writer) replaced: the KILL_AT-th write whose file name
# contains KILL_NAME writes its temporary file, cuts it in half and kills the process with SIGKILL, so the
# kill lands inside an atomic write, before its rename.
KILLING_CLI = """
import os, signal, sys
from pathlib import Path
import medflowad.storage as storage

seen = {"n": 0}
def half_written_then_killed(tmp: str) -> None:
    if os.environ["KILL_NAME"] in Path(tmp).name:
        seen["n"] += 1
        if seen["n"] == int(os.environ["KILL_AT"]):
            size = Path(tmp).stat().st_size
            with open(tmp, "r+b") as fh:
                fh.truncate(size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
real_save, real_text = storage.save_file, storage.write_text
def save_file(tensors, filename, metadata=None):
    real_save(tensors, filename, metadata=metadata)
    half_written_then_killed(filename)
storage.save_file = save_file
real_atomic = storage.atomic_write
def atomic_write(path, write):
    def killing_write(tmp):
        write(tmp)
        half_written_then_killed(str(tmp))
    real_atomic(path, killing_write)
storage.atomic_write = atomic_write
from medflowad.cli.app import main
sys.argv = ["medflowad", *sys.argv[1:]]
main()
"""


def _cli(args: list[str], kill_name: str | None = None, kill_at: int = 1) -> subprocess.Popen:
    env = {**os.environ, "KILL_NAME": kill_name or "", "KILL_AT": str(kill_at)}
    plain = "import sys; from medflowad.cli.app import main; sys.argv[0] = 'medflowad'; main()"
    code = KILLING_CLI if kill_name else plain
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, encoding="utf-8", errors="replace")


def _finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def _kill_after(process: subprocess.Popen, seconds: float) -> bool:
    """SIGKILL ``process`` after ``seconds`` unless it ended first; True when it was killed."""
    try:
        process.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return True


def _visible_outputs_are_complete(folder: Path) -> None:
    """Every file not hidden (temporary files of atomic writes are) reads completely."""
    for path in folder.rglob("*"):
        if path.is_dir() or path.name.startswith("."):
            continue
        if path.name.endswith(".safetensors"):
            load_file(str(path))
        elif path.name.endswith(".nii.gz"):
            np.asarray(nib.load(str(path)).dataobj)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".yaml":
            yaml.safe_load(path.read_text())
        elif path.suffix == ".csv":
            with open(path, newline="") as f:
                list(csv.reader(f))


def _same_tensors(a: Path, b: Path) -> None:
    first, second = load_file(str(a)), load_file(str(b))
    assert first.keys() == second.keys()
    for key in first:
        assert np.array_equal(first[key], second[key]), key


def test_train_killed_at_random_moments_and_mid_checkpoint_resumes_to_the_same_weights(tmp_path, blobs_npz):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"in_channels": 3, "image_size": [8, 8], "levels": 2, "steps": 2, "hidden": 16},
        "data": {"train": str(blobs_npz), "translate": 0.0, "test_limit": 0},
        "optim": {"steps": 120, "batch_size": 32, "warmup_steps": 5, "lr": 1e-3},
        "device": "cpu", "checkpoint_every": 10, "eval_every": 1000, "seed": 3,
    }))
    command = ["train", "-c", str(config), "-q", "-o"]
    started = time.perf_counter()
    code, output = _finish(_cli([*command, str(tmp_path / "straight")]))
    assert code == 0, output
    wall = time.perf_counter() - started

    run = tmp_path / "killed"
    code, _ = _finish(_cli([*command, str(run)], kill_name="checkpoint", kill_at=3))
    assert code == -signal.SIGKILL  # killed inside the third checkpoint write
    assert list(run.glob(".checkpoint.safetensors.*.tmp"))  # the half-written temporary file is there...
    _visible_outputs_are_complete(run)  # ...and the checkpoint is the second one, whole
    rng = random.Random(7)
    for _ in range(3):
        _kill_after(_cli([*command, str(run)]), rng.uniform(0.5, 0.95) * wall)
        _visible_outputs_are_complete(run)
    code, output = _finish(_cli([*command, str(run)]))
    assert code == 0, output
    _same_tensors(tmp_path / "straight" / "model.safetensors", run / "model.safetensors")
    assert not list(run.glob(".*.tmp"))


@pytest.fixture
def scans(tmp_path) -> list[Path]:
    folder = tmp_path / "scans"
    folder.mkdir()
    return [save_nifti(folder / f"s{i}.nii.gz", brain_like(seed=60 + i, blob=(20, 25, 6) if i % 2 else None),
                       oblique_lps_affine()) for i in range(6)]


def test_pool_build_killed_then_rerun_completes_and_an_interrupted_pool_is_never_used(scans, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_MRI))
    build = ["pool", "build", str(tmp_path / "scans"), "-c", str(config), "-q", "-o"]
    code, output = _finish(_cli([*build, str(tmp_path / "straight")]))
    assert code == 0, output
    pool = tmp_path / "pool"
    code, _ = _finish(_cli([*build, str(pool)], kill_name="manifest", kill_at=1))  # slices written, manifest not
    assert code == -signal.SIGKILL and (pool / "slices.safetensors").is_file()
    assert not (pool / "manifest.json").exists()
    from medflowad.data.natural import load_image_set

    with pytest.raises(ValueError, match="an incomplete slice set"):
        load_image_set(str(pool), channels=1, size=(32, 32))
    _kill_after(_cli([*build, str(pool)]), 1.0)
    _visible_outputs_are_complete(pool)
    code, output = _finish(_cli([*build, str(pool)]))
    assert code == 0, output
    _same_tensors(tmp_path / "straight" / "slices.safetensors", pool / "slices.safetensors")
