"""DICOM series that are not one evenly sampled volume are refused with the reason, not stacked."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813

from medflowad.data.readers import ScanError, load_scan

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _write_series(folder: Path, slices: list[tuple[tuple[float, ...], float]]) -> Path:
    """One file per (orientation, position along its normal); 16 x 16 random pixels each."""
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    rng = np.random.default_rng(0)
    uid = "1.2.826.0.1.3680043.2.1125.9.1"
    for k, (orientation, offset) in enumerate(slices):
        normal = np.cross(orientation[:3], orientation[3:])
        image = sitk.GetImageFromArray(rng.integers(0, 1000, (1, 16, 16)).astype(np.int16))[:, :, 0]
        tags = {"0020|000e": uid, "0020|000d": "1.2.826.0.1.3680043.2.1125.9", "0008|0060": "MR",
                "0020|0037": "\\".join(f"{v:g}" for v in orientation),
                "0020|0032": "\\".join(f"{v:g}" for v in normal * offset), "0020|0013": str(k + 1),
                "0028|0030": "1\\1", "0008|0018": f"{uid}.{k + 1}"}
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(image)
    return folder


def test_even_axial_series_reads_with_its_spacing(tmp_path):
    scan = load_scan(_write_series(tmp_path / "ok", [(AXIAL, 2.5 * k) for k in range(6)]))
    assert scan.shape == (1, 16, 16, 6)
    assert np.isclose(float(np.linalg.norm(scan.affine[:3, 2])), 2.5)


@pytest.mark.parametrize(("slices", "message"), [
    ([(AXIAL, 0.0), ((0, 1, 0, 0, 0, -1), 0.0), ((1, 0, 0, 0, 0, -1), 0.0)], "slices in 3 orientations"),
    ([(AXIAL, 2.0 * (k % 4)) for k in range(8)], "8 slices at 4 positions: several volumes in one series"),
    ([(AXIAL, z) for z in (0.0, 2.0, 4.0, 8.0, 10.0)], "uneven slice spacing (2 to 4 mm): missing slices"),
])
def test_series_that_is_not_one_volume_is_refused(tmp_path, slices, message):
    folder = _write_series(tmp_path / "bad", slices)
    with pytest.raises(ScanError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        load_scan(folder)
    assert str(error.value).startswith(str(folder))


def test_complex_nifti_is_refused_not_cast(tmp_path):
    import nibabel as nib

    path = tmp_path / "phase.nii.gz"
    volume = (np.ones((8, 8, 4)) + 1j * np.ones((8, 8, 4))).astype(np.complex64)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
    with pytest.raises(ScanError, match=r"phase\.nii\.gz: complex voxels .*magnitude"):
        load_scan(path)


def test_four_d_image_is_refused_with_its_volume_count(tmp_path):
    import nibabel as nib

    path = tmp_path / "dwi.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4, 7), np.float32), np.eye(4)), str(path))
    with pytest.raises(ScanError, match=r"dwi\.nii\.gz: a 4D image of 7 volumes"):
        load_scan(path)
    single = tmp_path / "single.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4, 1), np.float32), np.eye(4)), str(single))
    assert load_scan(single).shape == (1, 8, 8, 4)  # one volume in 4D is just that volume
