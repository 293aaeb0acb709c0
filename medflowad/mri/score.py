"""``medflowad score``: per-scan scores, p-values, flags and NIfTI anomaly maps for a batch of scans.

For every scan, OUT receives ``<scan-id>_anomaly.nii.gz`` (per-voxel llr, nats per model pixel),
``<scan-id>_last_scale.nii.gz`` and ``<scan-id>_anomaly_mask.nii.gz`` (voxels above the healthy voxel
threshold at the chosen false-positive rate), all float32/uint8 NIfTI on the scan's own grid with its
affine. A scan is flagged when its conformal p-value is at most that rate. The batch gets
``scores.csv``, ``slices.csv`` and ``scores.json`` (and ``report.html`` when asked). Each file is
written through a temporary file and a rename, and the tables are rewritten as the batch goes (every 10
seconds or so) and when it ends, fails or is interrupted, so an interrupted or partly failing batch never
leaves a partial file. A scan that fails is reported with its reason.

Scoring into a folder that already holds ``score`` results adds to them: the tables keep the earlier rows of
scans not scored again, a scan scored again replaces its own rows and maps, and ids stay unique across the
folder, so no earlier map is overwritten by another scan's. Results of another model or false-positive rate
are never mixed in (an error says so). With ``resume``, scans already scored into the folder are skipped.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medflowad.data.readers import (
    MAP_SUFFIXES,
    NIFTI_SUFFIXES,
    NORMATIVE_SUFFIX,
    OUTPUT_SUFFIXES,
    SCAN_Z_AND_LLR_SUFFIX,
    SCAN_Z_SUFFIX,
    ScanError,
    absolute_scan_path,
    split_series,
    unique_scan_ids,
)
from medflowad.data.scans import PreparedScan, to_native
from medflowad.mri.analysis import (
    SCAN_Z_AND_LLR_MAP,
    SCAN_Z_MAP,
    SLICE_SCORES,
    ScanAnalysis,
    conformal_p_value,
    flag_resolution_problem,
    threshold_at_fpr,
)
from medflowad.mri.model import RECALIBRATION_FILE, MriModel, analyse, load_mri_model, model_fingerprint
from medflowad.mri.normative import BEYOND_SHARE, is_healthy_range, unlike_healthy_limit
from medflowad.mri.report import ScanFigures, scan_figures, write_report
from medflowad.mri.selection import listed, modality_in_name, select_scans
from medflowad.mri.tables import (
    BatchResult,
    TableWriter,
    check_same_batch,
    earlier_results,
    read_tables,
    write_tables,
)
from medflowad.prep import prepare
from medflowad.storage import ModelFolderError, atomic_write

PARTS_FOLDER = "parts"


MASK_SUFFIX = MAP_SUFFIXES[2]  # the anomaly mask
# gzip level of written maps: on 1 mm float maps level 1 compresses 2.2x as fast as 6 for files 5-10 % larger
# (docs/speed.md)
GZIP_LEVEL = 1


def source_header(reference: PreparedScan) -> nib.Nifti1Header | None:
    """The input's NIfTI header (None for other formats), read once per scan for all its maps."""
    source = Path(str(reference.native.meta.get("filename_or_obj", "")))
    if source.name.lower().endswith(NIFTI_SUFFIXES) and source.is_file():
        return nib.load(str(source)).header
    return None


def write_nifti(path: Path, data: np.ndarray, reference: PreparedScan,
                header: nib.Nifti1Header | None = None, display_window: tuple[float, float] | None = None,
                zscore: bool = False) -> None:
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
    if zscore:  # viewers then label the values as z-scores
        image.header.set_intent("z score")
    if display_window is not None:  # and open them in this display range
        image.header["cal_min"], image.header["cal_max"] = display_window
    payload = gzip.compress(image.to_bytes(), compresslevel=GZIP_LEVEL)
    atomic_write(path, lambda tmp: tmp.write_bytes(payload))


def scans_the_model_saw(folder: Path) -> dict[str, str]:
    """Absolute path -> "trained" or "calibrated", from the model folder's healthy slice-set manifests (a
    bundled or exported model has none), or for a folder of ``medflowad calibrate`` from its
    ``recalibration.json`` (its calibration scans) and the source model's training scans, when the source
    folder is still there. Paths recorded relative to another working folder are missed."""
    seen = {}
    record = Path(folder) / RECALIBRATION_FILE
    if record.is_file():
        try:
            recalibration = json.loads(record.read_text())
            source = Path(recalibration["source_model"])
            seen = {absolute_scan_path(path): "calibrated" for path in recalibration["calibration_scans"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelFolderError(f"{record}: not a medflowad recalibration record ({exc})") from exc
        if source.is_dir() and source.resolve() != Path(folder).resolve():
            seen = {**{p: r for p, r in scans_the_model_saw(source).items() if r == "trained"}, **seen}
    for role, part in (("trained", "healthy_train"), ("calibrated", "healthy_val")):
        manifest = Path(folder) / "data" / part / "manifest.json"
        if manifest.is_file():
            try:
                for source in json.loads(manifest.read_text()).get("sources", []):
                    seen[absolute_scan_path(source["path"])] = role
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ModelFolderError(f"{manifest}: not a medflowad slice-set manifest ({exc})") from exc
    return seen


def _input_notes(scans: list[Path], ids: list[str], model: MriModel) -> list[str]:
    """Warnings about what is being scored: scans named as another modality than the model's, and scans that
    trained or calibrated it."""
    notes = []
    modality = model.config.modality
    others = [sid for path, sid in zip(scans, ids, strict=True) if modality_in_name(path) not in (None, modality)]
    if others:
        notes.append(f"{len(others)} scans are named as another modality than the model's {modality} "
                     f"({listed(others)}): their scores rate them against healthy {modality} scans "
                     f"(--pattern '*{modality}*' keeps those)")
    seen = scans_the_model_saw(model.folder)
    used = {role: [sid for path, sid in zip(scans, ids, strict=True) if seen.get(absolute_scan_path(path)) == role]
            for role in ("trained", "calibrated")}
    if used["trained"] or used["calibrated"]:
        notes.append(f"{len(used['trained'])} of these scans trained the model and {len(used['calibrated'])} "
                     f"calibrated it ({listed(used['trained'] + used['calibrated'])}): their scores do not test it")
    return notes


def scan_scores(model: MriModel, analysis: ScanAnalysis, fpr: float) -> dict[str, float | bool]:
    """A scan's scores (``llr``, ...), their conformal p-values against the healthy calibration scans
    (``llr_p``, ...) and flags at ``fpr`` (``llr_flag``, ...)."""
    values = analysis.scan_scores(model.config.top_fraction)
    row: dict[str, float | bool] = {}
    for name in SLICE_SCORES:
        healthy = model.calibration.get(f"scan/{name}")  # None: a score older calibrations lack
        row[name] = values[name] if healthy is not None else float("nan")
        row[f"{name}_p"] = conformal_p_value(row[name], healthy) if healthy is not None else float("nan")
        row[f"{name}_flag"] = bool(row[f"{name}_p"] <= fpr)
    return row


def scan_score_of(model: MriModel) -> str:
    """The scan score that flags scans: the config's ``scan_score``, or by default ``intensity_scan_z`` on FLAIR
    models whose calibration has it (the share of each slice bright against the scan's own brain: on LGG's
    development split it ranked lesion slices above healthy ones of the same brain level far better than any
    flow score, docs/results.md), else ``llr``."""
    if model.config.scan_score is not None:
        return model.config.scan_score
    if model.config.modality == "flair" and f"scan/{SCAN_Z_MAP}" in model.calibration:
        return SCAN_Z_MAP
    return "llr"


def mask_map_of(model: MriModel) -> str:
    """The map ``score`` thresholds into the anomaly mask: the config's ``mask_map``, or by default

    - on FLAIR, ``intensity_scan_z`` (bright lesions against the scan's own brain: on LGG it found tumours far
      better than the intensity itself and every flow map measured, docs/results.md), where the calibration
      has its healthy voxels;
    - else the normative llr in standard space (a location is the same anatomy in every scan there) and the
      llr on scans' own grids (locations only roughly agree; normative maps measured no better on LGG).
    """
    if model.config.mask_map is not None:
        return model.config.mask_map
    if model.config.modality == "flair" and f"voxel/{SCAN_Z_MAP}" in model.calibration:
        return SCAN_Z_MAP
    standard = model.config.preprocessing.space == "standard"
    return "llr_normative" if standard and "voxel/llr_normative" in model.calibration else "llr"


# Maps written only when they are the mask map (z-scores against the scan's own brain), by file suffix
MASK_ONLY_MAPS = {SCAN_Z_SUFFIX: SCAN_Z_MAP, SCAN_Z_AND_LLR_SUFFIX: SCAN_Z_AND_LLR_MAP}


def mask_file_suffix(mask_map: str) -> str:
    """The file (suffix after the scan id) that holds the mask map as ``score`` writes it."""
    by_map = {"llr": MAP_SUFFIXES[0], **{name: suffix for suffix, name in MASK_ONLY_MAPS.items()}}
    return by_map.get(mask_map, NORMATIVE_SUFFIX)


def scans_to_score(inputs: Sequence[str | Path], pattern: str | None = None, out: Path | None = None) -> list[Path]:
    """The scans ``score_scans`` will score (see :func:`select_scans`); a clear error when there are none.

    Files found inside the output folder ``out`` are not scans (nor, anywhere, files named like the maps
    ``score`` writes), so scoring a folder that holds earlier results does not score those results.
    """
    explicit = {absolute_scan_path(i) for i in inputs if Path(i).is_file()}
    out_root = Path(out).resolve() if out is not None else None
    unique: dict[str, Path] = {}  # one entry per scan, however its path was written
    for scan in select_scans(inputs, pattern, None):
        key = absolute_scan_path(scan)
        if key not in explicit and out_root is not None and split_series(key)[0].is_relative_to(out_root):
            continue
        unique.setdefault(key, scan)
    scans = list(unique.values())
    if not scans:
        matching = f" matching {pattern!r}" if pattern else ""
        raise ValueError(f"no scans{matching} found in {', '.join(str(i) for i in inputs)} "
                         "(NIfTI, NRRD, MHA, DICOM folders; medflowad's own maps are not scans)")
    return scans


class ScanPreparer:
    """``prepare_one`` of each of ``paths`` in turn (:meth:`take`); with ``ahead``, taking scan i also starts scan
    i + 1's preparation in a worker thread, so reading, brain extraction and resampling of the next scan run
    while this one's models, maps and writes do (numpy, SimpleITK, zlib and torch release the GIL). An error
    of a preparation is raised where its scan is taken, as without ``ahead``."""

    def __init__(self, paths: Sequence[Path], prepare_one: Callable[[Path], PreparedScan], ahead: bool) -> None:
        self.paths, self.prepare_one = list(paths), prepare_one
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="medflowad-prepare") if ahead and len(paths) > 1 else None
        self.taken = 0
        self.ahead: Future[PreparedScan] | None = None  # the preparation of paths[taken], under way

    def take(self) -> PreparedScan:
        """The next scan, prepared."""
        path = self.paths[self.taken]
        self.taken += 1
        if self.pool is None:
            return self.prepare_one(path)
        future = self.ahead if self.ahead is not None else self.pool.submit(self.prepare_one, path)
        following = self.paths[self.taken] if self.taken < len(self.paths) else None
        self.ahead = self.pool.submit(self.prepare_one, following) if following is not None else None
        return future.result()

    def close(self) -> None:
        """Drop a preparation not started yet; one under way finishes in its thread (its result is unused)."""
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.ahead = None


def score_scans(
    inputs: Sequence[str | Path], model_dir: Path | str, out: Path, device: str = "auto", batch_size: int = 64,
    fpr: float | None = None, on_scan: Callable[[str, dict], None] | None = None, model: MriModel | None = None,
    brain_masks: tuple[str, str] | None = None, report: bool = False, pattern: str | None = None,
    resume: bool = False, on_start: Callable[[int], None] | None = None, part: tuple[int, int] | None = None,
    prepare_ahead: bool = True,
) -> BatchResult:
    """Score every scan found in ``inputs``; never raises for a bad scan (it is reported in the rows).

    ``pattern`` keeps the scans whose file name or id matches (see
    :func:`~medflowad.mri.selection.matches_pattern`). With ``report``, OUT also gets report.html (see
    :mod:`medflowad.mri.report`). Earlier results in OUT are kept (see the module's description); ``resume``
    skips the scans they hold with all three maps.
    ``on_start`` hears how many scans were found, ``on_scan`` each one's id and row as it is done.
    ``part=(k, n)`` scores the k-th of n shares of the scans (scans k, k+n, k+2n, ... of the sorted list),
    its maps into OUT and its tables into ``OUT/parts/part-<k>-of-<n>/``; :func:`merge_parts` joins them.
    ``prepare_ahead`` prepares the next scan while this one is scored (:class:`ScanPreparer`; the results are the
    same, docs/speed.md measures the time).
    """
    if fpr is not None and not 0 < fpr < 1:  # also refuses NaN
        raise ValueError(f"--fpr must lie strictly between 0 and 1 (0.05 is 5 %), got {fpr}")
    if part is not None and not (part[1] >= 1 and 0 <= part[0] < part[1]):
        raise ValueError(f"--part-id must lie in 0..{part[1] - 1} for --num-parts {part[1]}, got {part[0]}")
    if part == (0, 1):  # one part is the whole batch
        part = None
    if part is not None and report:
        raise ValueError("a part writes no report: `medflowad score-merge OUT --report` writes it for all parts")
    model = model or load_mri_model(model_dir, device)
    fpr = model.config.fpr if fpr is None else fpr
    out = Path(out)
    tables_dir = out if part is None else part_folder(out, *part)
    scans = scans_to_score(inputs, pattern, out)
    fingerprint = model_fingerprint(model.folder)
    earlier_rows, earlier_slice_rows = earlier_results(tables_dir, fingerprint, fpr)
    out.mkdir(parents=True, exist_ok=True)
    named = {r["path"]: r["scan_id"] for r in (earlier_results(out, fingerprint, fpr)[0] if part else [])}
    ids = unique_scan_ids(scans, {**named, **{r["path"]: r["scan_id"] for r in earlier_rows}})
    if part is not None:  # ids come from the whole list, so every part names a scan alike
        scans, ids = scans[part[0]::part[1]], ids[part[0]::part[1]]
    if on_start is not None:
        on_start(len(scans))
    limits = Thresholds.of(model, fpr)
    mask_map, mask_threshold, headline = limits.mask_map, limits.mask_threshold, limits.headline
    # Earlier rows stay in the tables until this run replaces them, so an interruption loses none.
    result = BatchResult(out=out, tables=tables_dir, warning=flag_resolution_problem(len(limits.healthy_scores), fpr),
                         fingerprint=fingerprint, kept_rows=earlier_rows, kept_slice_rows=earlier_slice_rows,
                         scan_score=headline, settings=batch_settings(model, fingerprint, limits))
    for note in _input_notes(scans, ids, model):
        result.warn(note)
    done = {r["scan_id"]: r for r in earlier_rows if resume and r["status"] == "ok"
            and all((out / f"{r['scan_id']}{suffix}").is_file() for suffix in MAP_SUFFIXES)}
    figures: dict[str, ScanFigures] = {}
    tables = TableWriter(result)

    def prepare_one(path: Path) -> PreparedScan:
        prepared = prepare(path, model.config.preprocessing, brain_replace=brain_masks)
        if not prepared.keep.any():  # no score, p-value or map could mean anything: say why instead
            raise ScanError(f"{path}: no slice has enough foreground to score (at least "
                            f"{model.config.preprocessing.min_foreground:.0%} of the slice, min_foreground); "
                            "is it a brain scan, and is its brain mask empty?")
        return prepared

    preparer = ScanPreparer([path for path, sid in zip(scans, ids, strict=True) if sid not in done], prepare_one,
                            prepare_ahead)
    try:
        for path, sid in zip(scans, ids, strict=True):
            started = time.perf_counter()
            if sid in done:
                result.slice_rows += [r for r in result.kept_slice_rows if r["scan_id"] == sid]
                result.forget_kept(sid)
                result.rows.append(done[sid])
                result.resumed.append(sid)
                if on_scan is not None:
                    on_scan(sid, done[sid])
                continue
            row: dict = {"scan_id": sid, "status": "ok", "error": "", "path": absolute_scan_path(path)}
            try:
                prepared = preparer.take()  # the scans not done, in this loop's order
                analysis = analyse(model, prepared, batch_size)
                row.update(slices=prepared.num_slices, scored_slices=int(prepared.keep.sum()))
                row.update(scan_scores(model, analysis, fpr))
                outputs = native_outputs(analysis, prepared, limits)
                mask_source, flagged = outputs[mask_file_suffix(mask_map)], outputs[MASK_SUFFIX]
                for suffix in OUTPUT_SUFFIXES:  # temporary files of this scan's writes in a killed run
                    for stale in out.glob(f".{sid}{suffix}.*.tmp"):
                        stale.unlink(missing_ok=True)
                write_outputs(out, sid, outputs, prepared, limits)
                row["flagged_voxels"] = int(flagged.sum())
                row.update(unlike_healthy_columns(analysis.beyond_range_share, limits.unlike_limit))
                row["map"] = f"{sid}{MAP_SUFFIXES[0]}"
                if report:
                    figures[sid] = scan_figures(prepared, mask_source, mask_threshold, mask_map, row[headline],
                                                headline, limits.healthy_scores, limits.score_threshold,
                                                f"{sid} ({path.name})")
                for z in range(prepared.num_slices):
                    slice_row = {"scan_id": sid, "slice": z, "scored": bool(prepared.keep[z])}
                    for name in SLICE_SCORES:
                        value = float(analysis.slice_scores[name][z])
                        healthy = model.calibration.get(f"slice/{name}")
                        slice_row[name] = value
                        slice_row[f"{name}_p"] = conformal_p_value(value, healthy) if healthy is not None else math.nan
                    result.slice_rows.append(slice_row)
            except Exception as exc:  # one bad scan never stops the batch; its reason goes into the tables
                reason = str(exc) if isinstance(exc, ScanError) else f"{type(exc).__name__}: {exc}"
                row.update(status="error", error=reason if str(path) in reason else f"{path}: {reason}")
                for suffix in OUTPUT_SUFFIXES:  # a failed scan has no maps: none half-written, none left from before
                    (out / f"{sid}{suffix}").unlink(missing_ok=True)
            # this scan's arrays go now, not when the next scan's replace them (a 1 mm scan's hold ~0.3 GB)
            prepared = analysis = outputs = mask_source = flagged = None
            row["seconds"] = round(time.perf_counter() - started, 3)
            result.forget_kept(sid)
            result.rows.append(row)
            tables.save()
            if on_scan is not None:
                on_scan(sid, row)
    finally:  # an interruption or a crash still leaves tables of every scan finished
        preparer.close()
        unlike = [r["scan_id"] for r in result.rows if r.get("unlike_healthy") is True]
        if unlike:
            result.warn(unlike_healthy_warning(unlike, limits.unlike_limit))
        tables.save(force=True)
    if report:
        write_batch_report(result, model, limits, figures, brain_masks, tables)
    return result


@dataclass(frozen=True)
class Thresholds:
    """A batch's decision limits: the mask map and its healthy voxel threshold, the flagging scan score, its
    healthy calibration scores and their threshold at the FPR; and which normative map is written."""

    fpr: float
    voxel_fpr: float
    mask_map: str
    mask_threshold: float
    headline: str
    healthy_scores: np.ndarray
    score_threshold: float
    normative: str | None = None  # written as <id>_normative
    normative_is_zscore: bool = False  # else a distance beyond the healthy range
    unlike_limit: float | None = None  # share beyond the healthy range that marks a scan unlike the healthy heads

    @classmethod
    def of(cls, model: MriModel, fpr: float) -> Thresholds:
        mask_map = mask_map_of(model)
        voxel_fpr = model.config.voxel_fpr if model.config.voxel_fpr is not None else fpr
        headline = scan_score_of(model)
        healthy_scores = model.calibration[f"scan/{headline}"]  # load_mri_model checked it is there
        # the mask map when it is normative, else the normative llr where calibrated
        normative = mask_map if mask_map.endswith("_normative") else (
            "llr_normative" if "voxel/llr_normative" in model.calibration else None)
        zscore = normative is not None and not is_healthy_range(model.calibration, normative.removesuffix("_normative"))
        mask_threshold = model.healthy_voxel_threshold(mask_map, voxel_fpr)
        if mask_threshold is None:
            raise ModelFolderError(f"{model.folder}: the calibration holds no healthy voxels of {mask_map}, the map "
                                   "the anomaly mask thresholds; recalibrate the model (medflowad calibrate)")
        return cls(fpr, voxel_fpr, mask_map, mask_threshold, headline, healthy_scores,
                   threshold_at_fpr(healthy_scores, fpr), normative, zscore, unlike_healthy_limit(model.calibration))


def unlike_healthy_columns(share: float, limit: float | None) -> dict[str, float | bool]:
    """A scan's ``beyond_range_share`` and ``unlike_healthy`` (NaN where the model cannot say: no healthy range
    of the intensity, or a calibration made before the share was stored)."""
    return {BEYOND_SHARE: share,
            "unlike_healthy": bool(share > limit) if limit is not None and math.isfinite(share) else math.nan}


def unlike_healthy_warning(scan_ids: list[str], limit: float | None) -> str:
    which = f"{len(scan_ids)} scans ({listed(scan_ids)}) lie" if len(scan_ids) > 1 else f"{scan_ids[0]} lies"
    return (f"{which} beyond the healthy range in more than {100 * (limit or 0):.1f} % of the brain, twice as "
            "much as any healthy calibration head: another scanner, sequence or contrast agent, or widespread "
            "disease. Masks and scores of such a scan are not comparable with the healthy calibration; calibrate "
            "the model on healthy heads of that site (`medflowad calibrate`) before reading them")


def native_outputs(analysis: ScanAnalysis, prepared: PreparedScan, limits: Thresholds) -> dict[str, np.ndarray]:
    """Every file ``score`` writes for one scan, on the scan's own grid, by suffix: the llr and last-scale
    maps, the normative map and the mask map where written, and last the anomaly mask (the mask map above its
    healthy threshold). The maps are resampled together, in one pass."""
    names = {MAP_SUFFIXES[0]: "llr", MAP_SUFFIXES[1]: "last_scale"}
    if limits.normative is not None:
        names[NORMATIVE_SUFFIX] = limits.normative
    names.update({suffix: name for suffix, name in MASK_ONLY_MAPS.items() if name == limits.mask_map})
    native = to_native(np.stack([analysis.maps[name] for name in names.values()]), prepared)
    outputs = dict(zip(names, native, strict=True))
    outputs[MASK_SUFFIX] = (outputs[mask_file_suffix(limits.mask_map)] > limits.mask_threshold).astype(np.uint8)
    return outputs


def write_outputs(out: Path, sid: str, outputs: dict[str, np.ndarray], prepared: PreparedScan,
                  limits: Thresholds) -> None:
    """Write :func:`native_outputs` as ``<sid><suffix>``, each atomically, the mask last (a scan whose mask
    exists has all its files; ``--continue`` relies on it)."""
    header = source_header(prepared)
    display = {NORMATIVE_SUFFIX: {"display_window": (0.0, 5.0), "zscore": limits.normative_is_zscore},
               **{suffix: {"display_window": (0.0, 10.0), "zscore": True} for suffix in MASK_ONLY_MAPS}}

    def write(suffix: str) -> None:
        write_nifti(out / f"{sid}{suffix}", outputs[suffix], prepared, header, **display.get(suffix, {}))

    # gzip releases the GIL: the maps compress in parallel threads (1.9x on 2 cores), the mask after them all
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        list(pool.map(write, [suffix for suffix in outputs if suffix != MASK_SUFFIX]))
    write(MASK_SUFFIX)


def write_batch_report(result: BatchResult, model: MriModel, limits: Thresholds, figures: dict[str, ScanFigures],
                       brain_masks: tuple[str, str] | None = None, tables: TableWriter | None = None) -> None:
    """report.html of every scan in the batch's tables; scans without figures yet (scored before, or by other
    parts) get them from the scan and its map as written."""
    mask_map, headline = limits.mask_map, limits.headline
    missing = 0
    for row in result.kept_rows + result.rows:
        sid = row["scan_id"]
        if row["status"] != "ok" or sid in figures:
            continue
        try:  # scored before: the figures come from the scan and its map as written
            source = Path(row["path"])
            prepared = prepare(source, model.config.preprocessing, brain_replace=brain_masks)
            written = np.asarray(nib.load(str(result.out / f"{sid}{mask_file_suffix(mask_map)}")).dataobj,
                                 dtype=np.float32)
            figures[sid] = scan_figures(prepared, written, limits.mask_threshold, mask_map, row[headline], headline,
                                        limits.healthy_scores, limits.score_threshold, f"{sid} ({source.name})")
        except Exception as exc:  # the report still lists the scan, without figures
            result.warn(f"{sid}: no report figures ({type(exc).__name__}: {exc})")
            missing += 1
    if missing and tables is not None:
        tables.save(force=True)  # scores.json carries the warnings too
    result.report = result.out / "report.html"
    write_report(result.report, result.kept_rows + result.rows, figures, str(model.folder),
                 model.config.modality, limits.fpr, len(limits.healthy_scores), headline, model.config.top_fraction)


def batch_settings(model: MriModel, fingerprint: str, limits: Thresholds) -> dict:
    """What scores.json says about the batch besides its rows."""
    return {
        "model": str(model.folder), "model_sha256": fingerprint, "modality": model.config.modality, "fpr": limits.fpr,
        "aggregation": f"mean of the top {model.config.top_fraction:.0%} slice scores (at least one)",
        "p_value": "conformal: (1 + healthy validation scans scoring at least as high) / (1 + their number)",
        "scan_score": limits.headline, "mask_map": limits.mask_map, "voxel_fpr": limits.voxel_fpr,
    }


def part_folder(out: Path, part_id: int, num_parts: int) -> Path:
    """Where part ``part_id`` of ``num_parts`` keeps its tables."""
    return Path(out) / PARTS_FOLDER / f"part-{part_id}-of-{num_parts}"


def merge_parts(out: Path, model_dir: Path | str | None = None, device: str = "auto", report: bool = False,
                brain_masks: tuple[str, str] | None = None) -> BatchResult:
    """Join the tables of a sharded run's parts (``OUT/parts/part-<k>-of-<n>/``) into OUT's scores.csv,
    slices.csv and scores.json, in the order one process would have written them (scan paths' order, as
    ``score`` lists scans), adding to what OUT holds (under its lock); with ``report``, report.html too.
    Every part of one run must be there and finished; ``model_dir`` defaults to the model the parts name."""
    out = Path(out)
    folders = sorted((out / PARTS_FOLDER).glob("part-*-of-*"))
    if not folders:
        raise ValueError(f"{out}: no parts to merge (no {PARTS_FOLDER}/part-<k>-of-<n>/ folders)")
    counts = {int(f.name.rsplit("-", 1)[1]) for f in folders}
    if len(counts) != 1:
        raise ValueError(f"{out}: parts of runs with different --num-parts ({sorted(counts)}); merge one run's")
    num_parts = counts.pop()
    expected = {part_folder(out, k, num_parts).name for k in range(num_parts)}
    absent = sorted(expected - {f.name for f in folders})
    if absent:
        raise ValueError(f"{out}: parts missing ({', '.join(absent)}): run them (--continue finishes one) first")
    rows, slice_rows, settings, warnings = [], [], None, []
    for folder in sorted(folders, key=lambda f: int(f.name.split("-")[1])):
        stored, part_rows, part_slices = read_tables(folder)
        if stored is None:
            raise ValueError(f"{folder}: holds no scores yet: run that part (--continue finishes it)")
        if settings is not None:  # every part of the same model and FPR as the first
            check_same_batch(folder, stored, settings["model_sha256"], settings["fpr"])
        settings = settings or {k: v for k, v in stored.items() if k != "warning"}
        warnings += [stored["warning"]] if stored.get("warning") else []
        rows += part_rows
        slice_rows += part_slices
    order = sorted(range(len(rows)), key=lambda i: _path_order(rows[i]["path"]))
    merged = BatchResult(out=out, tables=out, fingerprint=settings["model_sha256"], scan_score=settings["scan_score"],
                         settings=settings, rows=[rows[i] for i in order],
                         warning="; ".join(dict.fromkeys(warnings)) or None)
    by_scan: dict[str, list[dict]] = {}
    for row in slice_rows:
        by_scan.setdefault(row["scan_id"], []).append(row)
    merged.slice_rows = [r for row in merged.rows for r in by_scan.get(row["scan_id"], [])]
    write_tables(merged)
    if report:
        model = load_mri_model(model_dir if model_dir is not None else settings["model"], device)
        if model_fingerprint(model.folder) != settings["model_sha256"]:
            raise ValueError(f"{model.folder}: not the model that scored the parts ({settings['model']})")
        write_batch_report(merged, model, Thresholds.of(model, settings["fpr"]), {}, brain_masks)
    return merged


def _path_order(path: str) -> tuple:
    """Sort key of a scan path as ``score`` lists a folder's scans (sorted paths; a DICOM folder's series
    after its folder name)."""
    location, series = split_series(path)
    return (str(location), series or "")
