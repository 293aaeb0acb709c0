"""The registration template (MNI ICBM152 2009a, shipped at 2 mm) and the standard grid models see.

The standard grid is fixed in template space: an in-plane square of ``STANDARD_SIDE_MM`` centred on the
template brain, cut into ``image_size`` x ``image_size`` pixels, and axial slices every ``slice_mm``
from just below to just above the template brain. Slice k and pixel (u, v) therefore mean the same brain
location in every prepared scan.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import nibabel as nib
import numpy as np

TEMPLATE_FILE = "mni_icbm152_t1_2mm.nii.gz"
STANDARD_SIDE_MM = 192.0  # covers the template brain (145 x 181 mm in-plane) with a margin


@dataclass(frozen=True)
class Template:
    image: np.ndarray  # float32 (X, Y, Z), 0-255, zero outside the brain
    affine: np.ndarray  # RAS

    @property
    def brain(self) -> np.ndarray:
        return self.image > 0


@functools.cache
def load_template() -> Template:
    """The packaged MNI template (see medflowad/templates/LICENSE.txt)."""
    path = resources.files("medflowad") / "templates" / TEMPLATE_FILE
    image = nib.load(str(path))
    return Template(np.asarray(image.dataobj, dtype=np.float32), image.affine.astype(np.float64))


@functools.cache  # every standard-grid call needs it: computed once per process
def brain_bounds() -> tuple[np.ndarray, np.ndarray]:
    """World (RAS mm) corners of the template brain's bounding box: (lowest, highest)."""
    template = load_template()
    index = np.argwhere(template.brain)
    world = nib.affines.apply_affine(template.affine, np.array([index.min(axis=0), index.max(axis=0)]))
    return world.min(axis=0), world.max(axis=0)


def standard_grid(image_size: int, slice_mm: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(RAS affine, shape) of the standard grid for ``image_size`` pixels a side and ``slice_mm`` slices."""
    low, high = brain_bounds()
    pixel = STANDARD_SIDE_MM / image_size
    centre = (low + high) / 2
    slices = int(np.ceil((high[2] - low[2]) / slice_mm)) + 3  # one slice of margin below, one above
    affine = np.diag([pixel, pixel, slice_mm, 1.0])
    affine[:3, 3] = [centre[0] - (image_size - 1) / 2 * pixel, centre[1] - (image_size - 1) / 2 * pixel,
                     centre[2] - (slices - 1) / 2 * slice_mm]
    return affine, (image_size, image_size, slices)
