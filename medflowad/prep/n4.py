"""N4 bias-field correction (SimpleITK) fitted on a domain set by the brain, not by the scan's grid.

N4 fits a B-spline field whose mesh spans the image it is given, and ``levels`` fitting levels each halve
the mesh spacing. Fitted on the whole scan, the field's smoothness therefore depends on the field of view
and the voxel size: the same IXI head corrected once as acquired (2 mm, 240 mm field of view) and once
skull-stripped and resampled to MNI at 1 mm (197 mm) came out up to 14 % apart in its upper white matter,
which the healthy range read as lesion (docs/results.md, "The same head skull-stripped in MNI space").
Here the field is fitted on the brain's bounding box widened ``DOMAIN_SCALE`` times about its centre (zero
outside the scan), binned to about ``FIT_MM`` voxels (the brain's mean in each bin), so one brain gets one
field whatever grid it comes on. The fitted field is interpolated back onto the scan's grid, held constant
beyond the domain.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk  # noqa: N813 (the library's own convention)

from medflowad.prep.registration import sitk_image

N4_VERSION = 2  # part of the cache keys of N4-corrected preparations (1: fitted on the whole scan, 4x shrunk)
FIT_MM = 8.0  # voxel size the field is fitted at (IXI's 2 mm scans were shrunk 4x before this module)
DOMAIN_SCALE = 1.4  # the domain: the brain's box widened 1.4x, about the field of view of a head scan
MIN_BIN_SHARE = 0.5  # a fitting voxel counts as brain where half of the scan's voxels in it are
# Scans with negative intensities in the brain (z-scored, or otherwise shifted) are moved so that the brain's 1st
# percentile lies at this share of its 99th, as in IXI's T1 heads (0.15-0.16): N4's model is multiplicative, and
# clipped at zero such a scan loses its darker half (40 % of a z-scored head's brain became 0 and failed registration).
DARK_TO_BRIGHT = 0.15


def fitting_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, stop) voxel indices of the fitting domain: the mask's bounding box widened ``DOMAIN_SCALE`` times
    about its centre; it may reach beyond the scan (padded with zeros)."""
    index = np.argwhere(mask)
    low, high = index.min(axis=0), index.max(axis=0) + 1
    pad = np.ceil((high - low) * (DOMAIN_SCALE - 1) / 2).astype(int)
    return low - pad, high + pad


def fitting_bins(affine: np.ndarray) -> list[int]:
    """Voxels per fitting bin along each axis of a scan with this affine."""
    return [max(1, round(FIT_MM / s)) for s in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)]


def made_positive(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    r"""``image`` clipped at zero or, when its 1st percentile :math:`p_1` inside ``mask`` is negative, shifted by
    :math:`s = (0.15\,p_{99} - p_1) / 0.85` first, so that :math:`p_1 + s = 0.15\,(p_{99} + s)`: a multiplicative
    field needs intensities above zero, and the scan's own zero is lost once it has been z-scored."""
    low, high = np.percentile(image[mask], [1, 99])
    if low >= 0:
        return np.maximum(image, 0)
    return np.maximum(image + (DARK_TO_BRIGHT * high - low) / (1 - DARK_TO_BRIGHT), 0)


def _crop(array: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    """``array[start:stop]`` per axis, zero where the box reaches beyond the array."""
    out = np.zeros(tuple(stop - start), dtype=array.dtype)
    inner_start, inner_stop = np.maximum(start, 0), np.minimum(stop, array.shape)
    source = tuple(slice(a, b) for a, b in zip(inner_start, inner_stop, strict=True))
    target = tuple(slice(a - s, b - s) for a, b, s in zip(inner_start, inner_stop, start, strict=True))
    out[target] = array[source]
    return out


def n4_correct(image: np.ndarray, affine: np.ndarray, mask: np.ndarray, levels: int = 3) -> np.ndarray:
    r"""``image`` (X, Y, Z) divided by the N4 bias field fitted inside ``mask`` in ``levels`` fitting levels (a
    scan with negative intensities in the brain comes back shifted by :func:`made_positive`'s offset; the
    preparation normalises by percentiles afterwards, which no shift changes).

    With :math:`b` the box of :func:`fitting_box` binned by :math:`f_i = \max(1, \mathrm{round}(8\,\mathrm{mm}
    / \Delta_i))` voxels per axis, N4 fits :math:`\log B` on the bins that are at least half brain (each the
    mean of its brain voxels); the corrected image is :math:`I / \exp(\log B)`, with :math:`\log B` linearly
    interpolated at the scan's voxels and extended as a constant beyond the box.
    """
    start, stop = fitting_box(mask)
    box_affine = np.asarray(affine, dtype=np.float64).copy()
    box_affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    inside = _crop(mask, start, stop).astype(np.float32)
    positive = made_positive(image, mask).astype(np.float32)
    values = _crop(positive, start, stop) * inside
    bins = fitting_bins(affine)
    brain_share = sitk.BinShrink(sitk_image(inside, box_affine), bins)
    brain_mean = sitk.BinShrink(sitk_image(values, box_affine), bins) / sitk.Maximum(brain_share, 1e-6)
    fit_region = sitk.Cast(brain_share >= MIN_BIN_SHARE, sitk.sitkUInt8)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([50] * (levels - 1) + [30] if levels > 1 else [50])
    corrector.Execute(brain_mean + 1e-3, fit_region)
    log_bias = corrector.GetLogBiasFieldAsImage(brain_mean)
    source = sitk_image(positive + 1e-3, affine)
    log_bias_here = sitk.Resample(log_bias, source, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32, True)
    corrected = source / sitk.Exp(log_bias_here)
    return sitk.GetArrayFromImage(corrected).transpose(2, 1, 0).astype(np.float32)


__all__ = ["DOMAIN_SCALE", "FIT_MM", "N4_VERSION", "fitting_bins", "fitting_box", "made_positive", "n4_correct"]
