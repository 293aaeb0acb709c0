"""The general scan pool: slices of scans and pictures of many kinds, preprocessed like the scans.

Sources may be volume files (NIfTI, NRRD, MHA), DICOM folders (each series a source; ``folder::UID``
takes one), 2D pictures (PNG, JPEG, ...), single DICOM images, zip archives of pictures
(``archive.zip::Training`` takes one folder of it), and folders of any of these. Label images (names
matching ``*mask*``, ``*roi*``, ``*seg*``, ``*label*``) are skipped by default: they are not scans; nor
are the anomaly maps ``medflowad score`` writes.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medflowad.data.readers import (
    IMAGE_2D_SUFFIXES,
    ITK_SUFFIXES,
    LABEL_PATTERNS,
    NIFTI_SUFFIXES,
    OUTPUT_SUFFIXES,
    ScanError,
    dicom_scans,
    is_dicom_file,
    is_dicom_folder,
    is_label_name,
    load_image_2d,
    load_scan,
)
from medflowad.data.scans import ScanPreprocessing, prepare_image_2d
from medflowad.data.slice_sets import load_slice_set_manifest, save_slice_set
from medflowad.prep import prepare_volume

DEFAULT_EXCLUDES = LABEL_PATTERNS


@dataclass
class PoolSource:
    path: str
    kind: str  # volume | image | dicom-series | zip-member
    slices: int = 0
    error: str | None = None


def _is_volume(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(NIFTI_SUFFIXES) or path.suffix.lower() in ITK_SUFFIXES


def collect_sources(inputs: Sequence[str | Path], excludes: Sequence[str] = DEFAULT_EXCLUDES) -> list[tuple[str, str]]:
    """(path, kind) pairs in a stable order; zip members are ``archive.zip::member``."""
    found: list[tuple[str, str]] = []

    def visit_file(f: Path, prefix: str = "") -> None:
        if is_label_name(f.name, excludes) or f.name.endswith(OUTPUT_SUFFIXES):  # masks; medflowad's own maps
            return
        if _is_volume(f):
            found.append((str(f), "volume"))
        elif f.suffix.lower() in IMAGE_2D_SUFFIXES or is_dicom_file(f):
            found.append((str(f), "image"))
        elif f.suffix.lower() == ".zip":
            with zipfile.ZipFile(f) as archive:
                for member in sorted(archive.namelist()):
                    if not member.startswith(prefix):
                        continue
                    if member.lower().endswith(IMAGE_2D_SUFFIXES) and not is_label_name(Path(member).name, excludes):
                        found.append((f"{f}::{member}", "zip-member"))

    for item in inputs:
        path_text, _, subdir = str(item).partition("::")
        path = Path(path_text)
        if subdir and path.suffix.lower() == ".zip" and path.is_file():
            visit_file(path, subdir.strip("/") + "/")
        elif subdir and path.is_dir():
            found.append((str(item), "dicom-series"))
        elif not path.exists():
            found.append((str(path), "missing"))
        elif path.is_file():
            visit_file(path)
        elif is_dicom_folder(path):
            found += [(str(series), "dicom-series") for series in dicom_scans(path)]
        else:
            for child in sorted(path.rglob("*")):
                if child.is_dir() and is_dicom_folder(child):
                    found += [(str(series), "dicom-series") for series in dicom_scans(child)]
                elif child.is_file() and not is_dicom_file(child):
                    visit_file(child)
    return found


def build_pool(
    inputs: Sequence[str | Path], out: Path, config: ScanPreprocessing,
    excludes: Sequence[str] = DEFAULT_EXCLUDES, progress: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> dict:
    """Preprocess every source into one slice set at ``out``; returns the manifest written there.

    A pool already at ``out`` is replaced only with ``overwrite``: models trained on it refer to it.
    """
    held = load_slice_set_manifest(out)
    if held and not overwrite:
        raise FileExistsError(f"{out} already holds a pool ({held.get('total_slices', '?')} slices from "
                              f"{len(held.get('sources', []))} sources); choose another --out, or --overwrite "
                              "to replace it")
    sources = collect_sources(inputs, excludes)
    if not sources:
        raise ValueError(f"no scans or images found in {', '.join(str(i) for i in inputs)}")
    images: list[torch.Tensor] = []
    index: list[int] = []
    records: list[PoolSource] = []
    archives: dict[str, zipfile.ZipFile] = {}
    try:
        for path, kind in sources:
            record = PoolSource(path, kind)
            try:
                slices = _source_slices(path, kind, config, archives)
                record.slices = len(slices)
                images += slices
                index += [len(records)] * len(slices)
            except ScanError as exc:
                record.error = str(exc)
            records.append(record)
            if progress is not None:
                progress(path)
    finally:
        for archive in archives.values():
            archive.close()
    if not images:
        raise ValueError("no usable slices in the pool sources (see the errors in the manifest)")
    manifest = {
        "kind": "general-pool",
        "preprocessing": config.to_dict(),
        "excludes": list(excludes),
        "total_slices": len(images),
        "sources": [vars(r) for r in records],
    }
    save_slice_set(out, torch.stack(images), torch.tensor(index), manifest)
    return manifest


def _source_slices(path: str, kind: str, config: ScanPreprocessing, archives: dict) -> list[torch.Tensor]:
    if kind == "missing":
        raise ScanError(f"{path}: no such file or folder")
    if kind in ("volume", "dicom-series"):
        prepared = prepare_volume(load_scan(path), config)
        return [prepared.slices[k] for k in np.nonzero(prepared.keep)[0]]
    if kind == "zip-member":
        archive_path, member = path.split("::", 1)
        if archive_path not in archives:  # open each archive once: its directory read is the slow part
            archives[archive_path] = zipfile.ZipFile(archive_path)
        archive = archives[archive_path]
        try:
            with Image.open(io.BytesIO(archive.read(member))) as img:
                picture = np.asarray(img.convert("L"), dtype=np.float32)
        except OSError as exc:
            raise ScanError(f"{path}: cannot read image ({exc})") from exc
    else:
        picture = load_image_2d(path)
    sliced = prepare_image_2d(picture, config)
    return [] if sliced is None else [sliced]
