"""Heads with known geometry made from the packaged MNI template, resampled by SimpleITK (not by medflowad)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk  # noqa: N813

from medflowad.prep.template import load_template
from tests.mri.conftest import oblique_lps_affine, rotation

RAS_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def head_motion(degrees: float = 8.0, shift=(6.0, -9.0, 5.0)) -> np.ndarray:
    """A rigid head position in the scanner (RAS, 4x4): template world -> scan world."""
    motion = np.eye(4)
    motion[:3, :3] = rotation(np.deg2rad(degrees), np.deg2rad(degrees / 2))
    motion[:3, 3] = shift
    return motion


def moved_template_scan(path: Path, motion: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int],
                        point_mm: np.ndarray | None = None) -> Path:
    """The template head moved by ``motion`` and sampled on the grid (``affine``, ``shape``) with SimpleITK.

    ``point_mm`` (template world, RAS) plants a bright ball of 3 mm radius, twice the brain's maximum, there.
    """
    template = load_template()
    source = sitk.GetImageFromArray(np.ascontiguousarray(template.image.transpose(2, 1, 0)))
    t_lps = RAS_LPS @ template.affine
    source.SetSpacing(np.linalg.norm(t_lps[:3, :3], axis=0).tolist())
    source.SetDirection((t_lps[:3, :3] / np.linalg.norm(t_lps[:3, :3], axis=0)).ravel().tolist())
    source.SetOrigin(t_lps[:3, 3].tolist())
    g_lps = RAS_LPS @ affine
    spacing = np.linalg.norm(g_lps[:3, :3], axis=0)
    reference = sitk.Image([int(s) for s in shape], sitk.sitkFloat32)
    reference.SetSpacing(spacing.tolist())
    reference.SetDirection((g_lps[:3, :3] / spacing).ravel().tolist())
    reference.SetOrigin(g_lps[:3, 3].tolist())
    # Resampling pulls: a scan point x shows the template at motion^-1(x).
    inverse = RAS_LPS @ np.linalg.inv(motion) @ RAS_LPS
    pull = sitk.AffineTransform(3)
    pull.SetMatrix(inverse[:3, :3].ravel().tolist())
    pull.SetTranslation(inverse[:3, 3].tolist())
    moved = sitk.Resample(source, reference, pull, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(moved).transpose(2, 1, 0)
    if point_mm is not None:
        index = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).reshape(-1, 3)
        world = nib.affines.apply_affine(affine, index)
        target = (motion @ np.append(point_mm, 1.0))[:3]
        ball = (np.linalg.norm(world - target, axis=1) <= 3.0).reshape(shape)
        array = np.where(ball, 2 * template.image.max(), array)
    image = nib.Nifti1Image(array.astype(np.float32), affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    nib.save(image, str(path))
    return path


def oblique_head_grid() -> tuple[np.ndarray, tuple[int, int, int]]:
    """An oblique, LPS-stored, anisotropic grid (1.2 x 0.9 x 3.0 mm) covering the template head."""
    affine = oblique_lps_affine(spacing=(1.2, 0.9, 3.0), origin=(0.0, 0.0, 0.0))
    shape = (150, 200, 60)
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    affine[:3, 3] = np.array([0.0, -18.0, 5.0]) - centre  # grid centred on the template brain
    return affine, shape
