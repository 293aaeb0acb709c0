"""Maps land on the input's grid: shape and affine read back with nibabel and SimpleITK, world positions kept."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813

from medflowad.data.readers import LPS_TO_RAS, ScanError, find_scans, load_scan, scan_id
from medflowad.data.scans import ScanPreprocessing, prepare_scan, to_native
from medflowad.mri.analysis import analyse_scan
from medflowad.mri.model import load_mri_model
from medflowad.mri.pool import collect_sources
from medflowad.mri.score import score_scans, write_nifti
from medflowad.scores import likelihoods
from tests.conftest import data_root
from tests.mri.conftest import brain_like, oblique_lps_affine, save_nifti, write_dicom_series


def _sitk_affine(image: sitk.Image) -> np.ndarray:
    """Independent RAS affine from SimpleITK's LPS geometry."""
    affine = np.eye(4)
    affine[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ affine


def _check_same_grid(map_path: Path, scan_path: Path) -> None:
    scan, out = nib.load(str(scan_path)), nib.load(str(map_path))
    assert out.shape == scan.shape
    assert out.get_data_dtype() in (np.float32, np.uint8)
    assert np.allclose(out.affine, scan.affine, atol=1e-4)
    assert np.allclose(out.get_sform(), scan.affine, atol=1e-4)
    assert int(out.header["sform_code"]) > 0 and int(out.header["qform_code"]) > 0
    ref, got = sitk.ReadImage(str(scan_path)), sitk.ReadImage(str(map_path))
    assert got.GetSize() == ref.GetSize()
    assert np.allclose(got.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    assert np.allclose(got.GetSpacing(), ref.GetSpacing(), atol=1e-4)
    assert np.allclose(got.GetDirection(), ref.GetDirection(), atol=1e-4)


@pytest.mark.skipif(data_root() is None, reason="real data not found: set MEDFLOWAD_DATA")
@pytest.mark.parametrize("name", ["brainix/FLAIR.nii.gz", "brainix/T1.nii.gz"])
def test_maps_of_real_scans_have_input_shape_and_affine(tiny_mri_model, tmp_path, name):
    scan = data_root() / "medical" / "nifti_samples" / name
    result = score_scans([scan], tiny_mri_model, tmp_path, device="cpu")
    assert result.all_ok, result.rows
    for suffix in ("anomaly", "last_scale", "anomaly_mask"):
        _check_same_grid(tmp_path / f"{scan_id_of(scan)}_{suffix}.nii.gz", scan)


def scan_id_of(path: Path) -> str:
    return path.name.replace(".nii.gz", "")


def test_reader_affine_matches_simpleitk_for_oblique_lps(tmp_path):
    path = save_nifti(tmp_path / "v.nii.gz", brain_like(), oblique_lps_affine())
    scan = load_scan(path)
    assert np.allclose(scan.affine.numpy(), _sitk_affine(sitk.ReadImage(str(path))), atol=1e-4)
    mha = tmp_path / "v.mha"
    sitk.WriteImage(sitk.ReadImage(str(path)), str(mha))
    from_mha = load_scan(mha)
    assert np.allclose(from_mha.affine.numpy(), scan.affine.numpy(), atol=1e-4)
    assert np.array_equal(from_mha.numpy(), scan.numpy())


def _world(affine: np.ndarray, ijk) -> np.ndarray:
    return (affine @ np.append(np.asarray(ijk, float), 1.0))[:3]


def test_bright_blob_maps_back_to_its_world_position(tmp_path):
    """Oblique, LPS-stored, anisotropic input: the map's peak sits at the blob's world coordinate."""
    affine = oblique_lps_affine()
    blob = (30, 20, 8)
    path = save_nifti(tmp_path / "blob.nii.gz", brain_like(blob=blob), affine)
    config = ScanPreprocessing(image_size=32, min_foreground=0.05)
    prepared = prepare_scan(load_scan(path), config)
    # The intensity-baseline map is computed from the model-grid slices, so it exercises every geometry
    # step (orientation, crop, resize, display layout, resampling back) without depending on training.
    maps = prepared.slices[:, 0].numpy().astype(np.float32) * prepared.foreground
    native = to_native(maps, prepared)
    write_nifti(tmp_path / "map.nii.gz", native, prepared)
    written = nib.load(str(tmp_path / "map.nii.gz"))
    data = np.asarray(written.dataobj)
    peak = np.unravel_index(np.argmax(data), data.shape)
    grid_voxel = np.linalg.norm(prepared.grid.affine.numpy()[:3, :3], axis=0)
    distance = np.linalg.norm(_world(written.affine, peak) - _world(affine, blob))
    assert distance <= np.linalg.norm(grid_voxel), (distance, grid_voxel)


def test_llr_and_last_scale_maps_sum_to_slice_scores(tiny_mri_model, tmp_path):
    model = load_mri_model(tiny_mri_model, "cpu")
    path = save_nifti(tmp_path / "s.nii.gz", brain_like(seed=5), oblique_lps_affine())
    prepared = prepare_scan(load_scan(path), model.config.preprocessing)
    prepared.foreground[:] = True  # no masking, so the whole map must add up to the score
    analysis = analyse_scan(prepared, model.in_model, model.general_model)
    scored = np.nonzero(prepared.keep)[0]
    assert len(scored) > 3
    for name in ("llr", "last_scale"):
        sums = analysis.maps[name][scored].sum(axis=(1, 2))
        assert np.allclose(sums, analysis.slice_scores[name][scored], rtol=1e-4, atol=1e-2), name
        # With the whole slice as foreground, the foreground mean is the sum over S*S pixels.
        size = prepared.slices.shape[-1]
        assert np.allclose(analysis.slice_scores[f"{name}_fg"][scored], sums / size**2, rtol=1e-4), name
    # Each scale's share of the llr map sums to that scale's c_i(general) - c_i(in) from the models'
    # per-scale contributions, and the shares add up to the llr map.
    slices = prepared.slices[scored]
    c_in = likelihoods(model.in_model, slices).contributions
    c_g = likelihoods(model.general_model, slices).contributions
    names = [f"llr_c{i + 1}" for i in range(model.config.model.levels)]
    for i, name in enumerate(names):
        share = analysis.maps[name][scored].sum(axis=(1, 2))
        assert np.allclose(share, c_g[:, i] - c_in[:, i], rtol=1e-4, atol=1e-2), name
    total = sum(analysis.maps[name] for name in names)
    assert np.allclose(total, analysis.maps["llr"], atol=1e-4)


def test_dicom_series_maps_match_nifti_world_space(tiny_mri_model, tmp_path):
    nifti = save_nifti(tmp_path / "case.nii.gz", brain_like(seed=7), oblique_lps_affine())
    dicom = tmp_path / "case_dicom"
    write_dicom_series(nifti, dicom)
    from_dicom = load_scan(dicom)
    from_nifti = load_scan(nifti)
    assert np.allclose(from_dicom.affine.numpy(), from_nifti.affine.numpy(), atol=1e-3)
    assert np.array_equal(from_dicom.numpy(), from_nifti.numpy())  # slice order from geometry

    result = score_scans([nifti, dicom], tiny_mri_model, tmp_path / "out", device="cpu")
    assert result.all_ok, result.rows
    a = nib.load(str(tmp_path / "out" / "case_anomaly.nii.gz"))
    b = nib.load(str(tmp_path / "out" / "case_dicom_anomaly.nii.gz"))
    assert a.shape == b.shape
    assert np.allclose(a.affine, b.affine, atol=1e-3)
    assert np.allclose(np.asarray(a.dataobj), np.asarray(b.dataobj), atol=1e-3)


def test_dicom_folder_with_several_series_is_one_scan_per_series(tiny_mri_model, tmp_path):
    """A study exported into one folder: each series is read, named and scored on its own, never one
    in place of another; '--pattern' picks series by description."""
    flair = save_nifti(tmp_path / "flair.nii.gz", brain_like(seed=7, blob=(20, 30, 7)), oblique_lps_affine())
    t1 = save_nifti(tmp_path / "t1.nii.gz", brain_like(shape=(40, 44, 10), seed=8),
                    oblique_lps_affine(spacing=(1.0, 1.0, 2.0)))
    study = tmp_path / "study"
    write_dicom_series(flair, study, series=3, description="AX T2 FLAIR")
    write_dicom_series(t1, study, series=2, description="T1 MPRAGE")

    scans = find_scans([tmp_path])  # also finds the two NIfTI files
    series = [s for s in scans if str(s).startswith(str(study))]
    assert [scan_id(s) for s in series] == ["study_2_T1_MPRAGE", "study_3_AX_T2_FLAIR"]  # by series number
    for path, source in zip(series, (t1, flair), strict=True):
        expected = nib.load(str(source))  # independent read of the volume each series was made from
        got = load_scan(path)
        assert np.allclose(got.affine.numpy(), expected.affine, atol=1e-3)
        assert np.array_equal(got.numpy()[0], np.asarray(expected.dataobj, dtype=np.float32))
    with pytest.raises(ScanError, match=r"holds 2 DICOM series; name one as FOLDER::UID"):
        load_scan(study)
    assert [p for p, kind in collect_sources([study]) if kind == "dicom-series"] == [str(s) for s in series]
    assert collect_sources([series[1]]) == [(str(series[1]), "dicom-series")]

    out = tmp_path / "out"
    result = score_scans([study, flair], tiny_mri_model, out, device="cpu", pattern="*FLAIR*")
    assert result.all_ok, result.rows
    assert [r["scan_id"] for r in result.rows] == ["study_3_AX_T2_FLAIR", "flair"]
    a = nib.load(str(out / "flair_anomaly.nii.gz"))
    b = nib.load(str(out / "study_3_AX_T2_FLAIR_anomaly.nii.gz"))
    assert a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-3)
    assert np.allclose(np.asarray(a.dataobj), np.asarray(b.dataobj), atol=1e-3)
