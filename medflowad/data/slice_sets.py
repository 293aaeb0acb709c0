"""Slice sets: preprocessed 2D slices on disk (a folder with ``slices.safetensors`` and ``manifest.json``).

The general scan pool and the healthy training/validation slices of an MRI model are slice sets; any
data-set spec may name one, so they train like any other image set.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medflowad.storage import ModelFolderError, read_tensors, write_json, write_tensors

SLICES_FILE = "slices.safetensors"
MANIFEST_FILE = "manifest.json"


def is_slice_set(path: Path) -> bool:
    """A folder holding slices (possibly an incomplete set: see :func:`load_slice_tensors`)."""
    return (Path(path) / SLICES_FILE).is_file()


def save_slice_set(folder: Path, images: torch.Tensor, source_index: torch.Tensor, manifest: dict,
                   masks: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> None:
    """images uint8 (N, 1, S, S); source_index (N,) into manifest['sources']; masks uint8 (N, 1, S, S), 1 where
    a pixel's likelihood counts in training (0: left out, e.g. a lesion); labels (N,) the slices' classes
    (position classes of a position-aware model)."""
    folder = Path(folder)
    # The manifest goes last, so a set whose writing was interrupted has none and is never taken for complete
    # (replacing a set: its old manifest goes first).
    (folder / MANIFEST_FILE).unlink(missing_ok=True)
    tensors = {"images": images.contiguous(), "source_index": source_index.to(torch.int64)}
    if masks is not None:
        tensors["masks"] = masks.to(torch.uint8).contiguous()
    if labels is not None:
        tensors["labels"] = labels.to(torch.int64).contiguous()
    write_tensors(folder / SLICES_FILE, tensors)
    write_json(folder / MANIFEST_FILE, manifest)


def load_slice_set(folder: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    tensors = load_slice_tensors(folder)
    return tensors["images"], tensors["source_index"], load_slice_set_manifest(folder)


def load_slice_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The set's tensors: ``images``, ``source_index``, and ``masks`` and ``labels`` where it has them."""
    folder = Path(folder)
    if not (folder / MANIFEST_FILE).is_file():
        raise ModelFolderError(f"{folder}: an incomplete slice set (no {MANIFEST_FILE}: its writing was "
                               "interrupted?); build it again")
    return read_tensors(folder / SLICES_FILE)


def load_slice_set_manifest(folder: Path) -> dict:
    """The set's manifest without its slices; empty when the set has none."""
    manifest_path = Path(folder) / MANIFEST_FILE
    if not manifest_path.exists():
        return {}
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"{manifest_path}: not a readable manifest ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ModelFolderError(f"{manifest_path}: expected a JSON object, got {type(manifest).__name__}")
    return manifest
