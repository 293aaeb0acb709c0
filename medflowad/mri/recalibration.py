"""A trained model calibrated anew on another site's healthy scans, without training.

The Glow weights of an MRI model describe healthy anatomy in general; what ties a model to the scanner it
was built on is its calibration: the intensity landmarks, the per-location healthy ranges and statistics,
and the healthy distributions of scores and map values behind every p-value and threshold
(:func:`medflowad.mri.calibration.calibrate`). Healthy heads of another scanner or sequence lie outside
that calibration as a whole (``unlike_healthy`` in ``score``'s tables). :func:`recalibrate_model` writes a
new model folder with the same weights and a calibration made on the given healthy scans, in minutes.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from medflowad.data.readers import ScanError, absolute_scan_path, scan_id
from medflowad.mri.calibration import calibrate, calibration_summary
from medflowad.mri.model import (
    RECALIBRATION_FILE,
    SCORING_FILES,
    load_mri_model,
    model_fingerprint,
    resolve_model_dir,
)
from medflowad.mri.normative import calibration_shares, limit_setter_note
from medflowad.mri.selection import listed, mixed_modality_notes, select_scans, subject_of
from medflowad.prep import prepare
from medflowad.storage import current_umask, write_json, write_tensors

# Files copied from the source model: its weights and settings. Its calibration is replaced, its training
# records (data/, metrics.json) describe scans that do not calibrate the new folder, so they stay behind.
WEIGHT_FILES = tuple(name for name in SCORING_FILES if not name.startswith("calibration."))


def recalibrate_model(model: str | Path, healthy: Sequence[str | Path], out: Path, pattern: str | None = None,
                      mask_replace: tuple[str, str] | None = None, device: str = "auto",
                      say: Callable[[str], None] = lambda message: None) -> dict:
    """Write ``out``: the model folder (or bundled model) ``model`` with its weights and settings, calibrated
    on the healthy scans found in ``healthy`` (files, folders, DICOM series; ``pattern`` keeps matching
    names). Every scan calibrates (none is held back: no model is fitted to them here), by the calibration's
    usual rules, the model-free intensity statistics with subjects left out (:func:`medflowad.mri.selection.
    subject_of` says who a scan belongs to). With ``mask_replace`` (OLD=NEW of lesion-mask names), patients'
    scans give their healthy parts. Scans that cannot be prepared are skipped with their reasons.

    Refuses an ``out`` that holds anything (nothing is overwritten) and fewer than two subjects (no healthy
    range could be measured on left-out subjects). The folder is written beside ``out`` and renamed into place
    when complete, so an interruption leaves no half model. Returns what ``recalibration.json`` records."""
    source = resolve_model_dir(model)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty folder; give a new folder for the calibrated model")
    loaded = load_mri_model(source, device, calibrated=False)
    scans = select_scans(healthy, pattern, mask_replace)
    if not scans:
        raise ValueError(f"no scans found in {', '.join(str(h) for h in healthy)}"
                         + (f" matching {pattern!r}" if pattern else ""))
    notes = mixed_modality_notes(scans, loaded.config.modality, pattern, "calibrate")
    prepared, used, skipped = [], [], []
    for path in scans:
        try:
            scan = prepare(path, loaded.config.preprocessing, mask_replace)
        except ScanError as exc:
            skipped.append({"scan": str(path), "error": str(exc)})
            say(f"skipped {path}: {exc}")
            continue
        prepared.append(dataclasses.replace(scan, native=None, brain=None))  # model-grid slices are enough
        used.append(path)
        say(f"prepared {scan_id(path)} ({len(used)} of {len(scans)})")
    subjects = [subject_of(path) for path in used]
    if len(set(subjects)) < 2:
        found = len(set(subjects))
        problems = f"; {len(skipped)} could not be: " + "; ".join(s["error"] for s in skipped[:3]) if skipped else ""
        raise ValueError(f"{found} subject{'s' if found != 1 else ''} among the scans that could be prepared "
                         f"({listed([scan_id(p) for p in used]) or 'none'}){problems}. Calibration needs healthy "
                         "scans of at least two subjects (better 20 or more: with n scans no scan p-value is below "
                         "1 / (n + 1))")
    say(f"calibrating on {len(used)} scans of {len(set(subjects))} subjects")
    calibration = calibrate(loaded, prepared, (), subjects)
    shares = calibration_shares(calibration, [absolute_scan_path(p) for p in used])
    note = limit_setter_note(shares)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    summary = calibration_summary(calibration, loaded.config.fpr)
    record = {
        "source_model": str(source), "source_model_sha256": model_fingerprint(source),
        "calibration_scans": [absolute_scan_path(p) for p in used], "subjects": len(set(subjects)),
        "skipped_scans": skipped, "notes": notes, "beyond_range_shares": shares, "limit_note": note,
        "calibration": summary,
    }
    try:
        for name in WEIGHT_FILES:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, staging / name)
        write_tensors(staging / "calibration.safetensors", {k: torch.from_numpy(v) for k, v in calibration.items()})
        write_json(staging / "calibration.json", summary)
        write_json(staging / RECALIBRATION_FILE, record)
        staging.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would hide the model from other users
        if out.is_dir():
            out.rmdir()  # empty (checked above): the complete folder takes its place
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record
