"""Scan readers: DICOM series that are not one evenly sampled volume are refused with the reason, not stacked;
NRRD geometry, extension-less DICOM, 2D DICOM rescaling and the errors for missing series and unknown formats."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
import torch

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


def test_nrrd_reads_with_the_affine_of_its_geometry(tmp_path):
    """Voxel (i, j, k) of the NRRD is array[k, j, i] in SimpleITK's order, and its RAS position is the LPS
    position origin + direction @ (spacing * index) with x and y negated, computed here by hand."""
    rng = np.random.default_rng(1)
    array = rng.integers(-500, 1500, (5, 7, 9)).astype(np.int16)  # (z, y, x)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 1.1, 3.0))
    image.SetOrigin((12.0, -30.0, 5.0))
    angle = np.deg2rad(15)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    image.SetDirection(tuple(direction.ravel()))
    path = tmp_path / "scan.nrrd"
    sitk.WriteImage(image, str(path))
    scan = load_scan(path)
    assert scan.shape == (1, 9, 7, 5)
    assert np.array_equal(scan[0].numpy(), array.transpose(2, 1, 0).astype(np.float32))
    for index in ((0, 0, 0), (8, 6, 4), (3, 2, 1)):
        lps = np.array([12.0, -30.0, 5.0]) + direction @ (np.array([0.8, 1.1, 3.0]) * np.array(index))
        ras = scan.affine.numpy() @ np.array([*index, 1.0])
        np.testing.assert_allclose(ras[:3], lps * np.array([-1, -1, 1]), atol=1e-6)


def test_dicom_files_without_extension_read_like_named_ones(tmp_path):
    named = _write_series(tmp_path / "named", [(AXIAL, 2.0 * k) for k in range(4)])
    bare = tmp_path / "bare"
    bare.mkdir()
    for k, file in enumerate(sorted(named.iterdir())):
        (bare / f"IM{k:04d}").write_bytes(file.read_bytes())  # scanner exports: no extension
    a, b = load_scan(named), load_scan(bare)
    assert torch.equal(a, b) and torch.equal(a.affine, b.affine)
    single = load_scan(bare / "IM0002")  # one extension-less DICOM file, recognised by its 'DICM' preamble
    assert single.shape == (1, 16, 16, 1) and torch.equal(single[0, :, :, 0], a[0, :, :, 2])


def test_two_d_dicom_applies_rescale_slope_and_intercept(tmp_path):
    """Stored values v become slope * v + intercept (e.g. CT Hounsfield units), as DICOM PS3.3 C.11.1.1.2 says."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from medflowad.data.readers import load_image_2d

    stored = np.arange(48, dtype=np.uint16).reshape(6, 8) * 10
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "CT", 6, 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = "2", "-1024"
    ds.PixelData = stored.tobytes()
    path = tmp_path / "slice"  # no extension
    ds.save_as(str(path), enforce_file_format=True)
    np.testing.assert_array_equal(load_image_2d(path), stored.astype(np.float32) * 2 - 1024)


def test_missing_series_and_unsupported_formats_are_named(tmp_path):
    folder = _write_series(tmp_path / "series", [(AXIAL, 2.0 * k) for k in range(3)])
    with pytest.raises(ScanError, match=r"series 1\.2\.3 not found \(has 1\.2\.826\.0\.1\.3680043\.2\.1125\.9\.1\)"):
        load_scan(f"{folder}::1.2.3")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ScanError, match=r"empty: no DICOM image series found"):
        load_scan(empty)
    for name, shown in (("scan.xyz", "'.xyz'"), ("README", "'no extension'")):
        (tmp_path / name).write_bytes(b"\x00" * 300)
        with pytest.raises(ScanError, match=f"{name}: unsupported scan format {shown}"):
            load_scan(tmp_path / name)
