"""The tables of a scoring batch (``scores.csv``, ``slices.csv``, ``scores.json``): reading earlier results,
rewriting them as a batch goes, safely when several processes score into one folder.

Several ``score`` processes may write into one folder at once (two users, a scheduler's job array, the parts
of a sharded run merging). Each rewrite therefore happens under an exclusive lock of the folder's tables
(``flock`` on the folder) and merges with what is on disk: the rows of scans this process scored
replace their earlier rows, every other row on disk stays. No process can drop another's rows. (``flock``
holds on local file systems and on NFS v4; on file systems without it, shard with ``--num-parts``, whose
parts write tables of their own.)
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from medflowad.mri.analysis import SLICE_SCORES
from medflowad.storage import write_json, write_text

SCAN_COLUMNS = ["scan_id", "status", "error", "path", "slices", "scored_slices"]
SCORE_COLUMNS = [c for name in SLICE_SCORES for c in (name, f"{name}_p", f"{name}_flag")]
ROW_COLUMNS = SCAN_COLUMNS + SCORE_COLUMNS + ["flagged_voxels", "beyond_range_share", "unlike_healthy", "map",
                                              "seconds"]
SLICE_COLUMNS = ["scan_id", "slice", "scored"] + [c for n in SLICE_SCORES for c in (n, f"{n}_p")]
TABLE_INTERVAL_S = 10.0


@dataclass
class BatchResult:
    rows: list[dict] = field(default_factory=list)  # this run's scans, in order (skipped ones included)
    slice_rows: list[dict] = field(default_factory=list)
    kept_rows: list[dict] = field(default_factory=list)  # earlier runs' scans that this run has not replaced
    kept_slice_rows: list[dict] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)  # ids of scans skipped as already scored
    fingerprint: str = ""
    out: Path | None = None  # where the maps go
    tables: Path | None = None  # where the tables go: ``out``, or a part's folder of a sharded run
    report: Path | None = None
    warning: str | None = None  # e.g. a calibration set too small for any flag at this FPR
    scan_score: str = "llr"  # the score that flags scans (the model's scan_score)
    settings: dict = field(default_factory=dict)  # scores.json's description of the batch (model, fpr, ...)

    @property
    def all_ok(self) -> bool:
        return all(r["status"] == "ok" for r in self.rows)

    def warn(self, message: str) -> None:
        self.warning = f"{self.warning}; {message}" if self.warning else message

    def forget_kept(self, sid: str) -> None:
        """This run now holds scan ``sid``: its rows from earlier runs leave the tables."""
        self.kept_rows = [r for r in self.kept_rows if r["scan_id"] != sid]
        self.kept_slice_rows = [r for r in self.kept_slice_rows if r["scan_id"] != sid]


@dataclass
class TableWriter:
    """Rewrites a batch's tables as it goes: at most every TABLE_INTERVAL_S seconds, or ten times the last
    rewrite's duration when that is longer. A rewrite grows with the batch (3.7 s for 200,000 slice rows), so
    rewriting after every scan would make a large batch's time grow with the square of its size."""

    result: BatchResult
    last: float = -math.inf
    cost: float = 0.0

    def save(self, force: bool = False) -> None:
        started = time.perf_counter()
        if force or started - self.last >= max(TABLE_INTERVAL_S, 10 * self.cost):
            write_tables(self.result)
            self.last = time.perf_counter()
            self.cost = self.last - started


def csv_text(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    return buffer.getvalue()


@contextlib.contextmanager
def tables_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock of a folder's tables (waits for other processes; a no-op where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: one process per folder, or --num-parts
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder, os.O_RDONLY)  # the folder itself is locked: no lock file is left behind
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def read_tables(folder: Path) -> tuple[dict | None, list[dict], list[dict]]:
    """(scores.json without its rows or None, scan rows, slice rows as written) of a folder's tables."""
    path = folder / "scores.json"
    if not path.is_file():
        return None, [], []
    try:
        stored = json.loads(path.read_text())
        rows = [{k: float("nan") if v is None else v for k, v in r.items()} for r in stored.pop("scans")]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not readable as medflowad scores ({exc}); score into another folder") from exc
    slice_rows: list[dict] = []
    if (folder / "slices.csv").is_file():
        with (folder / "slices.csv").open(newline="") as f:
            slice_rows = list(csv.DictReader(f))
    return stored, rows, slice_rows


def check_same_batch(folder: Path, stored: dict | None, fingerprint: str, fpr: float) -> None:
    """Refuse results of another model or FPR in ``folder``: the tables would describe maps they did not make."""
    if stored is None or (stored.get("model_sha256") == fingerprint and stored.get("fpr") == fpr):
        return
    which = ("an older medflowad's scores, which do not say which model made them" if "model_sha256" not in stored
             else f"scores of another model or false-positive rate (model {stored.get('model')}, "
             f"fpr {stored.get('fpr')})")
    raise ValueError(f"{folder} holds {which}; score into another folder, or delete this one to start again")


def earlier_results(folder: Path, fingerprint: str, fpr: float) -> tuple[list[dict], list[dict]]:
    """Scan rows and slice rows of earlier runs into ``folder`` (refusing another model's or FPR's)."""
    stored, rows, slice_rows = read_tables(folder)
    check_same_batch(folder, stored, fingerprint, fpr)
    return rows, slice_rows


def write_tables(result: BatchResult) -> None:
    """Rewrite the tables under the folder's lock: rows on disk of scans this run does not hold (other
    processes', earlier runs') stay in their order, then this run's kept and new rows."""
    assert result.tables is not None
    with tables_lock(result.tables):
        stored, disk_rows, disk_slice_rows = read_tables(result.tables)
        check_same_batch(result.tables, stored, result.fingerprint, result.settings["fpr"])
        own = {r["scan_id"] for r in result.rows}
        on_disk = {r["scan_id"] for r in disk_rows}
        rows = ([r for r in disk_rows if r["scan_id"] not in own]
                + [r for r in result.kept_rows if r["scan_id"] not in on_disk] + result.rows)
        slice_rows = ([r for r in disk_slice_rows if r["scan_id"] not in own]
                      + [r for r in result.kept_slice_rows if r["scan_id"] not in on_disk] + result.slice_rows)
        write_rows(result.tables, rows, slice_rows, {**result.settings, "warning": result.warning})


def write_rows(folder: Path, rows: list[dict], slice_rows: list[dict], settings: dict) -> None:
    """scores.csv, slices.csv and scores.json (``settings`` then the rows) of ``folder``, each atomically."""
    write_text(folder / "scores.csv", csv_text(rows, ROW_COLUMNS))
    write_text(folder / "slices.csv", csv_text(slice_rows, SLICE_COLUMNS))
    write_json(folder / "scores.json", {
        **settings,
        "scans": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                  for r in rows],
    })
