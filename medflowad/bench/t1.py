"""Protocol D (PROTOCOL.md): T1 lesion detection on real healthy heads with painted lesions.

Data: the IXI T1 heads of ``medical/ixi_t1_2mm`` (2 mm, skull on, DLMUSE label maps). The fixed split
(``ixi_t1_split.tsv``) trains on five subjects (one of them drawn by the config's seed to calibrate) and
holds two apart; those two are scanned as they are (healthy) and with lesions painted in
(:mod:`medflowad.data.painting`, seeded). Everything lands in OUT and is reused when present:

- ``brain_extraction.json``: Dice of the brain extraction against DLMUSE (label > 0), per subject;
- ``test/``: the held-apart scans, healthy copies (with empty masks) and painted ones, ``lesions.json``;
- ``pool/``: the general pool (default: :func:`default_pool`; other kinds, never IXI);
- ``t1/``: general and in-distribution models (``--config``, default the demo's ``mri_demo``);
- ``eval/``: voxel metrics inside the brain, pooled over the painted scans, for every map and the two
  intensity baselines; ``scores/``: ``medflowad score`` of the test scans (scan-level AUROC painted vs
  healthy, healthy scans flagged); ``overlays/``: image, lesion contour and maps of the painted lesions.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from medflowad.bench.mri import read_split
from medflowad.bench.overlays import lesion_overlays
from medflowad.bench.stages import Stages
from medflowad.data.painting import paint_scan_file
from medflowad.mri.analysis import SLICE_SCORES
from medflowad.mri.config import load_mri_config
from medflowad.mri.evaluate import dice, evaluate_scans, metrics_markdown
from medflowad.mri.pool import build_pool
from medflowad.mri.score import score_scans
from medflowad.mri.training import train_mri_model
from medflowad.prep import prepare
from medflowad.storage import write_json, write_text

LESION_MASKS = ("_t1", "_t1_mask")
IXI = "ixi_t1_2mm"
OVERLAY_MAPS = (("llr", "llr"), ("llr, normative z", "llr_normative"), ("llr_c1", "llr_c1"),
                ("intensity beyond healthy range", "intensity_normative"),
                ("|z| intensity baseline", "intensity_abs_z"))


@dataclass
class T1BenchSettings:
    data: str = "$MEDFLOWAD_DATA"
    config: str = "mri_demo"
    split: str | None = None  # TSV subject<TAB>train|test; default: the fixed split shipped with medflowad
    pool: Sequence[str] | None = None  # general pool sources; None: the default (module docstring)
    copies: int = 3  # painted copies of every held-apart subject
    lesions: int = 2  # lesions per painted copy
    seed: int = 0  # painting seed
    general_steps: int | None = None  # None: as the config says
    in_steps: int | None = None
    device: str = "auto"
    overlays: int = 6


def default_pool(medical: Path) -> list[str]:
    """Other kinds than healthy T1 heads: the 2D brain tumour set (Training, all classes; pictures, resized)
    and the NIfTI samples (volumes of several modalities, registered like every scan; those registration
    refuses are left out). LGG's nominal affine cannot be registered, so LGG is not in it."""
    return [f"{medical / 'brain_tumor_mri_2d.zip'}::Training", str(medical / "nifti_samples")]


def make_test_set(ixi: Path, subjects: Sequence[str], out: Path, copies: int, lesions: int, seed: int) -> list[dict]:
    """Healthy copies (empty lesion masks) and painted copies of the held-apart subjects in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, subject in enumerate(subjects):
        scan, labels = ixi / f"{subject}_T1.nii.gz", ixi / f"{subject}_dlmuse.nii.gz"
        source = nib.load(str(scan))
        shutil.copyfile(scan, out / f"{subject}_t1.nii.gz")
        empty = nib.Nifti1Image(np.zeros(source.shape, dtype=np.uint8), source.affine, source.header.copy())
        empty.set_data_dtype(np.uint8)
        empty.header.set_slope_inter(1.0, 0.0)
        nib.save(empty, str(out / f"{subject}_t1_mask.nii.gz"))
        records.append({"source": scan.name, "painted": None, "healthy": f"{subject}_t1.nii.gz"})
        records += paint_scan_file(out / f"{subject}_t1.nii.gz", labels, out, copies, seed + 100 * i, lesions)
    write_json(out / "lesions.json", {"seed": seed, "copies": copies, "lesions_per_copy": lesions, "scans": records})
    return records


def brain_extraction_dice(ixi: Path, subjects: Sequence[str], config) -> dict[str, float]:
    """Dice of the preparation's brain mask (native grid) against DLMUSE label > 0, per subject."""
    result = {}
    for subject in subjects:
        prepared = prepare(ixi / f"{subject}_T1.nii.gz", config.preprocessing)
        labels = np.asarray(nib.load(str(ixi / f"{subject}_dlmuse.nii.gz")).dataobj) > 0
        result[subject] = round(dice(np.asarray(prepared.brain) > 0.5, labels), 4)
    return result


def run_t1_bench(settings: T1BenchSettings, out: Path, show_progress: bool = True,
                 echo: Callable[[str], None] = print) -> dict:
    started = time.perf_counter()
    out = Path(out)
    medical = Path(os.path.expandvars(settings.data)) / "medical"
    ixi = medical / IXI
    if not ixi.is_dir():
        raise ValueError(f"{ixi}: no such folder (set MEDFLOWAD_DATA or --data)")
    config = load_mri_config(settings.config)
    if config.preprocessing.space != "standard":
        raise ValueError(f"{settings.config}: protocol D compares maps location by location; it needs a "
                         f"standard-space config, this one prepares in {config.preprocessing.space} space")
    config.device = settings.device
    config.general_steps = settings.general_steps or config.general_steps
    config.in_steps = settings.in_steps or config.in_steps
    split = read_split(settings.split, "ixi_t1_split.tsv")
    train_scans = [ixi / f"{s}_T1.nii.gz" for s in split["train"]]
    stages = Stages(echo)

    test = out / "test"
    stages.run("painting lesions into the held-apart subjects", (test / "lesions.json").exists(),
          lambda: make_test_set(ixi, split["test"], test, settings.copies, settings.lesions, settings.seed))
    brain_dice = brain_extraction_dice(ixi, split["train"] + split["test"], config)
    pool = out / "pool"
    sources = list(settings.pool) if settings.pool is not None else default_pool(medical)
    stages.run("building the general pool", (pool / "manifest.json").exists(),
          lambda: build_pool(sources, pool, config.preprocessing))
    model_dir = out / "t1"
    stages.run("training the T1 models", (model_dir / "calibration.safetensors").exists(), lambda: train_mri_model(
        config, train_scans, model_dir, pool=pool, show_progress=show_progress, echo=echo))

    echo("evaluating the maps on the painted scans")
    painted = sorted(test.glob("*-painted*_t1.nii.gz"))
    voxel = evaluate_scans(model_dir, painted, LESION_MASKS, out / "eval", device=settings.device)
    echo("scoring the held-apart scans, healthy and painted")
    shutil.rmtree(out / "scores", ignore_errors=True)
    scored = score_scans([test], model_dir, out / "scores", device=settings.device, pattern="*_t1")
    scan_level = scan_metrics(scored.rows, scored.warning)
    lesion_overlays(model_dir, painted, out / "overlays", settings.overlays, settings.device, LESION_MASKS,
                    OVERLAY_MAPS)
    result = {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(settings).items()},
              "split": split, "brain_extraction_dice": brain_dice,
              "calibration_scans": _calibration_scans(model_dir), "voxel": voxel, "scan": scan_level,
              "timings": {**stages.timings, "total_s": round(time.perf_counter() - started, 1)},
              "torch_threads": torch.get_num_threads()}
    write_json(out / "metrics.json", result)
    write_text(out / "results.md", t1_markdown(result))
    return result


def scan_metrics(rows: list[dict], flag_note: str | None) -> dict:
    """Scan AUROC painted vs healthy for every scan score, and flags at the model's FPR."""
    rows = [r for r in rows if r["status"] == "ok"]
    painted = np.array(["-painted" in r["scan_id"] for r in rows])
    result: dict = {"healthy": int((~painted).sum()), "painted": int(painted.sum()), "scores": {}}
    for name in SLICE_SCORES:
        # a score the model's calibration lacks is empty (NaN) in every row: no AUROC for it
        values = np.array([r.get(name, np.nan) for r in rows], dtype=np.float64)
        flags = np.array([bool(r.get(f"{name}_flag")) for r in rows])
        both = painted.any() and (~painted).any() and bool(np.isfinite(values).all())
        result["scores"][name] = {
            "auroc": float(roc_auc_score(painted, values)) if both else float("nan"),
            "flagged_painted": int(flags[painted].sum()), "flagged_healthy": int(flags[~painted].sum())}
    result["flag_note"] = flag_note
    return result


def _calibration_scans(model_dir: Path) -> list[str]:
    from medflowad.data.slice_sets import load_slice_set_manifest

    manifest = load_slice_set_manifest(model_dir / "data" / "healthy_val")
    return [Path(s["path"]).name for s in manifest.get("sources", [])]


def t1_markdown(result: dict) -> str:
    scan = result["scan"]
    lines = [f"### Protocol D: IXI T1 with painted lesions ({len(result['split']['test'])} held-apart subjects, "
             f"{scan['painted']} painted and {scan['healthy']} healthy scans)", "",
             "Brain extraction Dice against DLMUSE: " + ", ".join(
                 f"{k} {v:.3f}" for k, v in result["brain_extraction_dice"].items()),
             f"Calibration scans: {', '.join(result['calibration_scans'])}", "", metrics_markdown(result["voxel"]),
             "| scan score | AUROC painted vs healthy | painted flagged | healthy flagged |", "|---|---|---|---|"]
    lines += [f"| {n} | {m['auroc']:.3f} | {m['flagged_painted']} of {scan['painted']} | "
              f"{m['flagged_healthy']} of {scan['healthy']} |" for n, m in scan["scores"].items()]
    if scan.get("flag_note"):
        lines += ["", f"Flags: {scan['flag_note']}"]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in result["timings"].items())]
    return "\n".join(lines) + "\n"
