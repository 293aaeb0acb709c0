"""Normative maps: per-location centre and spread from healthy calibration scans, and their use in score."""

import nibabel as nib
import numpy as np

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
