"""N4 bias-field correction in the preparation: it takes a smooth field out, the same whatever grid and field of
view the brain comes on, keeps a z-scored brain whole, and its fitting levels and version key the cache."""

import numpy as np
import pytest

from medflowad.config import ConfigError
from medflowad.data.scans import ScanPreprocessing
from medflowad.prep.n4 import DARK_TO_BRIGHT, N4_VERSION, made_positive, n4_correct
from medflowad.prep.stage import _key_settings


def _shaded_sphere(strength: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A uniform 'brain' (a ball, radius 40 mm, 2 mm voxels) under a left-right field exp(strength * x / 40)."""
    grid = np.indices((48, 48, 48)).astype(np.float32) - 23.5
    mask = (grid ** 2).sum(axis=0) < 20 ** 2
    rng = np.random.default_rng(0)
    image = (100.0 + rng.normal(0, 1, mask.shape)) * np.exp(strength * grid[0] / 20) * mask
    return image.astype(np.float32), mask, np.diag([2.0, 2.0, 2.0, 1.0])


def _side_ratio(image: np.ndarray, mask: np.ndarray) -> float:
    right, left = mask.copy(), mask.copy()
    right[:24], left[24:] = False, False
    return float(image[right].mean() / image[left].mean())


@pytest.mark.parametrize("levels", [2, 3])
def test_n4_takes_a_smooth_field_out(levels):
    image, mask, affine = _shaded_sphere(0.2)
    before = _side_ratio(image, mask)
    assert before > 1.14  # the field by construction: about exp(0.2 * 0.75) = 1.16 between the halves
    after = _side_ratio(n4_correct(image, affine, mask, levels), mask)
    assert abs(np.log(after)) < 0.3 * abs(np.log(before)), (before, after)


def test_n4_levels_are_checked_and_key_the_cache():
    with pytest.raises(ConfigError, match="n4_levels must be 1 to 4, got 0"):
        ScanPreprocessing.from_dict({"n4_levels": 0})
    with pytest.raises(ConfigError, match="n4_levels must be 1 to 4, got 5"):  # every way a config is made
        ScanPreprocessing().overridden(n4_levels=5)
    usual = _key_settings(ScanPreprocessing(n4=True))
    assert "n4_levels" not in usual  # the usual schedule adds nothing to the key
    assert usual["n4_version"] == N4_VERSION  # a change of the fit (medflowad.prep.n4) rekeys every N4 cache
    assert "n4_version" not in _key_settings(ScanPreprocessing(n4=False))
    assert _key_settings(ScanPreprocessing(n4=True, n4_levels=3)) == usual
    assert _key_settings(ScanPreprocessing(n4=True, n4_levels=2)) == {**usual, "n4_levels": 2}
    assert "n4_levels" not in _key_settings(ScanPreprocessing(n4=False, n4_levels=2))


def _padded(array: np.ndarray, before: tuple[int, int, int], after: tuple[int, int, int]) -> np.ndarray:
    return np.pad(array, list(zip(before, after, strict=True)))


def test_n4_field_does_not_depend_on_the_field_of_view():
    """The same head in a wider field of view (zeros added on three sides, the affine moved so every voxel keeps
    its world position) is corrected exactly as before: the field's domain comes from the brain. Fitted on the
    whole scan, as before medflowad.prep.n4, the wider view gave a smoother field (differences of about 2 %)."""
    image, mask, affine = _shaded_sphere(0.2)
    before, after = (30, 0, 10), (6, 12, 0)
    wider_affine = affine.copy()
    wider_affine[:3, 3] -= affine[:3, :3] @ np.array(before, dtype=float)
    wider = n4_correct(_padded(image, before, after), wider_affine, _padded(mask, before, after))
    same_voxels = wider[30:78, 0:48, 10:58]
    np.testing.assert_allclose(same_voxels[mask], n4_correct(image, affine, mask)[mask], rtol=1e-5)


def test_n4_field_does_not_depend_on_the_voxel_size():
    """The shaded ball sampled at 1 mm and at 2 mm: the fields N4 takes out agree within 1 % inside the ball (2 mm
    voxels against the mean of the eight 1 mm voxels in each)."""
    coarse, coarse_mask, coarse_affine = _shaded_sphere(0.2)
    grid = (np.indices((96, 96, 96)).astype(np.float32) - 47.5) / 2  # 1 mm voxels, in units of 2 mm
    fine_mask = (grid ** 2).sum(axis=0) < 20 ** 2
    fine = (100.0 * np.exp(0.2 * grid[0] / 20) * fine_mask).astype(np.float32)
    fine_field = fine / np.maximum(n4_correct(fine, np.diag([1.0, 1.0, 1.0, 1.0]), fine_mask), 1e-6)
    coarse_field = coarse / np.maximum(n4_correct(coarse, coarse_affine, coarse_mask), 1e-6)
    fine_in_coarse = fine_field.reshape(48, 2, 48, 2, 48, 2).mean(axis=(1, 3, 5))
    inner = coarse_mask & fine_mask.reshape(48, 2, 48, 2, 48, 2).all(axis=(1, 3, 5))
    ratio = fine_in_coarse[inner] / coarse_field[inner]
    ratio /= np.median(ratio)  # N4's field is defined up to a constant
    assert np.abs(np.log(ratio)).max() < 0.01, np.abs(np.log(ratio)).max()


def test_n4_corrects_a_z_scored_brain_instead_of_clipping_its_darker_half():
    """A z-scored scan has negative intensities in half its brain: clipped at zero (as N4's multiplicative model
    was first fed), that half came out at the floor (1e-3 over the field), hundreds of times darker than the
    rest. made_positive shifts the scan instead (the brain's 1st percentile at DARK_TO_BRIGHT of its 99th), so
    no brain voxel is floored and N4 flattens the field it sees in the shifted scan. (A z-scored scan's own zero
    is lost, so the field of the scan before z-scoring cannot be recovered exactly: here the ball's halves go
    from 1.97 apart after the shift to 1.20.)"""
    image, mask, affine = _shaded_sphere(0.2)
    z_scored = np.where(mask, (image - image[mask].mean()) / image[mask].std(), 0.0).astype(np.float32)
    assert (z_scored[mask] < 0).mean() > 0.4
    shifted = made_positive(z_scored, mask)
    low, high = np.percentile(shifted[mask], [1, 99])
    assert abs(low / high - DARK_TO_BRIGHT) < 1e-6
    np.testing.assert_allclose(shifted[mask] - z_scored[mask], shifted[mask][0] - z_scored[mask][0], atol=1e-5)
    corrected = n4_correct(z_scored, affine, mask)
    floored = corrected[mask] < 0.01 * np.percentile(corrected[mask], 99)
    assert floored.mean() < 0.001, floored.mean()  # clipped at zero: 0.5
    before = _side_ratio(shifted, mask)
    assert abs(np.log(_side_ratio(corrected, mask))) < 0.3 * abs(np.log(before))


def test_upper_level_keys_standard_caches_only_when_it_is_not_one():
    usual = _key_settings(ScanPreprocessing(space="standard"))
    assert "upper_level" not in usual  # caches made before the setting keep their keys
    assert _key_settings(ScanPreprocessing(space="standard", upper_level=0.4)) == {**usual, "upper_level": 0.4}
    # the native cache holds no normalised image, so the level does not key it
    assert _key_settings(ScanPreprocessing(upper_level=0.4)) == _key_settings(ScanPreprocessing())
