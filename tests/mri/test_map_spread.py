"""How per-location flow contributions become pixels: nearest blocks or bilinear between block centres."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from medflowad.config import ConfigError
from medflowad.data.readers import load_scan
from medflowad.data.scans import prepare_scan
from medflowad.mri.analysis import analyse_scan, spread_to_pixels
from medflowad.mri.config import MriConfig
from medflowad.mri.model import analyse, load_mri_model
from tests.mri.conftest import brain_like, oblique_lps_affine, save_nifti


def bilinear_by_hand(coarse: np.ndarray, size: int) -> np.ndarray:
    """Output pixel j's centre lies at (j + 0.5) / f - 0.5 in location coordinates, clamped to the outermost
    centres; its value interpolates the two (four in 2D) nearest locations linearly, then / f^2."""
    n, h, w = coarse.shape
    f = size // h
    out = np.zeros((n, size, size))
    for y in range(size):
        for x in range(size):
            u = min(max((y + 0.5) / f - 0.5, 0.0), h - 1)
            v = min(max((x + 0.5) / f - 0.5, 0.0), w - 1)
            y0, x0 = int(np.floor(u)), int(np.floor(v))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            a, b = u - y0, v - x0
            out[:, y, x] = ((1 - a) * (1 - b) * coarse[:, y0, x0] + (1 - a) * b * coarse[:, y0, x1]
                            + a * (1 - b) * coarse[:, y1, x0] + a * b * coarse[:, y1, x1])
    return out / f**2


@pytest.mark.parametrize("locations", [16, 8, 4])
def test_bilinear_spread_matches_interpolation_by_hand(locations):
    coarse = np.random.default_rng(locations).normal(size=(2, locations, locations))
    assert np.allclose(spread_to_pixels([coarse], 32, "bilinear"), bilinear_by_hand(coarse, 32), atol=1e-12)


def test_both_spreads_keep_a_location_s_value_and_a_constant_map():
    size, f = 32, 4
    hot = np.zeros((1, size // f, size // f))
    hot[0, 3, 4] = 7.0  # away from the edges: bilinear keeps the whole mass
    for mode in ("nearest", "bilinear"):
        assert spread_to_pixels([hot], size, mode).sum() == pytest.approx(7.0, abs=1e-12), mode
        constant = spread_to_pixels([np.full((1, 8, 8), 3.0)], size, mode)
        assert np.allclose(constant, 3.0 / f**2), mode
    nearest, bilinear = (spread_to_pixels([hot], size, m)[0] for m in ("nearest", "bilinear"))
    assert np.count_nonzero(nearest) == f * f  # one block
    assert np.count_nonzero(bilinear) > f * f  # reaches into the neighbouring blocks, peaks at the centre
    assert bilinear.max() < nearest.max()
    with pytest.raises(ValueError, match="map spread must be one of"):
        spread_to_pixels([hot], size, "cubic")


def test_model_maps_follow_the_config_s_spread(tiny_mri_model, tmp_path):
    model = load_mri_model(tiny_mri_model, "cpu")
    assert model.config.map_spread == "nearest"  # the fixture's config predates the key: its calibration's maps
    prepared = prepare_scan(load_scan(save_nifti(tmp_path / "s.nii.gz", brain_like(seed=3), oblique_lps_affine())),
                            model.config.preprocessing)
    scored = np.nonzero(prepared.keep)[0]
    nearest = analyse(model, prepared).maps["llr_c2"][scored]
    bilinear_model = dataclasses.replace(model, config=dataclasses.replace(model.config, map_spread="bilinear"))
    bilinear = analyse(bilinear_model, prepared).maps["llr_c2"][scored]
    inside = prepared.foreground[scored]
    assert not np.allclose(nearest, bilinear)
    # the coarsest scale's 4 x 4 blocks (32-pixel slices, 2 scales) are constant in the nearest map only
    block = (slice(None), slice(12, 16), slice(12, 16))
    assert inside[block].all()
    assert np.ptp(nearest[block], axis=(1, 2)).max() < 1e-6 < np.ptp(bilinear[block], axis=(1, 2)).min()
    assert np.allclose(bilinear, analyse_scan(prepared, model.in_model, model.general_model,
                                              spread="bilinear").maps["llr_c2"][scored])


def test_unknown_map_spread_is_refused():
    with pytest.raises(ConfigError, match="map_spread must be one of nearest, bilinear"):
        dataclasses.replace(MriConfig(), map_spread="cubic").validate()
