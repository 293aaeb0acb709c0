"""Simulated subjects from the MNI template: geometry of the reduced grid and the painted lesions."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medflowad.data.phantoms import TEMPLATE_FILES, load_template, simulate_subject

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "sample_data" / "mni_icbm152"


@pytest.fixture(scope="module")
def template():
    return load_template(TEMPLATE_DIR)


def test_reduced_voxel_sits_at_the_centre_of_its_fine_block(template):
    fine = nib.load(str(TEMPLATE_DIR / TEMPLATE_FILES["t1"]))
    index = np.array([10, 20, 30])
    block = np.stack(np.meshgrid(*[2 * i + np.arange(2) for i in index], indexing="ij"), -1).reshape(-1, 3)
    fine_world = nib.affines.apply_affine(fine.affine, block).mean(axis=0)
    np.testing.assert_allclose(nib.affines.apply_affine(template.affine, index), fine_world)
    data = np.asarray(fine.dataobj, dtype=np.float64) / 255
    expected = data[block[:, 0], block[:, 1], block[:, 2]].mean()
    assert template.t1[tuple(index)] == pytest.approx(expected, abs=1e-6)


def test_subjects_differ_and_are_seeded(template):
    a, b = simulate_subject(template, 1), simulate_subject(template, 2)
    assert np.abs(a.t1 - b.t1).mean() > 0.01
    np.testing.assert_array_equal(simulate_subject(template, 1).t1, a.t1)
