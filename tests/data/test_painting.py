"""Painted lesions (PROTOCOL part D) on the real anatomy of the MNI template, checked against its own
tissue probability maps and against geometry computed here, not by the painter."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medflowad.data.painting import EDGE_MM, paint_lesions, tissue_classes
from medflowad.data.phantoms import load_template

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def head():
    template = load_template(ROOT / "sample_data" / "mni_icbm152")
    return template, template.t1 > 0.02


def test_same_seed_same_lesions_other_seed_other_ones(head):
    template, brain = head
    a, mask_a, lesions_a = paint_lesions(template.t1, template.affine, brain, seed=3)
    b, mask_b, lesions_b = paint_lesions(template.t1, template.affine, brain, seed=3)
    _, mask_c, _ = paint_lesions(template.t1, template.affine, brain, seed=4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(mask_a, mask_b)
    assert lesions_a == lesions_b
    assert not np.array_equal(mask_a, mask_c)


@pytest.mark.parametrize("seed", [0, 1, 2, 5])
def test_lesions_lie_in_the_tissue_they_name_with_the_contrast_they_name(head, seed):
    template, brain = head
    painted, mask, lesions = paint_lesions(template.t1, template.affine, brain, seed=seed, count=2)
    assert mask.any() and not (mask.astype(bool) & ~brain).any()
    white = template.t1[template.wm > 0.9].mean()
    grey = template.t1[template.gm > 0.6].mean()
    components, _ = ndimage.label(mask)
    for lesion in lesions:
        centre = lesion.centre_voxel
        probabilities = {"grey": template.gm[centre], "white": template.wm[centre]}
        other = "grey" if lesion.tissue == "white" else "white"
        assert probabilities[lesion.tissue] > probabilities[other], lesion  # the template's own maps agree
        assert 10.0 <= lesion.diameter_mm <= 25.0
        inside = components == components[centre]
        if lesion.kind == "hyper":
            assert np.median(painted[inside]) > white
        else:
            assert np.median(painted[inside]) < grey


def test_lesion_volume_matches_the_ellipsoid_and_the_world_centre_the_affine(head):
    template, brain = head
    _, mask, (lesion,) = paint_lesions(template.t1, template.affine, brain, seed=11, count=1)
    voxel_mm3 = abs(np.linalg.det(template.affine[:3, :3]))
    # the mean radius is fixed, the axes vary by at most 20 %: the volume is that of the mean sphere
    # to within (0.8 * 1.2 * 1.0)-ish factors; the half-weight surface is the ellipsoid itself
    sphere = 4 / 3 * np.pi * (lesion.diameter_mm / 2) ** 3
    assert 0.6 * sphere < mask.sum() * voxel_mm3 < 1.25 * sphere
    expected = template.affine @ np.append(lesion.centre_voxel, 1.0)
    np.testing.assert_allclose(lesion.centre_mm, expected[:3])
    assert lesion.voxels == mask.sum()


def test_voxels_beyond_the_edge_keep_their_values_exactly(head):
    template, brain = head
    painted, mask, _ = paint_lesions(template.t1, template.affine, brain, seed=7)
    spacing = np.abs(np.diag(template.affine)[:3])
    far = ndimage.distance_transform_edt(~mask.astype(bool), sampling=spacing) > 4 * EDGE_MM
    np.testing.assert_array_equal(painted[far], template.t1[far])


def test_tissue_classes_order_by_brightness(head):
    template, brain = head
    labels, means = tissue_classes(template.t1, brain)
    assert means["csf"] < means["grey"] < means["white"]
    assert (labels[~brain] == 0).all()
    # most voxels the template calls white matter are in the brightest class
    assert (labels[template.wm > 0.9] == 3).mean() > 0.9


def test_bad_inputs_are_refused_with_the_reason(head):
    template, brain = head
    with pytest.raises(ValueError, match="same shape"):
        paint_lesions(template.t1, template.affine, brain[:-1], seed=0)
    with pytest.raises(ValueError, match="kinds"):
        paint_lesions(template.t1, template.affine, brain, seed=0, kinds=("ring",))
    with pytest.raises(ValueError, match="too few"):
        paint_lesions(template.t1, template.affine, np.zeros_like(brain), seed=0)


def test_linear_bias_field_by_hand(tmp_path):
    """Voxel (i, j, k) of an affine with 2 mm voxels and origin -100 mm lies at x = 2 i - 100: the field is
    1 + s * clip(x / 70, -1, 1), checked at hand-picked voxels, and bias_scan_file multiplies by it."""
    from medflowad.data.painting import bias_scan_file, linear_bias_field

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = -100.0
    field = linear_bias_field((101, 3, 2), affine, 0.2)
    for i, expected in ((0, 0.8), (15, 0.8), (50, 1.0), (85, 1.2), (100, 1.2), (60, 1 + 0.2 * 20 / 70)):
        assert field[i, 1, 1] == pytest.approx(expected, abs=1e-6), i
    data = np.arange(101 * 3 * 2, dtype=np.float32).reshape(101, 3, 2)
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "scan.nii.gz"))
    written = nib.load(str(bias_scan_file(tmp_path / "scan.nii.gz", tmp_path / "biased.nii.gz", 0.2)))
    np.testing.assert_allclose(np.asarray(written.dataobj), data * field, rtol=1e-6)
    np.testing.assert_array_equal(written.affine, affine)
