"""Synthetic volumes with known geometry, and a tiny trained MRI model shared by the MRI tests."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813

from medflowad.mri.config import mri_config_from_dict
from medflowad.mri.training import train_mri_model


def rotation(ax: float, az: float) -> np.ndarray:
    cx, sx, cz, sz = np.cos(ax), np.sin(ax), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ rx


def oblique_lps_affine(spacing=(1.2, 0.9, 3.0), origin=(30.0, -20.0, 15.0)) -> np.ndarray:
    """Voxel -> RAS affine of an LPS-stored (first two axes flipped), oblique, anisotropic grid."""
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rotation(np.deg2rad(10), np.deg2rad(20)) @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def brain_like(shape=(48, 56, 14), seed=0, blob: tuple[int, int, int] | None = None) -> np.ndarray:
    """A textured ellipsoid on a dark background (int16), optionally with a small bright blob at ``blob``."""
    rng = np.random.default_rng(seed)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(float)
    centre = (np.array(shape) - 1) / 2
    radii = np.array(shape) * np.array([0.38, 0.4, 0.45])
    inside = (((idx - centre) / radii) ** 2).sum(-1) <= 1
    volume = np.where(inside, 100 + 8 * np.sin(idx[..., 0] / 3) * np.cos(idx[..., 1] / 4), 0.0)
    volume += rng.normal(0, 2, shape) * inside
    if blob is not None:
        distance = np.linalg.norm(idx - np.array(blob), axis=-1)
        volume = np.where(distance <= 2.0, 300.0, volume)
    return np.clip(volume, 0, None).astype(np.int16)


def save_nifti(path: Path, volume: np.ndarray, affine: np.ndarray) -> Path:
    image = nib.Nifti1Image(volume, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    nib.save(image, str(path))
    return path


def write_dicom_series(volume_path: Path, folder: Path, series: int = 7777, description: str | None = None) -> None:
    """DICOM series of a NIfTI volume via SimpleITK, files named in shuffled order; ``series`` makes the
    UID and, with a ``description``, the series number (another series may share the folder)."""
    image = sitk.Cast(sitk.ReadImage(str(volume_path)), sitk.sitkInt16)
    folder.mkdir(exist_ok=True)
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = f"1.2.826.0.1.3680043.2.1125.1.{series}"
    order = np.random.default_rng(series).permutation(image.GetDepth())
    for k in range(image.GetDepth()):
        slice_image = image[:, :, k]
        origin = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "MR", "0020|000e": series_uid, "0020|000d": "1.2.826.0.1.3680043.2.1125.1.8888",
            "0020|0013": str(k + 1), "0020|0032": "\\".join(f"{v:.6f}" for v in origin),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6],
                                                         direction[1], direction[4], direction[7])),
            "0028|0030": f"{image.GetSpacing()[1]:.6f}\\{image.GetSpacing()[0]:.6f}",
            "0018|0050": f"{image.GetSpacing()[2]:.6f}",
            "0008|0018": f"1.2.826.0.1.3680043.2.1125.1.9999.{series}.{k + 1}",
        }
        if description is not None:
            tags.update({"0020|0011": str(series), "0008|103e": description})
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"S{series}IM{order[k]:04d}.dcm"))
        writer.Execute(slice_image)


TINY_MRI = {
    "modality": "flair",
    "preprocessing": {"image_size": 32, "min_foreground": 0.05},
    "model": {"in_channels": 1, "image_size": [32, 32], "levels": 2, "steps": 2, "hidden": 16},
    "batch_size": 16, "general_steps": 15, "in_steps": 10, "device": "cpu", "val_fraction": 0.34,
    # the tests of the model's maps threshold the llr and flag scans by it; FLAIR's defaults have their own tests
    "mask_map": "llr", "scan_score": "llr",
}


@pytest.fixture(scope="session")
def tiny_mri_model(tmp_path_factory) -> Path:
    """Trained on synthetic volumes (3 healthy scans, a pool of textured volumes), a few seconds."""
    root = tmp_path_factory.mktemp("tiny_mri")
    affine = oblique_lps_affine()
    healthy = [save_nifti(root / f"healthy_{i}.nii.gz", brain_like(seed=i), affine) for i in range(3)]
    pool_dir = root / "pool_src"
    pool_dir.mkdir()
    for i in range(2):
        save_nifti(pool_dir / f"other_{i}.nii.gz", brain_like(shape=(40, 40, 10), seed=10 + i), np.eye(4))
    from medflowad.mri.pool import build_pool

    config = mri_config_from_dict(TINY_MRI)
    build_pool([pool_dir], root / "pool", config.preprocessing)
    train_mri_model(config, healthy, root / "model", pool=root / "pool", show_progress=False, echo=lambda m: None)
    return root / "model"
