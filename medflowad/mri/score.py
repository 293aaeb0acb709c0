"""``medflowad score``: per-scan scores, p-values, flags and NIfTI anomaly maps for a batch of scans.

For every scan, OUT receives ``<scan-id>_anomaly.nii.gz`` (per-voxel llr, nats per model pixel),
``<scan-id>_last_scale.nii.gz`` and ``<scan-id>_anomaly_mask.nii.gz`` (voxels above the healthy voxel
threshold at the chosen false-positive rate), all float32/uint8 NIfTI on the scan's own grid with its
affine. A scan is flagged when its conformal p-value is at most that rate. The batch gets
``scores.csv``, ``slices.csv`` and ``scores.json`` (and ``report.html`` when asked). Each file is
written through a temporary file and a rename, and the tables are rewritten after every scan, so an
interrupted or partly failing batch never leaves a partial file. A scan that fails is reported with its reason.
"""

from __future__ import annotations

import csv
import gzip
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from medflowad.data.readers import NIFTI_SUFFIXES, ScanError, scan_id
from medflowad.data.scans import PreparedScan, to_native
from medflowad.mri.analysis import (
    SLICE_SCORES,
    ScanAnalysis,
    conformal_p_value,
    flag_resolution_problem,
    threshold_at_fpr,
)
from medflowad.mri.model import MriModel, analyse, load_mri_model, prepare, select_scans
from medflowad.mri.report import SCORE as REPORT_SCORE
from medflowad.mri.report import ScanFigures, scan_figures, write_report
from medflowad.storage import atomic_write, write_json, write_text

SCAN_COLUMNS = ["scan_id", "status", "error", "path", "slices", "scored_slices"]


@dataclass
class BatchResult:
    rows: list[dict] = field(default_factory=list)
    slice_rows: list[dict] = field(default_factory=list)
    out: Path | None = None
    report: Path | None = None
    warning: str | None = None  # e.g. a calibration set too small for any flag at this FPR

    @property
    def all_ok(self) -> bool:
        return all(r["status"] == "ok" for r in self.rows)


def source_header(reference: PreparedScan) -> nib.Nifti1Header | None:
    """The input's NIfTI header (None for other formats), read once per scan for all its maps."""
    source = Path(str(reference.native.meta.get("filename_or_obj", "")))
    if source.name.lower().endswith(NIFTI_SUFFIXES) and source.is_file():
        return nib.load(str(source)).header
    return None


def write_nifti(path: Path, data: np.ndarray, reference: PreparedScan,
                header: nib.Nifti1Header | None = None) -> None:
    """Write ``data`` (native shape) with the scan's affine in both sform and qform, atomically.

    NIfTI inputs lend their own header (codes, units, orientation), so viewers overlay the map exactly;
    pass ``header`` from :func:`source_header` to avoid re-reading it for every map of a scan.
    """
    affine = reference.native.affine.numpy().astype(np.float64)
    header = header if header is not None else source_header(reference)
    if header is not None:
        header = header.copy()
        image = nib.Nifti1Image(data, affine, header=header)
        image.set_data_dtype(data.dtype)
        image.header.set_slope_inter(1.0, 0.0)
        sform_code = int(header["sform_code"]) or 1
        qform_code = int(header["qform_code"]) or 1
    else:
        image = nib.Nifti1Image(data, affine)
        image.header.set_xyzt_units("mm")
        sform_code = qform_code = 1
    image.set_sform(affine, code=sform_code)
    image.set_qform(affine, code=qform_code)
    payload = gzip.compress(image.to_bytes(), compresslevel=6)
    atomic_write(path, lambda tmp: tmp.write_bytes(payload))


def _unique_ids(paths: Sequence[Path]) -> list[str]:
    ids, seen = [], {}
    for p in paths:
        base = scan_id(p)
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return ids


def scan_scores(model: MriModel, analysis: ScanAnalysis, fpr: float) -> dict[str, float | bool]:
    """A scan's scores (``llr``, ...), their conformal p-values against the healthy calibration scans
    (``llr_p``, ...) and flags at ``fpr`` (``llr_flag``, ...)."""
    values = analysis.scan_scores(model.config.top_fraction)
    row: dict[str, float | bool] = {}
    for name in SLICE_SCORES:
        row[name] = values[name]
        row[f"{name}_p"] = conformal_p_value(values[name], model.calibration[f"scan/{name}"])
        row[f"{name}_flag"] = bool(row[f"{name}_p"] <= fpr)
    return row


def scans_to_score(inputs: Sequence[str | Path], pattern: str | None = None) -> list[Path]:
    """The scans ``score_scans`` will score (see :func:`select_scans`); a clear error when there are none."""
    scans = select_scans(inputs, pattern, None)
    if not scans:
        matching = f" matching {pattern!r}" if pattern else ""
        raise ValueError(f"no scans{matching} found in {', '.join(str(i) for i in inputs)} "
                         "(NIfTI, NRRD, MHA, DICOM folders)")
    return scans


def score_scans(
    inputs: Sequence[str | Path], model_dir: Path | str, out: Path, device: str = "auto", batch_size: int = 64,
    fpr: float | None = None, on_scan: Callable[[str, dict], None] | None = None, model: MriModel | None = None,
    brain_masks: tuple[str, str] | None = None, report: bool = False, pattern: str | None = None,
) -> BatchResult:
    """Score every scan found in ``inputs``; never raises for a bad scan (it is reported in the rows).

    ``pattern`` keeps the scans whose file name or id matches (see :func:`matches_pattern`). With
    ``report``, OUT also gets report.html (see :mod:`medflowad.mri.report`).
    """
    model = model or load_mri_model(model_dir, device)
    fpr = model.config.fpr if fpr is None else fpr
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scans = scans_to_score(inputs, pattern)
    voxel_threshold = threshold_at_fpr(model.calibration["voxel/llr"], fpr)
    healthy_scores = model.calibration[f"scan/{REPORT_SCORE}"]
    score_threshold = threshold_at_fpr(healthy_scores, fpr)
    result = BatchResult(out=out, warning=flag_resolution_problem(len(healthy_scores), fpr))
    figures: dict[str, ScanFigures] = {}
    for path, sid in zip(scans, _unique_ids(scans), strict=True):
        started = time.perf_counter()
        row: dict = {"scan_id": sid, "status": "ok", "error": "", "path": str(path)}
        try:
            prepared = prepare(path, model.config, brain_replace=brain_masks)
            analysis = analyse(model, prepared, batch_size)
            row.update(slices=prepared.num_slices, scored_slices=int(prepared.keep.sum()))
            row.update(scan_scores(model, analysis, fpr))
            native_llr = to_native(analysis.maps["llr"], prepared)
            native_last = to_native(analysis.maps["last_scale"], prepared)
            flagged = (native_llr > voxel_threshold).astype(np.uint8)
            header = source_header(prepared)
            write_nifti(out / f"{sid}_anomaly.nii.gz", native_llr, prepared, header)
            write_nifti(out / f"{sid}_last_scale.nii.gz", native_last, prepared, header)
            write_nifti(out / f"{sid}_anomaly_mask.nii.gz", flagged, prepared, header)
            row["flagged_voxels"] = int(flagged.sum())
            row["map"] = f"{sid}_anomaly.nii.gz"
            if report:
                figures[sid] = scan_figures(prepared, native_llr, voxel_threshold, row[REPORT_SCORE], healthy_scores,
                                            score_threshold, f"{sid} ({path.name})")
            for z in range(prepared.num_slices):
                slice_row = {"scan_id": sid, "slice": z, "scored": bool(prepared.keep[z])}
                for name in SLICE_SCORES:
                    value = float(analysis.slice_scores[name][z])
                    slice_row[name] = value
                    slice_row[f"{name}_p"] = conformal_p_value(value, model.calibration[f"slice/{name}"])
                result.slice_rows.append(slice_row)
        except Exception as exc:  # one bad scan never stops the batch; its reason goes into the tables
            reason = str(exc) if isinstance(exc, ScanError) else f"{type(exc).__name__}: {exc}"
            row.update(status="error", error=reason if str(path) in reason else f"{path}: {reason}")
        row["seconds"] = round(time.perf_counter() - started, 3)
        result.rows.append(row)
        _write_tables(result, model, fpr)
        if on_scan is not None:
            on_scan(sid, row)
    if report:
        result.report = out / "report.html"
        write_report(result.report, result.rows, figures, str(model.folder), model.config.modality, fpr,
                     len(healthy_scores))
    return result


def csv_text(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()})
    return buffer.getvalue()


def _write_tables(result: BatchResult, model: MriModel, fpr: float) -> None:
    score_columns = [c for name in SLICE_SCORES for c in (name, f"{name}_p", f"{name}_flag")]
    columns = SCAN_COLUMNS + score_columns + ["flagged_voxels", "map", "seconds"]
    write_text(result.out / "scores.csv", csv_text(result.rows, columns))
    slice_columns = ["scan_id", "slice", "scored"] + [c for n in SLICE_SCORES for c in (n, f"{n}_p")]
    write_text(result.out / "slices.csv", csv_text(result.slice_rows, slice_columns))
    write_json(result.out / "scores.json", {
        "model": str(model.folder), "modality": model.config.modality, "fpr": fpr,
        "aggregation": f"mean of the top {model.config.top_fraction:.0%} slice scores (at least one)",
        "p_value": "conformal: (1 + healthy validation scans scoring at least as high) / (1 + their number)",
        "warning": result.warning,
        "scans": [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in r.items()}
                  for r in result.rows],
    })
