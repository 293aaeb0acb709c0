"""Simulated brain scans from an openly licensed template, for the demo model's general pool.

A *subject* is the MNI ICBM152 template (T1 and grey/white-matter probability maps, 1 mm) reduced to
2 mm and passed through one random spatial transform (rotation, scaling, shear, translation and a
smooth elastic field, the same for all three channels), so every subject has its own anatomy. Its
T1 then gets a smooth bias field, a gamma change and noise. Other contrasts are synthesised from the
tissue maps (``tissue_contrast``). (Lesions are painted into real heads by :mod:`medflowad.data.painting`.)

None of this is patient data: it is a controlled stand-in with known ground truth, so that anyone can
rebuild the demo without data whose licence is unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Rand3DElastic, RandAffine, RandBiasField

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

# Relative tissue intensities (CSF, grey matter, white matter) of common MR contrasts.
CONTRASTS: dict[str, tuple[float, float, float]] = {
    "t1": (0.15, 0.55, 0.85),
    "t2": (1.0, 0.6, 0.4),
    "pd": (0.85, 0.8, 0.65),
    "flair": (0.1, 0.7, 0.5),
}


@dataclass
class Template:
    """Template channels on one grid: T1 (0-1), grey matter, white matter, CSF (probabilities)."""

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    affine: np.ndarray

    @property
    def csf(self) -> np.ndarray:
        brain = (self.t1 > 0.02).astype(np.float32)
        return np.clip(brain - self.gm - self.wm, 0.0, 1.0)


def load_template(folder: Path, factor: int = 2) -> Template:
    """Read the template files from ``folder`` and reduce them by ``factor`` (block means)."""
    channels = {}
    affine = None
    for name, file in TEMPLATE_FILES.items():
        path = Path(folder) / file
        if not path.is_file():
            raise FileNotFoundError(f"{path}: template file missing (see sample_data/README.md)")
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32) / 255.0
        channels[name] = _block_mean(data, factor)
        # Voxel i of the reduced grid is the mean of fine voxels f*i .. f*i + f - 1: its centre sits
        # at fine index f*i + (f - 1)/2.
        reduce = np.diag([factor, factor, factor, 1.0])
        reduce[:3, 3] = (factor - 1) / 2
        affine = image.affine @ reduce
    return Template(channels["t1"], channels["gm"], channels["wm"], affine)


def _block_mean(data: np.ndarray, factor: int) -> np.ndarray:
    shape = [s // factor for s in data.shape]
    cropped = data[: shape[0] * factor, : shape[1] * factor, : shape[2] * factor]
    return cropped.reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean(axis=(1, 3, 5))


def simulate_subject(template: Template, seed: int) -> Template:
    """One random anatomy: the same spatial transform for all channels; T1 gets bias, gamma and noise."""
    stacked = torch.from_numpy(np.stack([template.t1, template.gm, template.wm]))
    affine = RandAffine(prob=1.0, rotate_range=(0.08, 0.08, 0.08), scale_range=(0.06, 0.06, 0.06),
                        shear_range=(0.03, 0.03, 0.03), translate_range=(2, 2, 2), padding_mode="zeros")
    elastic = Rand3DElastic(sigma_range=(6, 8), magnitude_range=(40, 80), prob=1.0, padding_mode="zeros")
    bias = RandBiasField(degree=3, coeff_range=(0.05, 0.12), prob=1.0)  # residual shading after N4
    for i, transform in enumerate((affine, elastic, bias)):
        transform.set_random_state(seed=seed * 7919 + i)
    warped = elastic(affine(stacked)).numpy().clip(0, 1)
    rng = np.random.default_rng(seed)
    t1 = warped[0]
    brain = t1 > 0.02
    t1 = np.where(brain, bias(torch.from_numpy(t1[None])).numpy()[0], 0.0)
    t1 = np.clip(t1, 0, None) ** rng.uniform(0.92, 1.08)
    t1 = np.where(brain, t1 + rng.normal(0, 0.02, t1.shape), 0.0).clip(0, 1)
    return Template(t1.astype(np.float32), warped[1], warped[2], template.affine)


def tissue_contrast(subject: Template, contrast: str, seed: int) -> np.ndarray:
    """A synthetic scan of another contrast from the subject's tissue maps (0-1, with noise)."""
    csf_level, gm_level, wm_level = CONTRASTS[contrast]
    image = csf_level * subject.csf + gm_level * subject.gm + wm_level * subject.wm
    rng = np.random.default_rng(seed)
    noisy = image + rng.normal(0, 0.02, image.shape) * (subject.t1 > 0.02)
    return noisy.clip(0, 1).astype(np.float32)


def save_scan(path: Path, image: np.ndarray, affine: np.ndarray, scale: float = 1000.0) -> None:
    """Write a 0-1 image as int16 NIfTI (0..scale), or a mask as uint8, with sform and qform set."""
    data = image if image.dtype == np.uint8 else np.round(image * scale).astype(np.int16)
    nifti = nib.Nifti1Image(data, affine)
    nifti.header.set_xyzt_units("mm")
    nifti.set_sform(affine, code=1)
    nifti.set_qform(affine, code=1)
    nib.save(nifti, str(path))
