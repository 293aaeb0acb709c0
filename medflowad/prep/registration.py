"""Affine registration to the template (SimpleITK) and resampling through world coordinates.

Conventions. Every affine here is a 4x4 matrix in RAS millimetres, as nibabel and MONAI use. A
registration result is ``template_to_scan``: it maps a point of the template's world to the same
anatomical point in the scan's world (ITK's fixed-to-moving direction). ITK itself works in LPS, so a
matrix M_lps of ITK becomes F M_lps F with F = diag(-1, -1, 1, 1) (F is its own inverse).

Resampling (:func:`resample`) pulls values: each target voxel's centre goes target index -> target world
-> source world (through ``target_to_source``) -> source index, where the source is interpolated. One
matrix does it all, so oblique, flipped (LPS-stored) and anisotropic grids need no special handling.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk  # noqa: N813 (the library's own convention)
from scipy import ndimage

from medflowad.data.readers import LPS_TO_RAS

TEMPLATE_MM = 2.0  # voxel size of the packaged template
SAMPLING_SEED = 20240  # Mattes MI draws random samples: a fixed seed makes registration repeatable


def sitk_image(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """(X, Y, Z) array with a RAS affine -> SimpleITK image in ITK's LPS physical space.

    The affine's columns give spacing (their lengths) and direction (their unit vectors); an affine with
    shear has no exact ITK form, and its direction is orthonormalised (polar decomposition) instead.
    """
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    u, _, vt = np.linalg.svd(direction)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array, dtype=np.float32).transpose(2, 1, 0)))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((u @ vt).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    return image


def itk_to_ras(transform: sitk.Transform) -> np.ndarray:
    """A SimpleITK affine-family transform (fixed LPS point -> moving LPS point) as a 4x4 RAS matrix."""
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(transform.GetMatrix())
    affine.SetTranslation(transform.GetTranslation())
    affine.SetCenter(transform.GetCenter())
    matrix = np.array(affine.GetMatrix(), dtype=np.float64).reshape(3, 3)
    center = np.array(affine.GetCenter(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = np.array(affine.GetTranslation()) + center - matrix @ center
    return LPS_TO_RAS @ lps @ LPS_TO_RAS


def ras_to_itk(matrix: np.ndarray) -> sitk.AffineTransform:
    """Inverse of :func:`itk_to_ras`: a 4x4 RAS matrix as an ITK AffineTransform (LPS, centre 0)."""
    lps = LPS_TO_RAS @ np.asarray(matrix, dtype=np.float64) @ LPS_TO_RAS
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(lps[:3, :3].ravel().tolist())
    transform.SetTranslation(lps[:3, 3].tolist())
    return transform


def _run_stage(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, shrink: list[int],
               smooth: list[float], iterations: int) -> sitk.Transform:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.25, SAMPLING_SEED)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=iterations,
                                                    relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel(smooth)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(initial, inPlace=False)
    return method.Execute(fixed, moving).GetNthTransform(0)  # Execute wraps the optimised transform in a composite


def register_affine(template: np.ndarray, template_affine: np.ndarray, brain: np.ndarray,
                    brain_affine: np.ndarray) -> np.ndarray:
    """12-parameter affine registration of a brain-extracted scan to a brain-extracted template.

    Mattes mutual information (so any MR contrast registers to the T1 template), started from the
    centres of mass, then a similarity stage (rotation, translation, one scale) and a full affine stage,
    each coarse to fine. Returns ``template_to_scan`` (4x4, RAS; see the module's conventions).
    """
    fixed = sitk_image(template, template_affine)
    moving = sitk_image(brain, brain_affine)
    # The template is 2 mm: a finer scan is averaged down to about that first (a 1 mm volume registers ~3x faster).
    shrink = [max(1, round(TEMPLATE_MM / spacing)) for spacing in moving.GetSpacing()]
    if max(shrink) > 1:
        moving = sitk.BinShrink(moving, shrink)
    start = sitk.CenteredTransformInitializer(fixed, moving, sitk.Similarity3DTransform(),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS)
    similarity = _run_stage(fixed, moving, start, [4, 2], [2.0, 1.0], 150)
    initial = sitk.AffineTransform(3)
    initial.SetMatrix(similarity.GetMatrix())
    initial.SetTranslation(similarity.GetTranslation())
    initial.SetCenter(similarity.GetCenter())
    return itk_to_ras(_run_stage(fixed, moving, initial, [2, 1], [1.0, 0.0], 150))


def supersampling(target_affine: np.ndarray, source_affine: np.ndarray, most: int = 4) -> int:
    """Samples per target voxel side so that a coarser target averages the source instead of aliasing it."""
    target = np.linalg.norm(np.asarray(target_affine)[:3, :3], axis=0).min()
    source = np.linalg.norm(np.asarray(source_affine)[:3, :3], axis=0).min()
    return int(min(most, max(1, math.ceil(target / source - 1e-6))))


def resample(source: np.ndarray, source_affine: np.ndarray, target_affine: np.ndarray,
             target_shape: tuple[int, ...], target_to_source: np.ndarray | None = None, order: int = 1,
             factor: int = 1) -> np.ndarray:
    """``source`` (X, Y, Z) sampled at the centres of the target grid's voxels, zero outside the source.

    ``target_to_source`` maps target world to source world (identity when both grids share one world).
    With ``factor`` > 1 each target voxel is the mean of ``factor``**3 samples spread evenly inside it
    (area-like averaging, for a target coarser than the source).
    """
    world = np.eye(4) if target_to_source is None else np.asarray(target_to_source, dtype=np.float64)
    fine = np.eye(4)
    if factor > 1:  # fine index u -> coarse index (u - (f - 1) / 2) / f
        fine[:3, :3] /= factor
        fine[:3, 3] = -(factor - 1) / (2 * factor)
    matrix = np.linalg.inv(np.asarray(source_affine, dtype=np.float64)) @ world @ np.asarray(target_affine) @ fine
    shape = tuple(int(s) * factor for s in target_shape)
    values = ndimage.affine_transform(np.asarray(source, dtype=np.float32), matrix, output_shape=shape,
                                      order=order, mode="constant", cval=0.0, prefilter=False)
    if factor > 1:
        x, y, z = target_shape
        values = values.reshape(x, factor, y, factor, z, factor).mean(axis=(1, 3, 5))
    return values.astype(np.float32)
