"""``medflowad prepare``: the preparation stage on its own, for a batch of scans, into a readable folder.

OUT gets one folder per scan (``<scan-id>/``: the files of :data:`medflowad.prep.stage.ENTRY_FILES`) and
``preparation.csv`` / ``preparation.json`` with each scan's status, reason of failure, brain volume,
template overlap and seconds. The same results go into the cache that ``pool build``, ``train``, ``score``
and ``evaluate`` read, so preparing a batch first makes those commands skip the work. A scan that fails
is reported with its reason and the batch goes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from medflowad.data.readers import ScanError, absolute_scan_path, load_scan, unique_scan_ids
from medflowad.data.scans import ScanPreprocessing
from medflowad.mri.tables import csv_text
from medflowad.prep.stage import companion_path, mask_on_scan, run_preparation, write_entry
from medflowad.storage import write_json, write_text

COLUMNS = ["scan_id", "status", "error", "path", "brain_ml", "template_overlap", "cached", "seconds", "folder"]


def prepare_scans(
    inputs: Sequence[str | Path], config: ScanPreprocessing, out: Path, pattern: str | None = None,
    brain_replace: tuple[str, str] | None = None, cache: Path | None = None,
    on_start: Callable[[int], None] | None = None, on_scan: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Prepare every scan found in ``inputs`` into ``out``; returns one row per scan (never raises for one)."""
    from medflowad.mri.selection import select_scans  # the same scan selection as the other commands

    if config.space == "native" and config.brain == "auto" and not config.n4:
        raise ValueError("nothing to prepare: native space with the automatic foreground is computed on the fly; "
                         "choose --space standard or --brain deepbet")
    out = Path(out)
    scans = [s for s in select_scans(inputs, pattern, brain_replace) if not Path(s).resolve().is_relative_to(
        out.resolve())]
    if not scans:
        raise ValueError(f"no scans found in {', '.join(str(i) for i in inputs)}")
    if on_start is not None:
        on_start(len(scans))
    rows: list[dict] = []
    for path, sid in zip(scans, unique_scan_ids(scans), strict=True):
        started = time.perf_counter()
        row: dict = {"scan_id": sid, "status": "ok", "error": "", "path": absolute_scan_path(path)}
        try:
            scan = load_scan(path)
            brain_path = companion_path(Path(path), brain_replace)
            given = mask_on_scan(load_scan(brain_path), scan) if brain_path is not None else None
            preparation = run_preparation(scan, config, given, cache)
            write_entry(preparation, out / sid, scan.affine.numpy())
            row.update(brain_ml=round(preparation.brain_ml, 1),
                       template_overlap=preparation.info.get("template_overlap", float("nan")),
                       cached=preparation.cached, folder=sid)
        except Exception as exc:  # one bad scan never stops the batch; its reason goes into the table
            reason = str(exc) if isinstance(exc, ScanError) else f"{path}: {type(exc).__name__}: {exc}"
            row.update(status="error", error=reason)
        row["seconds"] = round(time.perf_counter() - started, 2)
        rows.append(row)
        write_text(out / "preparation.csv", csv_text(rows, COLUMNS))
        if on_scan is not None:
            on_scan(row)
    write_json(out / "preparation.json", {"preprocessing": config.to_dict(), "scans": [
        {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()} for row in rows]})
    return rows
