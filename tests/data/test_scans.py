"""Intensity normalisation: a fixed window (CT in HU) against percentiles, checked by hand arithmetic."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medflowad.config import ConfigError
from medflowad.data.scans import (
    ScanPreprocessing,
    dark_background,
    display_to_volume,
    prepare_image_2d,
    prepare_scan,
    volume_to_display,
)
from medflowad.mri.config import load_mri_config


def _head_ct(shape=(64, 64, 8)) -> np.ndarray:
    """Air (-1000 HU), a 1000 HU skull ring, brain at 40 HU and a 60 HU region (a bleed, say) on the right."""
    x, y = np.meshgrid(np.arange(shape[0]) - 31.5, np.arange(shape[1]) - 31.5, indexing="ij")
    r = np.hypot(x, y)
    plane = np.full(shape[:2], -1000.0)
    plane[r < 28] = 1000.0
    plane[r < 24] = 40.0
    plane[(np.hypot(x - 10, y) < 5)] = 60.0
    return np.repeat(plane[:, :, None], shape[2], axis=2)


def _prepare(volume: np.ndarray, config: ScanPreprocessing, whole_brain: bool = False):
    """``whole_brain``: every voxel is given as brain (no automatic foreground, whose clean-up trims corners)."""
    scan = MetaTensor(torch.from_numpy(volume.astype(np.float32))[None], affine=torch.eye(4, dtype=torch.float64))
    brain = MetaTensor(torch.ones_like(scan.as_tensor()), affine=scan.affine) if whole_brain else None
    return prepare_scan(scan, config, brain_mask=brain)


def test_window_maps_hounsfield_units_to_fixed_grey_levels():
    volume = _head_ct()
    windowed = _prepare(volume, ScanPreprocessing(image_size=64, margin=0.0, intensity_window=(0.0, 80.0)))
    middle = windowed.slices[4, 0].numpy()
    # The crop spans the head (skull ring, 56 voxels), resized to 64: sample well inside each region.
    assert middle[32, 32] == round(40 / 80 * 255)    # brain: 128
    rows, cols = np.nonzero(middle == round(60 / 80 * 255))  # the 60 HU region: 191
    assert 60 <= len(rows) <= 110  # pi * 5^2 voxels, x (64/56)^2 by the resize
    assert abs(rows.mean() - 31.5) < 1 and cols.mean() < 24  # on the patient's right: the display's left
    assert middle[32, 2] == 255 and middle[0, 0] == 0  # bone saturates, air is black
    assert windowed.foreground[4][32, 32] and not windowed.foreground[4][0, 0]  # everything above 0 HU

    # Percentiles of the same head put the brain and the 60 HU region a few grey levels apart under the bone
    # (20 HU of 2000 in the foreground), where the window keeps them 63 apart.
    squeezed = _prepare(volume, ScanPreprocessing(image_size=64, margin=0.0)).slices[4, 0].numpy().astype(int)
    bleed = (int(rows.mean()), int(cols.mean()))
    assert abs(squeezed[bleed] - squeezed[32, 32]) < 10 and int(middle[bleed]) - int(middle[32, 32]) == 63


def test_window_is_not_applied_to_pictures_and_is_validated():
    picture = np.zeros((40, 40), np.float32)
    picture[8:32, 8:32] = 200.0
    picture[14:20, 14:20] = 100.0
    config = ScanPreprocessing(image_size=32, min_foreground=0.05)
    windowed = ScanPreprocessing(image_size=32, min_foreground=0.05, intensity_window=(0.0, 80.0))
    assert torch.equal(prepare_image_2d(picture, config), prepare_image_2d(picture, windowed))
    with pytest.raises(ConfigError, match="intensity_window must be"):
        ScanPreprocessing.from_dict({"intensity_window": [80, 0]})
    # standard space reads the brain's percentiles; a window there would be silently ignored, so it is refused
    with pytest.raises(ConfigError, match="intensity_window applies to native space only"):
        ScanPreprocessing.from_dict({"intensity_window": [0, 80], "space": "standard"})
    with pytest.raises(ConfigError, match="intensity_window applies to native space only"):
        load_mri_config("ct_cpu").preprocessing.overridden(space="standard")
    assert load_mri_config("ct_cpu").preprocessing.intensity_window == (0.0, 80.0)
    assert load_mri_config("mri_cpu").preprocessing.intensity_window is None


def test_non_finite_voxels_count_as_background():
    volume = _head_ct()
    config = ScanPreprocessing(image_size=64, margin=0.0, intensity_window=(0.0, 80.0))
    clean = volume.copy()
    clean[:4] = 0.0
    broken = volume.copy()
    broken[:2], broken[2:4] = np.nan, np.inf
    assert torch.equal(_prepare(broken, config).slices, _prepare(clean, config).slices)


def test_z_scored_scan_gets_the_mask_and_slices_of_the_original():
    from tests.mri.conftest import brain_like

    volume = brain_like(shape=(40, 44, 6), seed=3).astype(np.float64)
    volume[10:14, 12:16, 2:4] = 40.0  # a dark spot (CSF, say): below the brain's mean, above the background
    brain = volume > 0
    z_scored = (volume - volume[brain].mean()) / volume[brain].std()  # the background becomes about -5
    config = ScanPreprocessing(image_size=32, margin=0.0, min_foreground=0.05)
    original, shifted = _prepare(volume, config), _prepare(z_scored, config)
    assert (z_scored[brain] < 0).mean() > 0.3  # half the brain is negative: a mask of 'positive voxels' breaks
    np.testing.assert_array_equal(shifted.foreground, original.foreground)
    assert original.foreground.mean() > 0.3
    difference = shifted.slices.numpy().astype(int) - original.slices.numpy().astype(int)
    assert np.abs(difference).max() <= 1  # the same image up to float rounding before quantisation


def test_scan_z_scored_inside_its_brain_with_a_zero_background_gets_the_mask_and_slices_of_the_original():
    """Public skull-stripped data is often z-scored inside the brain with the outside left at 0, about the brain's
    mean: the automatic foreground took that background for tissue (the whole volume) until dark_background set it
    to the scan's minimum. Exact zeros inside the tissue (water in CT's Hounsfield units) are not background."""
    from tests.mri.conftest import brain_like

    volume = brain_like(shape=(40, 44, 6), seed=3).astype(np.float64)
    volume[10:14, 12:16, 2:4] = 40.0
    brain = volume > 0
    z_scored = np.where(brain, (volume - volume[brain].mean()) / volume[brain].std(), 0.0)
    config = ScanPreprocessing(image_size=32, margin=0.0, min_foreground=0.05)
    original, shifted = _prepare(volume, config), _prepare(z_scored, config)
    np.testing.assert_array_equal(shifted.foreground, original.foreground)
    assert original.foreground.mean() < 0.9  # not the whole field of view
    difference = shifted.slices.numpy().astype(int) - original.slices.numpy().astype(int)
    assert np.abs(difference).max() <= 1

    ct_like = np.full((20, 20, 4), -1000.0)
    ct_like[4:16, 4:16] = 40.0
    ct_like[8:10, 8:10] = 0.0  # water inside the head
    np.testing.assert_array_equal(dark_background(ct_like), ct_like)
    np.testing.assert_array_equal(dark_background(volume), volume)  # no negative values: as it is


def test_unclipped_image_keeps_what_the_clip_cuts():
    """Bone at 1000 HU under a 0-80 HU window: the model's slices saturate at 255, the unclipped image keeps
    1000 / 80 = 12.5 there, and away from the bone both agree with the window's arithmetic."""
    from scipy import ndimage

    from medflowad.mri.analysis import intensity_map, unclipped_intensity_map

    prepared = _prepare(_head_ct(), ScanPreprocessing(image_size=64, margin=0.0, intensity_window=(0.0, 80.0)))
    unclipped = prepared.unclipped
    assert unclipped.shape == prepared.foreground.shape and unclipped.dtype == np.float32
    assert np.isclose(unclipped.max(), 1000 / 80, rtol=1e-4) and prepared.slices.max() == 255
    assert np.isclose(unclipped[4, 32, 32], 40 / 80, atol=1e-5)  # brain
    # where no bone is near, the clip changes nothing: the same grey levels up to rounding
    calm = ndimage.maximum_filter(unclipped, size=(1, 3, 3)) <= 1.0
    slices = prepared.slices[:, 0].numpy().astype(int)
    assert calm.mean() > 0.5
    assert np.abs(np.round(unclipped * 255)[calm] - slices[calm]).max() <= 1
    assert np.array_equal(unclipped_intensity_map(prepared), unclipped * prepared.foreground)
    prepared.unclipped = None  # a preparation that does not keep it: the clipped image
    assert np.array_equal(unclipped_intensity_map(prepared), intensity_map(prepared))


def test_maps_resampled_together_equal_maps_resampled_alone():
    from medflowad.data.scans import to_native

    prepared = _prepare(_head_ct(), ScanPreprocessing(image_size=32, margin=0.1))
    rng = np.random.default_rng(2)
    maps = rng.normal(size=(3, *prepared.foreground.shape)).astype(np.float32)
    together = to_native(maps, prepared)
    assert together.shape == (3, *prepared.native.shape[1:])
    for k in range(3):
        assert np.array_equal(together[k], to_native(maps[k], prepared))


def test_scored_region_is_the_foreground_of_kept_slices_only():
    volume = _head_ct()
    volume[:, :, :2] = -1000.0  # two slices of air: no foreground, not kept
    prepared = _prepare(volume, ScanPreprocessing(image_size=64, margin=0.0, intensity_window=(0.0, 80.0)))
    assert prepared.keep.sum() == 6 and prepared.scored.shape == prepared.foreground.shape
    for z in range(prepared.num_slices):
        expected = prepared.foreground[z] if prepared.keep[z] else np.zeros_like(prepared.foreground[z])
        assert np.array_equal(prepared.scored[z], expected)
    kept = int(np.argmax(prepared.keep))
    prepared.foreground[kept, 0, 0] = True
    assert prepared.scored[kept, 0, 0]  # computed from the current foreground, never a stale copy


def _brain_with_lesion(lesion_value: float | None) -> np.ndarray:
    """A 32x32x4 'brain' whose healthy voxels run 100-227 in a seeded shuffle, and optionally a bright lesion of
    a sixteenth of the voxels (rows 0-1, about an LGG lesion's 6 % of the brain) at ``lesion_value``."""
    values = np.random.default_rng(0).permutation(np.linspace(100.0, 227.0, 32 * 32 * 4)).reshape(32, 32, 4)
    if lesion_value is not None:
        values[:2] = lesion_value
    return values


def test_upper_level_puts_the_brain_s_median_at_a_fixed_level_whatever_the_lesion():
    """percentiles (0, 50) with upper_level 0.4: 0.4 (v - min) / (median - min), by hand; a large bright lesion
    moves a percentile normalisation's healthy voxels (it holds the upper percentile) far more than this."""
    config = ScanPreprocessing(image_size=32, margin=0.0, min_foreground=0.0, percentiles=(0.0, 50.0),
                               upper_level=0.4)
    usual = ScanPreprocessing(image_size=32, margin=0.0, min_foreground=0.0)
    healthy = _brain_with_lesion(None)
    lesioned = _brain_with_lesion(600.0)
    for volume in (healthy, lesioned):
        low, median = volume.min(), np.median(volume)
        expected = 0.4 * (volume - low) / (median - low)
        prepared = _prepare(volume, config, whole_brain=True)
        assert prepared.foreground.all()
        assert np.allclose(display_to_volume(prepared.unclipped), expected, atol=1e-5)
        assert np.array_equal(prepared.slices[:, 0].numpy(),
                              np.round(np.minimum(volume_to_display(expected), 1.0) * 255).astype(np.uint8))
    rows = slice(2, None)  # the healthy voxels of both volumes, equal in value
    shift = np.abs(display_to_volume(_prepare(healthy, config, whole_brain=True).unclipped)[rows]
                   - display_to_volume(_prepare(lesioned, config, whole_brain=True).unclipped)[rows]).max()
    shift_usual = np.abs(display_to_volume(_prepare(healthy, usual, whole_brain=True).unclipped)[rows]
                         - display_to_volume(_prepare(lesioned, usual, whole_brain=True).unclipped)[rows]).max()
    # the median moves by the lesion's share only: 0.4 x 127/63.5 x 6 % ~ 0.05 at the brightest healthy voxel
    assert shift < 0.06 and shift_usual > 0.5, (shift, shift_usual)


@pytest.mark.parametrize("level", [0.0, -0.4, 1.5])
def test_upper_level_outside_zero_to_one_is_refused(level):
    with pytest.raises(ConfigError, match="upper_level must lie in"):
        ScanPreprocessing.from_dict({"upper_level": level})
