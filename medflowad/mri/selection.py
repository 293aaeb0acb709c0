"""Which scans a command works on and whose they are: scans found by pattern, the modality a scan's name
states, the subject or visit it belongs to, and the seeded split of healthy scans by subject into training
and calibration scans."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from medflowad.data.readers import find_scans, scan_id, split_series
from medflowad.mri.config import MriConfig

NAME_TOKENS = {"t1": {"t1", "t1w", "mprage"}, "t2": {"t2", "t2w"}, "pd": {"pd", "pdw"}, "ct": {"ct"}}
BIDS_SUBJECT = re.compile(r"(sub-[A-Za-z0-9]+)_")  # BIDS file names start with the subject entity


def matches_pattern(scan: Path, pattern: str) -> bool:
    """Case-insensitive glob on the file name or the scan id (a DICOM series' id holds its description)."""
    pattern = pattern.lower()
    return fnmatch.fnmatch(scan.name.lower(), pattern) or fnmatch.fnmatch(scan_id(scan).lower(), pattern)


def listed(names: Sequence[str], most: int = 3) -> str:
    """The first ``most`` names, comma-separated, ending in ', ...' when there are more (for messages)."""
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def modality_in_name(scan: Path) -> str | None:
    """The modality a scan's name or series description states (``FLAIR``, ``T1w``, ``MPRAGE``, ``T2``,
    ``PD``, ``CT``), or None when it states none or several. FLAIR wins over T2 (``T2_FLAIR`` is FLAIR)."""
    name = scan_id(scan).lower()
    if "flair" in name:
        return "flair"
    tokens = set(re.split(r"[^a-z0-9]+", name))
    named = {modality for modality, words in NAME_TOKENS.items() if tokens & words}
    return named.pop() if len(named) == 1 else None


def select_scans(inputs: Sequence[str | Path], pattern: str | None, mask_replace: tuple[str, str] | None) -> list[Path]:
    scans = find_scans(inputs)
    if pattern:
        scans = [s for s in scans if matches_pattern(s, pattern)]
    if mask_replace:
        scans = [s for s in scans if mask_replace[1] not in s.name]
    return scans


def subject_of(scan: Path) -> str:
    """Who a scan belongs to, as far as its name tells: the BIDS subject when the file (or DICOM folder) is
    named ``sub-<label>_...`` (one key for all its sessions, under ``.../sub-<label>/`` or side by side),
    otherwise the visit: the DICOM folder of a series, or the file itself."""
    location = split_series(scan)[0]
    match = BIDS_SUBJECT.match(location.name)
    if match is None:
        return str(location)
    subject = match.group(1)
    root = next((folder.parent for folder in location.parents if folder.name == subject), location.parent)
    return str(root / subject)


def split_healthy_scans(
    healthy: Sequence[str | Path], config: MriConfig, pattern: str | None = None,
    mask_replace: tuple[str, str] | None = None,
) -> tuple[list[Path], list[Path]]:
    """(training scans, scans held apart for calibration) among the healthy scans that training finds:
    a draw of ``val_fraction`` of their subjects (:func:`subject_of`), seeded by ``calibration_seed``
    (default ``seed``). All scans of a subject are drawn together, so that no one calibrates what they
    trained: the series of one visit, and the sessions of one BIDS subject."""
    scans = select_scans(healthy, pattern, mask_replace)
    subject = {scan: subject_of(scan) for scan in scans}
    subjects = list(dict.fromkeys(subject.values()))
    if len(subjects) < 2:
        raise ValueError(f"need healthy scans of at least 2 subjects or visits (one for calibration), found "
                         f"{len(subjects)}{f' ({subjects[0]})' if subjects else ''}")
    seed = config.seed if config.calibration_seed is None else config.calibration_seed
    order = torch.randperm(len(subjects), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(config.val_fraction * len(subjects)))
    held_apart = {subjects[i] for i in order[:n_val]}
    return (sorted(s for s in scans if subject[s] not in held_apart),
            sorted(s for s in scans if subject[s] in held_apart))


def mixed_modality_notes(scans: Sequence[Path], modality: str, pattern: str | None, use: str) -> list[str]:
    """Notes on healthy scans that may be of another modality than the model's: series of DICOM folders holding
    several series (when no pattern picks among them) and scans named as another modality. ``use``: what the
    scans do to the model ("train", "calibrate")."""
    mixed = {
        "are series of DICOM folders holding several series":
            [s for s in scans if pattern is None and split_series(s)[1] is not None],
        f"are named as another modality than {modality}":
            [s for s in scans if modality_in_name(s) not in (None, modality)],
    }
    return [f"{len(found)} of {len(scans)} healthy scans {what} ({listed([scan_id(s) for s in found])}); all "
            f"{use} the {modality} model. To keep only {modality} scans, pass a pattern (e.g. --pattern "
            f"'*{modality}*')." for what, found in mixed.items() if found]


__all__ = ["listed", "matches_pattern", "mixed_modality_notes", "modality_in_name", "select_scans",
           "split_healthy_scans", "subject_of"]
