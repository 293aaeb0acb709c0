"""MONAI transforms give the maps and scores that `score` writes, on the input's grid, through MONAI's own
loader and writer too. Wiring tests: they compare with `score`, which runs the same path; the decisions
themselves are checked against independent computations in tests/mri/test_decisions.py."""

import csv

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirst, LoadImage, SaveImage

from medflowad.mri.score import score_scans
from medflowad.mri.transforms import AnomalyMap, AnomalyMapd, LoadScan, LoadScand
from tests.mri.conftest import brain_like, oblique_lps_affine, save_nifti


def test_dictionary_pipeline_matches_score_outputs(tiny_mri_model, tmp_path):
    scan = save_nifti(tmp_path / "case.nii.gz", brain_like(seed=5, blob=(20, 30, 7)), oblique_lps_affine())
    pipeline = Compose([LoadScand(keys="image"),
                        AnomalyMapd(keys="image", model=tiny_mri_model, maps=("llr", "last_scale"), device="cpu")])
    result = pipeline({"image": str(scan)})
    maps = result["image_anomaly"]
    written = nib.load(str(scan))  # independent read of the input's geometry
    assert maps.shape == (2, *written.shape)
    assert np.allclose(maps.affine.numpy(), written.affine, atol=1e-5)
    assert maps.meta["anomaly_maps"] == ["llr", "last_scale"]

    score_scans([scan], tiny_mri_model, tmp_path / "out", device="cpu")
    for channel, name in enumerate(("anomaly", "last_scale")):
        by_score = np.asarray(nib.load(str(tmp_path / "out" / f"case_{name}.nii.gz")).dataobj)
        assert np.allclose(maps[channel].numpy(), by_score, atol=1e-5), name
    row = next(csv.DictReader((tmp_path / "out" / "scores.csv").open()))
    scores = maps.meta["anomaly_scores"]
    assert np.isclose(scores["llr"], float(row["llr"]), rtol=1e-6)
    assert np.isclose(scores["llr_p"], float(row["llr_p"]))
    assert str(scores["llr_flag"]) == row["llr_flag"]

    # MONAI's writer puts the map back where the scan is, as read by nibabel.
    SaveImage(output_dir=str(tmp_path / "saved"), output_postfix="llr", separate_folder=False,
              print_log=False)(maps[:1])
    saved = nib.load(str(tmp_path / "saved" / "case_llr.nii.gz"))
    assert saved.shape[:3] == written.shape
    assert np.allclose(saved.affine, written.affine, atol=1e-4)
    assert np.allclose(np.asarray(saved.dataobj).reshape(written.shape), maps[0].numpy(), atol=1e-5)


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")  # MONAI's loader probing an optional GPU codec
def test_monai_loader_input_gives_the_same_maps(tiny_mri_model, tmp_path):
    scan = save_nifti(tmp_path / "case.nii.gz", brain_like(seed=6), oblique_lps_affine())
    transform = AnomalyMap(tiny_mri_model, maps=("llr_c1", "intensity"), device="cpu")
    ours = transform(LoadScan()(scan))
    theirs = transform(EnsureChannelFirst()(LoadImage(image_only=True)(str(scan))))
    assert ours.shape == theirs.shape == (2, *nib.load(str(scan)).shape)
    assert np.allclose(ours.numpy(), theirs.numpy(), atol=1e-5)


def test_bad_inputs_are_named(tiny_mri_model):
    with pytest.raises(ValueError, match="unknown anomaly map llr_c9"):
        AnomalyMap(tiny_mri_model, maps=("llr", "llr_c9"), device="cpu")
    transform = AnomalyMap(tiny_mri_model, device="cpu")
    with pytest.raises(TypeError, match="needs a MetaTensor"):
        transform(torch.zeros(1, 8, 8, 8))
    with pytest.raises(ValueError, match=r"one 3D scan.*\(2, 8, 8, 8\)"):
        transform(MetaTensor(torch.zeros(2, 8, 8, 8)))


def test_normative_maps_are_available_and_match_what_score_writes(tiny_mri_model, tmp_path):
    """The tiny model (native space) writes the normative llr as <id>_normative; the transform gives the same."""
    scan = save_nifti(tmp_path / "case.nii.gz", brain_like(seed=6, blob=(20, 30, 7)), oblique_lps_affine())
    maps = AnomalyMap(tiny_mri_model, maps=("llr_normative", "intensity_normative"), device="cpu")(
        LoadScan()(str(scan)))
    assert maps.shape[0] == 2
    score_scans([scan], tiny_mri_model, tmp_path / "out", device="cpu")
    written = np.asarray(nib.load(str(tmp_path / "out" / "case_normative.nii.gz")).dataobj)
    assert np.allclose(maps[0].numpy(), written, atol=1e-5)
    with pytest.raises(ValueError, match="unknown anomaly map"):
        AnomalyMap(tiny_mri_model, maps=("intensity_normativ",), device="cpu")
