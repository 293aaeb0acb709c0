"""N4 bias-field correction in the preparation: it takes a smooth field out, and its fitting levels are a
setting that is checked and that keys the cache."""

import numpy as np
import pytest

from medflowad.config import ConfigError
from medflowad.data.scans import ScanPreprocessing
from medflowad.prep.stage import _key_settings, n4_correct


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
    assert "n4_levels" not in usual  # caches made before the setting keep their keys
    assert _key_settings(ScanPreprocessing(n4=True, n4_levels=3)) == usual
    assert _key_settings(ScanPreprocessing(n4=True, n4_levels=2)) == {**usual, "n4_levels": 2}
    assert "n4_levels" not in _key_settings(ScanPreprocessing(n4=False, n4_levels=2))
