"""Normative maps: per-location centre and spread from healthy calibration scans, and their use in score."""

import nibabel as nib
import numpy as np

from medflowad.mri.analysis import intensity_map
from medflowad.mri.normative import MAD_TO_SD, fit_normative, normative_map


def _healthy_population(n_scans=40, z=6, size=8, seed=0):
    """Maps whose healthy values at each location come from N(mu_l, sigma_l), with mu and sigma varying
    strongly from place to place (as anatomy makes likelihood maps do)."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(0, 20, (z, size, size))
    sigma = rng.uniform(0.5, 5, (z, size, size))
    maps = [mu + sigma * rng.standard_normal((z, size, size)) for _ in range(n_scans)]
    healthy = [np.ones((z, size, size), dtype=bool) for _ in range(n_scans)]
    levels = [np.arange(z) for _ in range(n_scans)]
    return maps, healthy, levels, mu, sigma


def test_centre_and_spread_are_the_robust_statistics_of_each_neighbourhood():
    maps, healthy, levels, _, _ = _healthy_population()
    centre, spread = fit_normative(maps, healthy, levels, count=6, neighbour_levels=False)
    stack = np.stack(maps)
    for z, r, c in [(0, 0, 0), (2, 3, 4), (5, 7, 7)]:  # corners have fewer neighbours
        values = stack[:, z, max(r - 1, 0):r + 2, max(c - 1, 0):c + 2].ravel()
        median = np.median(values)
        assert np.isclose(centre[z, r, c], median, atol=1e-4)
        assert np.isclose(spread[z, r, c], MAD_TO_SD * np.median(np.abs(values - median)), atol=1e-4)


def test_normative_maps_of_healthy_scans_have_mean_zero_and_spread_one_per_location():
    """Fitted on one healthy population, applied to another drawn alike: per location, mean about 0 and
    standard deviation about 1 (numpy on the normative values), although raw means vary by +-40."""
    _, _, _, mu, sigma = _healthy_population(size=8, seed=1)
    # Neighbourhoods are pooled, so make mu and sigma constant over 4x4 blocks: the 3x3 neighbourhoods of
    # each block's 2x2 interior then hold one distribution, and the fit can be checked there.
    mu = np.repeat(np.repeat(mu[:, ::4, ::4], 4, axis=1), 4, axis=2)
    sigma = np.repeat(np.repeat(sigma[:, ::4, ::4], 4, axis=1), 4, axis=2)
    rng = np.random.default_rng(2)
    fit = [mu + sigma * rng.standard_normal(mu.shape) for _ in range(60)]
    everywhere, levels = np.ones(mu.shape, dtype=bool), np.arange(6)
    centre, spread = fit_normative(fit, [everywhere] * 60, [levels] * 60, count=6, neighbour_levels=False)
    test = np.stack([mu + sigma * rng.standard_normal(mu.shape) for _ in range(200)])
    z = np.stack([normative_map(t, everywhere, levels, centre, spread) for t in test])
    interior = np.zeros(mu.shape[1:], dtype=bool)
    for start in (0, 4):
        for other in (0, 4):
            interior[start + 1:start + 3, other + 1:other + 3] = True
    assert np.abs(z.mean(axis=0)[:, interior]).max() < 0.35
    assert np.abs(z.std(axis=0)[:, interior] - 1).max() < 0.3
    assert np.abs(test.mean(axis=0)).max() > 20  # the raw maps do vary from place to place


def test_locations_with_too_few_healthy_values_take_the_global_statistics():
    maps, healthy, levels, _, _ = _healthy_population(n_scans=3)
    for h in healthy:
        h[4] = False  # no healthy voxel at level 4 in any scan
    centre, spread = fit_normative(maps, healthy, levels, count=6, neighbour_levels=False)
    everything = np.concatenate([m[h] for m, h in zip(maps, healthy, strict=True)])
    median = np.median(everything)
    assert np.allclose(centre[4], median, atol=1e-4)
    assert np.allclose(spread[4], MAD_TO_SD * np.median(np.abs(everything - median)), atol=1e-4)


def test_score_writes_the_normative_map_and_keeps_the_llr_mask_on_native_grids(tiny_mri_model, tmp_path):
    from medflowad.mri.analysis import threshold_at_fpr
    from medflowad.mri.model import load_mri_model
    from medflowad.mri.score import score_scans
    from tests.mri.conftest import brain_like, oblique_lps_affine, save_nifti

    scan = save_nifti(tmp_path / "s.nii.gz", brain_like(seed=21, blob=(30, 20, 8)), oblique_lps_affine())
    model = load_mri_model(tiny_mri_model, "cpu")
    assert "normative/llr/centre" in model.calibration
    result = score_scans([scan], tiny_mri_model, tmp_path / "out", device="cpu")
    assert result.all_ok, result.rows
    written = nib.load(str(tmp_path / "out" / "s_normative.nii.gz"))
    assert written.header.get_intent()[0] == "z score"
    assert (float(written.header["cal_min"]), float(written.header["cal_max"])) == (0.0, 5.0)
    threshold = threshold_at_fpr(model.calibration["voxel/llr"], model.config.fpr)
    mask = np.asarray(nib.load(str(tmp_path / "out" / "s_anomaly_mask.nii.gz")).dataobj)
    llr = np.asarray(nib.load(str(tmp_path / "out" / "s_anomaly.nii.gz")).dataobj)
    assert np.array_equal(mask.astype(bool), llr > threshold)


def test_slice_top_mean_is_the_mean_of_the_k_highest_values_inside_the_region():
    from medflowad.mri.normative import slice_top_mean

    rng = np.random.default_rng(3)
    values = rng.normal(size=(3, 8, 8))
    region = rng.random((3, 8, 8)) > 0.3
    region[2] = False
    got = slice_top_mean(values, region, k=5)
    for z in range(2):
        assert np.isclose(got[z], np.mean(sorted(values[z][region[z]])[-5:]))
    assert np.isnan(got[2])


def _prepared(image: np.ndarray, unclipped: np.ndarray | None = None):
    """A standard-space-like PreparedScan of a (Z, S, S) 0-1 image, foreground everywhere."""
    import torch

    from medflowad.data.scans import PreparedScan

    slices = torch.from_numpy(np.round(image * 255).astype(np.uint8))[:, None]
    z = len(image)
    return PreparedScan(slices=slices, foreground=np.ones(image.shape, dtype=bool), keep=np.ones(z, dtype=bool),
                        lesion_slices=None, lesion=None, grid=None, native=None, unclipped=unclipped)


def test_intensity_calibration_leaves_each_subject_out_with_all_its_scans():
    """Subject C's four scans share a bright square that the two other subjects lack. Left out together,
    the square stands far above the others' statistics; were its scans counted as four subjects, each one's
    twins would be in the statistics that judge it (three bright of five), and the square would look ordinary."""
    from medflowad.mri.calibration import _model_free_calibration

    rng = np.random.default_rng(4)
    base = rng.uniform(0.3, 0.5, (4, 16, 16))
    scans = [np.clip(base + rng.normal(0, 0.02, base.shape), 0, 1) for _ in range(6)]
    for i in (2, 3, 4, 5):
        scans[i][:, 2:14, 2:14] = 0.9
    prepared = [_prepared(s) for s in scans]
    grouped = _model_free_calibration(prepared, ["a", "b", "c", "c", "c", "c"], True, 0.5, intensity_map)
    apart = _model_free_calibration(prepared, ["a", "b", "c", "d", "e", "f"], True, 0.5, intensity_map)
    assert grouped["scan/intensity_normative"][2:].min() > 3 * apart["scan/intensity_normative"][2:].max()
    # the stored statistics come from every scan
    assert grouped["normative/intensity/centre"].shape == (4, 16, 16)
    assert len(grouped["scan/intensity_normative"]) == 6 and len(grouped["voxel"]) == 6


def test_one_subject_gives_no_intensity_calibration():
    from medflowad.mri.calibration import _model_free_calibration

    prepared = [_prepared(np.full((2, 8, 8), 0.4)) for _ in range(2)]
    assert _model_free_calibration(prepared, ["a", "a"], True, 0.5, intensity_map) == {}


def test_intensity_scan_z_is_the_robust_z_of_the_region():
    from medflowad.mri.analysis import intensity_scan_z

    rng = np.random.default_rng(5)
    image = rng.uniform(size=(2, 6, 6)).astype(np.float32)
    region = rng.random((2, 6, 6)) > 0.4
    values = image[region]
    mad = 1.4826 * np.median(np.abs(values - np.median(values)))
    expected = np.where(region, np.abs(image - np.median(values)) / mad, 0)
    assert np.allclose(np.abs(intensity_scan_z(image, region)), expected, atol=1e-5)
    signed = np.where(region, (image - np.median(values)) / mad, 0)
    assert np.allclose(intensity_scan_z(image, region), signed, atol=1e-5)


def test_smoothing_within_the_region_is_a_normalised_convolution():
    """Against a brute-force sum over the slice with Gaussian weights: only region pixels count, each slice alone."""
    from medflowad.mri.analysis import smoothed_within

    rng = np.random.default_rng(7)
    image = rng.normal(size=(2, 24, 24)).astype(np.float32)
    region = np.zeros((2, 24, 24), dtype=bool)
    region[0, 4:20, 6:18] = True
    region[1, 8:16, 2:22] = rng.random((8, 20)) > 0.3
    sigma = 1.5
    result = smoothed_within(image, region, sigma)
    rows, cols = np.mgrid[0:24, 0:24]
    for z, i, j in [(0, 4, 6), (0, 11, 11), (0, 19, 17), (1, 9, 3), (1, 12, 20)]:
        if not region[z, i, j]:
            continue
        # far from the image border, scipy's reflection does not reach the region: a plain Gaussian sum
        weights = np.exp(-((rows - i) ** 2 + (cols - j) ** 2) / (2 * sigma**2)) * region[z]
        assert np.isclose(result[z, i, j], (weights * image[z]).sum() / weights.sum(), atol=2e-3)
    assert np.all(result[~region] == 0)
    constant = smoothed_within(np.full(image.shape, 3.0, dtype=np.float32), region, sigma)
    assert np.allclose(constant[region], 3.0, atol=1e-5)  # the brain's edge is not pulled towards 0


def test_scan_z_area_is_the_bright_share_of_each_scored_slice_averaged_with_its_scored_neighbours():
    """By hand: per scored slice, pixels above 2 over all S x S pixels; then the mean of the previous scored,
    this and the next scored slice (the end slices count themselves for the missing neighbour)."""
    from medflowad.mri.analysis import scan_z_area

    rng = np.random.default_rng(11)
    scan_z = rng.normal(scale=2.0, size=(6, 5, 5)).astype(np.float32)
    keep = np.array([False, True, True, False, True, True])
    share = {z: sum(scan_z[z, i, j] > 2 for i in range(5) for j in range(5)) / 25 for z in (1, 2, 4, 5)}
    expected = [np.nan, (2 * share[1] + share[2]) / 3, (share[1] + share[2] + share[4]) / 3, np.nan,
                (share[2] + share[4] + share[5]) / 3, (share[4] + 2 * share[5]) / 3]
    np.testing.assert_allclose(scan_z_area(scan_z, keep), expected, atol=1e-12)
    assert np.isnan(scan_z_area(scan_z, np.zeros(6, dtype=bool))).all()


def test_score_with_the_normative_intensity_as_mask_map_and_scan_score(tiny_mri_model, tmp_path):
    """A model whose config chooses the normative intensity: the mask is that map above its healthy
    threshold at the config's voxel FPR, the map is written as <id>_normative, and flags, report and table
    head use its scan score."""
    import shutil

    import yaml

    from medflowad.mri.analysis import threshold_at_fpr
    from medflowad.mri.model import load_mri_model
    from medflowad.mri.score import score_scans
    from tests.mri.conftest import brain_like, oblique_lps_affine, save_nifti

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_mri_model, model_dir)
    config = yaml.safe_load((model_dir / "mri.yaml").read_text())
    config.update(mask_map="intensity_normative", scan_score="intensity_normative", voxel_fpr=0.01)
    (model_dir / "mri.yaml").write_text(yaml.safe_dump(config))
    scan = save_nifti(tmp_path / "s.nii.gz", brain_like(seed=22, blob=(30, 20, 8)), oblique_lps_affine())
    model = load_mri_model(model_dir, "cpu")
    result = score_scans([scan], model_dir, tmp_path / "out", device="cpu", report=True)
    assert result.all_ok and result.scan_score == "intensity_normative"
    row = result.rows[0]
    healthy = model.calibration["scan/intensity_normative"]
    assert row["intensity_normative_p"] == (1 + np.sum(healthy >= row["intensity_normative"])) / (1 + len(healthy))
    threshold = threshold_at_fpr(model.calibration["voxel/intensity_normative"], 0.01)  # voxel_fpr, not fpr
    assert threshold > threshold_at_fpr(model.calibration["voxel/intensity_normative"], model.config.fpr)
    written = nib.load(str(tmp_path / "out" / "s_normative.nii.gz"))
    assert written.header.get_intent()[0] != "z score"  # a distance beyond the healthy range, not a z-score
    assert float(written.header["cal_max"]) == 5.0
    normative = np.asarray(written.dataobj)
    assert normative.min() >= 0  # zero inside the healthy range, positive outside it, either way
    mask = np.asarray(nib.load(str(tmp_path / "out" / "s_anomaly_mask.nii.gz")).dataobj)
    assert np.array_equal(mask.astype(bool), normative > threshold)
    assert "Scan score: intensity_normative" in (tmp_path / "out" / "report.html").read_text()


def test_a_mask_map_the_calibration_lacks_is_refused_at_load(tiny_mri_model, tmp_path):
    import shutil

    import pytest
    import yaml

    from medflowad.mri.model import load_mri_model
    from medflowad.storage import ModelFolderError, read_tensors, write_tensors

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_mri_model, model_dir)
    config = yaml.safe_load((model_dir / "mri.yaml").read_text())
    config.update(mask_map="intensity_normative")
    (model_dir / "mri.yaml").write_text(yaml.safe_dump(config))
    load_mri_model(model_dir, "cpu")  # calibrated: loads
    tensors = read_tensors(model_dir / "calibration.safetensors")
    del tensors["voxel/intensity_normative"]  # as a model calibrated before normative intensity maps
    write_tensors(model_dir / "calibration.safetensors", tensors)
    with pytest.raises(ModelFolderError, match="voxel/intensity_normative"):
        load_mri_model(model_dir, "cpu")
    config.update(mask_map="nonsense")
    (model_dir / "mri.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ModelFolderError, match=r"mri\.yaml: mask_map must be one of"):
        load_mri_model(model_dir, "cpu")


def test_healthy_range_is_the_percentiles_of_each_wider_neighbourhood():
    from medflowad.mri.normative import RANGE_QUANTILE, RANGE_RADIUS, fit_healthy_range

    maps, healthy, levels, _, _ = _healthy_population(n_scans=12, size=10)
    low, high = fit_healthy_range(maps, healthy, levels, count=6, neighbour_levels=False)
    stack = np.stack(maps)
    r = RANGE_RADIUS
    for z, row, col in [(0, 0, 0), (3, 5, 4), (5, 9, 9)]:
        values = stack[:, z, max(row - r, 0):row + r + 1, max(col - r, 0):col + r + 1].ravel()
        assert np.isclose(low[z, row, col], np.percentile(values, RANGE_QUANTILE), atol=1e-4)
        assert np.isclose(high[z, row, col], np.percentile(values, 100 - RANGE_QUANTILE), atol=1e-4)


def test_beyond_the_healthy_range_counts_either_way_and_is_zero_inside():
    from medflowad.mri.normative import beyond_healthy_range

    low, high = np.full((1, 2, 2), 0.3), np.full((1, 2, 2), 0.6)
    spread = np.array([[[0.1, 0.1], [0.2, 0.2]]])
    values = np.array([[[0.45, 0.8], [0.1, 0.6]]])
    region = np.ones((1, 2, 2), dtype=bool)
    got = beyond_healthy_range(values, region, np.array([0]), low, high, spread)
    np.testing.assert_allclose(got, [[[0.0, 2.0], [1.0, 0.0]]], atol=1e-6)
    region[0, 0, 1] = False
    assert beyond_healthy_range(values, region, np.array([0]), low, high, spread)[0, 0, 1] == 0


def test_subject_folds_leave_one_out_for_few_subjects_and_five_folds_for_many():
    from medflowad.mri.calibration import subject_folds

    few = subject_folds(["a", "a", "b", "c"])
    assert sorted(map(sorted, few)) == [["a"], ["b"], ["c"]]
    many = subject_folds([f"s{i}" for i in range(23)] + ["s0"])
    assert len(many) == 5 and set().union(*many) == {f"s{i}" for i in range(23)}
    assert sum(len(f) for f in many) == 23 and max(map(len, many)) - min(map(len, many)) <= 1


def test_intensity_healthy_range_is_fit_to_the_image_it_is_told_to_read():
    """Healthy scans whose normalised image stands at 1.3 before the clip: the unclipped reading's healthy
    range is 1.3 wherever it is, the clipped one's the ceiling 1.0."""
    from medflowad.mri.analysis import intensity_map, unclipped_intensity_map
    from medflowad.mri.calibration import _model_free_calibration

    prepared = [_prepared(np.ones((3, 8, 8)), unclipped=np.full((3, 8, 8), 1.3, dtype=np.float32)) for _ in range(3)]
    clipped = _model_free_calibration(prepared, ["a", "b", "c"], True, 0.5, intensity_map)
    unclipped = _model_free_calibration(prepared, ["a", "b", "c"], True, 0.5, unclipped_intensity_map)
    for key in ("centre", "low", "high"):
        assert np.allclose(clipped[f"normative/intensity/{key}"], 1.0)
        assert np.allclose(unclipped[f"normative/intensity/{key}"], 1.3)


def test_analyse_reads_the_image_the_config_names(tiny_mri_model, tmp_path):
    """A blob at 2.5x the brain's maximum, against a healthy range of [0, 1] with spread 0.1 everywhere: read
    unclipped, the map is (x - 1) / 0.1 where the normalised image x passes 1; read clipped, it is zero."""
    import dataclasses

    import pytest

    from medflowad.data.readers import load_scan
    from medflowad.data.scans import prepare_scan
    from medflowad.mri.model import analyse, load_mri_model
    from tests.mri.conftest import brain_like, oblique_lps_affine, save_nifti

    model = load_mri_model(tiny_mri_model, "cpu")
    assert model.config.normative_intensity == "clipped"  # the fixture's config predates the key
    volume = brain_like(seed=5)
    volume[22:25, 26:29, 7:9] = 2.5 * volume.max()  # 18 voxels: above the 99.5th percentile the clip sets
    prepared = prepare_scan(load_scan(save_nifti(tmp_path / "blob.nii.gz", volume, oblique_lps_affine())),
                            model.config.preprocessing)
    size = prepared.slices.shape[-1]
    statistics = {key: np.full((16, size, size), value, dtype=np.float32)
                  for key, value in (("centre", 0.5), ("spread", 0.1), ("low", 0.0), ("high", 1.0))}
    calibration = {**model.calibration, **{f"normative/intensity/{k}": v for k, v in statistics.items()}}
    region = prepared.scored
    assert (prepared.unclipped[region] > 1).any()
    expected = np.where(region, np.maximum(prepared.unclipped - 1.0, 0.0) / 0.1, 0.0)
    for reading, want in (("unclipped", expected), ("clipped", np.zeros_like(expected))):
        configured = dataclasses.replace(model, calibration=calibration,
                                         config=dataclasses.replace(model.config, normative_intensity=reading))
        assert np.allclose(analyse(configured, prepared).maps["intensity_normative"], want, atol=1e-5), reading
    with pytest.raises(Exception, match="normative_intensity must be one of clipped, unclipped"):
        dataclasses.replace(model.config, normative_intensity="raw").validate()


def test_standardised_calibration_stores_the_mean_landmarks_and_lines_up_other_contrasts():
    """Three healthy subjects, one anatomy under three tissue contrasts (x, x^2, sqrt x: a sequence that puts
    grey and white matter elsewhere between the normalisation's percentiles). The stored landmarks are the mean
    of the scans' percentiles (numpy, by hand); standardised, under 5 % of each subject's voxels fall outside the
    others' healthy range, read as it is over three times as many."""
    from medflowad.mri.analysis import unclipped_intensity_map
    from medflowad.mri.calibration import _model_free_calibration
    from medflowad.mri.landmarks import LANDMARK_PERCENTILES

    rng = np.random.default_rng(6)
    anatomy = np.clip(rng.uniform(0.05, 0.95, (3, 12, 12)), 0, 1).astype(np.float32)
    looks = [anatomy, anatomy ** 2, np.sqrt(anatomy)]
    scans = [_prepared(look, unclipped=look) for look in looks]
    plain = _model_free_calibration(scans, ["a", "b", "c"], True, 0.5, unclipped_intensity_map)
    lined_up = _model_free_calibration(scans, ["a", "b", "c"], True, 0.5, unclipped_intensity_map, True)
    assert "normative/intensity/landmarks" not in plain
    assert np.allclose(lined_up["normative/intensity/landmarks"],
                       np.mean([np.percentile(look, LANDMARK_PERCENTILES) for look in looks], axis=0))
    outside = [np.mean(np.concatenate(result["voxel"]) > 0) for result in (plain, lined_up)]
    assert outside[1] < 0.05 and outside[0] > 3 * outside[1], outside
    # each scan's share beyond the range, as the calibration stores it for the unlike-healthy check
    for result in (plain, lined_up):
        assert np.allclose(result["scan/beyond_range_share"], [np.mean(v > 0) for v in result["voxel"]])


def test_analyse_standardises_when_the_config_says_so(tiny_mri_model, tmp_path):
    """With ``standardise_intensity`` the healthy-range map reads the scan mapped onto the stored landmarks; a
    model that says so but whose calibration has none is refused on loading, as are landmarks out of order."""
    import dataclasses
    import shutil

    import pytest
    import torch

    from medflowad.data.readers import load_scan
    from medflowad.data.scans import prepare_scan
    from medflowad.mri.landmarks import LANDMARK_PERCENTILES
    from medflowad.mri.model import analyse, load_mri_model
    from medflowad.storage import ModelFolderError, read_tensors, write_tensors, write_yaml
    from tests.mri.conftest import brain_like, oblique_lps_affine, save_nifti

    model = load_mri_model(tiny_mri_model, "cpu")
    prepared = prepare_scan(load_scan(save_nifti(tmp_path / "scan.nii.gz", brain_like(seed=7), oblique_lps_affine())),
                            model.config.preprocessing)
    size = prepared.slices.shape[-1]
    statistics = {key: np.full((16, size, size), value, dtype=np.float32)
                  for key, value in (("centre", 0.5), ("spread", 0.1), ("low", 0.2), ("high", 0.3))}
    standard = np.linspace(0.0, 1.0, len(LANDMARK_PERCENTILES))
    calibration = {**model.calibration, **{f"normative/intensity/{k}": v for k, v in statistics.items()},
                   "normative/intensity/landmarks": standard}
    config = dataclasses.replace(model.config, normative_intensity="unclipped", standardise_intensity=True)
    got = analyse(dataclasses.replace(model, calibration=calibration, config=config), prepared)
    region = prepared.scored
    values = prepared.unclipped[region].astype(np.float64)
    own = np.percentile(values, LANDMARK_PERCENTILES)
    mapped = np.interp(values, own, standard)  # the scan's own voxels lie within its end landmarks but a few
    inside = (values >= own[0]) & (values <= own[-1])
    beyond = np.maximum(np.maximum(mapped - 0.3, 0.2 - mapped), 0.0) / 0.1
    assert np.allclose(got.maps["intensity_normative"][region][inside], beyond[inside], atol=1e-4)

    folder = tmp_path / "model"
    shutil.copytree(tiny_mri_model, folder)
    write_yaml(folder / "mri.yaml", config.to_dict())
    with pytest.raises(ModelFolderError, match="calibration lacks normative/intensity/landmarks"):
        load_mri_model(folder, "cpu")
    stored = dict(read_tensors(folder / "calibration.safetensors"))
    for landmarks in (torch.from_numpy(standard[::-1].copy()), torch.zeros(3, dtype=torch.float64)):
        write_tensors(folder / "calibration.safetensors", {**stored, "normative/intensity/landmarks": landmarks})
        with pytest.raises(ModelFolderError, match="intensity landmarks"):
            load_mri_model(folder, "cpu")


def test_share_beyond_the_range_and_the_unlike_healthy_limit():
    from medflowad.mri.normative import beyond_share, unlike_healthy_limit

    beyond = np.zeros((2, 4, 4), dtype=np.float32)
    beyond[0, :2, :] = 0.5  # 8 voxels beyond, 2 of them outside the region
    region = np.ones(beyond.shape, dtype=bool)
    region[0, 0, :2] = False
    assert beyond_share(beyond, region) == 6 / 30
    assert np.isnan(beyond_share(beyond, np.zeros_like(region)))
    assert unlike_healthy_limit({"scan/beyond_range_share": np.array([0.02, 0.03, 0.01])}) == 0.06
    assert unlike_healthy_limit({}) is None  # calibrations made before the share: no check


def test_score_marks_a_scan_unlike_the_healthy_heads(tiny_mri_model, tmp_path):
    """A head under a strong left-right shading lies beyond the healthy range in far more of its brain than
    any calibration head: ``unlike_healthy`` and a batch warning say so; a plain head of the same kind does not;
    a calibration without the stored shares gives no verdict (empty columns, no warning)."""
    import shutil

    import torch

    from medflowad.mri.model import load_mri_model
    from medflowad.mri.score import score_scans
    from medflowad.storage import read_tensors, write_tensors
    from tests.mri.conftest import brain_like, oblique_lps_affine, save_nifti

    x = np.linspace(-1, 1, 48)[:, None, None]
    scans = [save_nifti(tmp_path / "plain.nii.gz", brain_like(seed=22), oblique_lps_affine()),
             save_nifti(tmp_path / "shaded.nii.gz", (brain_like(seed=23) * np.exp(0.3 * x)).astype(np.int16),
                        oblique_lps_affine())]
    limit = 2 * load_mri_model(tiny_mri_model, "cpu").calibration["scan/beyond_range_share"].max()
    result = score_scans(scans, tiny_mri_model, tmp_path / "out", device="cpu", report=True)
    rows = {r["scan_id"]: r for r in result.rows}
    assert (tmp_path / "out" / "report.html").read_text().count("unlike healthy heads") == 1
    assert rows["plain"]["beyond_range_share"] < limit and rows["plain"]["unlike_healthy"] is False
    assert rows["shaded"]["beyond_range_share"] > limit and rows["shaded"]["unlike_healthy"] is True
    assert "shaded lies beyond the healthy range" in result.warning and "plain" not in result.warning
    header = (tmp_path / "out" / "scores.csv").read_text().splitlines()[0].split(",")
    assert {"beyond_range_share", "unlike_healthy"} <= set(header)

    older = tmp_path / "older"
    shutil.copytree(tiny_mri_model, older)
    stored = {k: v for k, v in read_tensors(older / "calibration.safetensors").items()
              if k != "scan/beyond_range_share"}
    write_tensors(older / "calibration.safetensors", {k: torch.as_tensor(v) for k, v in stored.items()})
    result = score_scans(scans[1:], older, tmp_path / "out_older", device="cpu")
    assert np.isnan(result.rows[0]["unlike_healthy"]) and "beyond the healthy range" not in (result.warning or "")


def test_a_calibration_scan_far_beyond_the_others_is_pointed_out():
    from medflowad.mri.normative import calibration_shares, limit_setter_note

    alike = {"a": 0.02, "b": 0.025, "c": 0.015, "e": 0.02}
    assert limit_setter_note(alike) is None
    note = limit_setter_note({**alike, "d": 0.2})
    assert note.startswith("d lies beyond the other healthy scans' range in 20.0 %")
    assert "median of the calibration scans 2.0 %" in note and "(40.0 %)" in note  # 2x its share
    assert limit_setter_note({"a": 0.01, "d": 0.2}) is None  # too few to tell the odd one out
    shares = {"scan/beyond_range_share": np.array([0.1, 0.2])}
    assert calibration_shares(shares, ["x", "y"]) == {"x": 0.1, "y": 0.2}
    assert calibration_shares(shares, ["x"]) == {} and calibration_shares({}, ["x"]) == {}
