"""Intensity landmark standardisation, checked against percentiles and interpolation computed by hand."""

import numpy as np
import pytest

from medflowad.mri.landmarks import LANDMARK_PERCENTILES, intensity_landmarks, standard_landmarks, standardise


def _brain(seed: int, shape=(6, 40, 40)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.gamma(4.0, 0.1, size=shape).astype(np.float32)
    region = np.zeros(shape, dtype=bool)
    region[:, 5:35, 5:35] = True
    return image * region, region


def test_landmarks_are_the_region_s_percentiles():
    image, region = _brain(0)
    image[~region] = 100.0  # outside the region: must not count
    assert np.allclose(intensity_landmarks(image, region), np.percentile(image[region], LANDMARK_PERCENTILES))
    assert np.allclose(standard_landmarks([image, 2 * image], [region, region]),
                       1.5 * np.percentile(image[region], LANDMARK_PERCENTILES))


def test_standardised_scan_has_the_standard_landmarks_and_is_zero_outside():
    image, region = _brain(1)
    standard = np.linspace(0.0, 1.0, len(LANDMARK_PERCENTILES)) ** 1.5
    out = standardise(image, region, standard)
    assert out.dtype == np.float32 and not out[~region].any()
    assert np.allclose(intensity_landmarks(out, region), standard, atol=2e-3)


def test_between_landmarks_it_interpolates_and_beyond_it_extends_the_end_segments():
    image, region = _brain(2)
    own = np.percentile(image[region], LANDMARK_PERCENTILES)
    standard = np.arange(len(own), dtype=np.float64)  # landmark k -> k
    bright = own[-1] + 3.0 * (own[-1] - own[-2])  # three end segments above the last landmark
    middle = 0.25 * own[4] + 0.75 * own[5]
    image[0, 10, 10], image[0, 10, 11] = bright, middle
    out = standardise(image, region, standard)
    own = np.percentile(image[region], LANDMARK_PERCENTILES)  # two voxels changed: take them again
    assert out[0, 10, 11] == pytest.approx(4 + (middle - own[4]) / (own[5] - own[4]), abs=1e-5)
    expected = standard[-1] + (bright - own[-1]) / (own[-1] - own[-2])  # slope of the last segment, 1 / width
    assert out[0, 10, 10] == pytest.approx(expected, rel=1e-5)
    assert out[0, 10, 10] > out[region].max() - 1e-6  # a voxel brighter than all others stays the brightest


def test_a_scan_and_its_rescaled_copy_standardise_alike():
    """Another scanner's gain and offset (a x + b, a > 0) leave nothing behind."""
    image, region = _brain(3)
    standard = standard_landmarks([image], [region])
    rescaled = (2.5 * image + 0.7) * region
    assert np.allclose(standardise(rescaled, region, standard), standardise(image, region, standard), atol=1e-5)


def test_standard_of_the_wrong_length_is_refused():
    image, region = _brain(4)
    with pytest.raises(ValueError, match="expected \\(11,\\)"):
        standardise(image, region, np.arange(5.0))
    with pytest.raises(ValueError, match="no voxels"):
        intensity_landmarks(image, np.zeros_like(region))
