"""Brain masks: deepbet's network, the automatic foreground, or a mask the user gives; plausibility checks.

deepbet (Fisch et al. 2024, MIT; its two networks ship inside its wheel) segments the brain of a T1 or
other structural MR volume on the CPU in a few seconds. It finds the brain in voxel space after
reorienting to the closest canonical axes, so it needs no registration and tolerates scans whose
spacing is only nominal.
"""

from __future__ import annotations

import functools
import warnings

import nibabel as nib
import numpy as np

from medflowad.data.readers import ScanError
from medflowad.data.scans import automatic_foreground, dark_background

BRAIN_METHODS = ("auto", "deepbet")  # auto: the intensity-based foreground (no brain extraction)


@functools.cache
def _deepbet(use_gpu: bool):
    try:
        from deepbet import BrainExtraction
    except ImportError as exc:  # pragma: no cover - deepbet is a dependency; a broken install says so
        raise ScanError(f"brain extraction needs the deepbet package ({exc}); pip install deepbet") from exc
    return BrainExtraction(no_gpu=not use_gpu)


def deepbet_mask(image: np.ndarray, affine: np.ndarray, use_gpu: bool = False) -> np.ndarray:
    """Boolean brain mask of ``image`` (X, Y, Z) on its own grid, from deepbet (a z-scored scan's zero background
    at its minimum first: :func:`medflowad.data.scans.dark_background`)."""
    volume = nib.Nifti1Image(dark_background(np.asarray(image, dtype=np.float32)), np.asarray(affine, dtype=np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _, mask, _ = _deepbet(use_gpu).run(volume)
        except (AssertionError, ValueError, RuntimeError) as exc:  # deepbet asserts on blank volumes
            raise ScanError(f"brain extraction failed ({type(exc).__name__}: {exc or 'no brain found'})") from exc
    return np.asarray(mask.dataobj) > 0


def extract_brain(image: np.ndarray, affine: np.ndarray, method: str, foreground_threshold: float,
               use_gpu: bool = False) -> np.ndarray:
    """The brain (``deepbet``) or the automatic intensity foreground (``auto``) of a volume."""
    if method == "deepbet":
        return deepbet_mask(image, affine, use_gpu)
    if method == "auto":
        return automatic_foreground(image, foreground_threshold)
    raise ValueError(f"brain extraction must be one of {', '.join(BRAIN_METHODS)}, got {method!r}")


def mask_volume_ml(mask: np.ndarray, affine: np.ndarray) -> float:
    return float(mask.sum() * abs(np.linalg.det(np.asarray(affine)[:3, :3])) / 1000.0)


def check_brain_mask(mask: np.ndarray, affine: np.ndarray, bounds_ml: tuple[float, float] | None) -> float:
    """The mask's volume in mL; a ScanError when it is empty or outside ``bounds_ml`` (None: any volume)."""
    if not mask.any():
        raise ScanError("empty brain mask (no brain found)")
    volume = mask_volume_ml(mask, affine)
    if bounds_ml is not None and not bounds_ml[0] <= volume <= bounds_ml[1]:
        raise ScanError(f"implausible brain mask: {volume:.0f} mL, outside the expected {bounds_ml[0]:g}-"
                        f"{bounds_ml[1]:g} mL (preprocessing.brain_volume_ml); check the scan's voxel size and "
                        "that it is a head scan")
    return volume
