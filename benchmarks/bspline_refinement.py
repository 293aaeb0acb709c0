"""A B-spline refinement of prepared standard-space scans onto the template: tried for the healthy range's dark
lesions, not adopted (docs/results.md, "Dark painted lesions"). Development only; the product registers affinely.

``refined(scan, mesh_mm)`` registers a prepared scan's image (the standard grid, after the affine registration)
to the MNI template sampled on the same grid, with a B-spline transform of control points about ``mesh_mm``
apart (Mattes mutual information inside the template brain, L-BFGS-B, two levels), and returns the scan with its
image, foreground and lesion mask warped onto the template, and the warp itself for other arrays. Transforms are
cached as ITK text files under $MEDFLOWAD_CACHE/bspline, keyed by the image and the settings.
``benchmarks/t1_normative_dev.py --deformable MESH_MM`` measures the healthy-range map with it; ``--deformable 0``
is its control, every scan shifted by half a pixel along each axis through the same linear interpolation (the
most blur that interpolation gives, and no alignment).

    python benchmarks/bspline_refinement.py runs/t1_dev/painted -o runs/bspline_overlay.png --mesh 30 15

draws the first painted copies' largest lesion slices under the affine preparation and under each mesh: image and
lesion contour, with the lesion's pixel count on the grid.
"""

import argparse
import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813 (the library's own convention)
import torch

from medflowad.data.scans import PreparedScan
from medflowad.prep.registration import SAMPLING_SEED
from medflowad.prep.stage import default_cache_dir, standard_slices
from medflowad.prep.template import load_template

ITERATIONS = 50


def template_on_grid(scan: PreparedScan) -> np.ndarray:
    """(Z, S, S) the template averaged onto the scan's standard grid, in the display orientation of its slices."""
    template = load_template()
    affine = np.asarray(scan.grid.affine, dtype=np.float64)
    shape = tuple(int(s) for s in scan.grid.shape[1:])
    return standard_slices(template.image, template.affine, affine, shape, None)


def _image(array: np.ndarray, spacing: tuple[float, float, float]) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))  # (Z, rows, cols) -> x, y, z
    image.SetSpacing(spacing)
    return image


def register_bspline(moving: np.ndarray, fixed: np.ndarray, spacing: tuple[float, float, float],
                     mesh_mm: float) -> sitk.Transform:
    """B-spline transform (fixed point -> moving point) of two (Z, S, S) arrays on one grid."""
    fixed_image, moving_image = _image(fixed, spacing), _image(moving, spacing)
    mesh = [max(1, round(size * mm / mesh_mm)) for size, mm in zip(fixed_image.GetSize(), spacing, strict=True)]
    transform = sitk.BSplineTransformInitializer(fixed_image, mesh)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.5, SAMPLING_SEED)
    method.SetMetricFixedMask(sitk.Cast(fixed_image > 0, sitk.sitkUInt8))
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=ITERATIONS,
                                maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=1000,
                                costFunctionConvergenceFactor=1e7)
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed_image, moving_image)
    return transform


def _warp(array: np.ndarray, transform: sitk.Transform, spacing: tuple[float, float, float]) -> np.ndarray:
    image = _image(array, spacing)
    return sitk.GetArrayFromImage(sitk.Resample(image, image, transform, sitk.sitkLinear, 0.0)).astype(np.float32)


def refined(scan: PreparedScan, mesh_mm: float) -> tuple[PreparedScan, Callable[[np.ndarray], np.ndarray]]:
    """The scan warped onto the template by a B-spline registration, and the warp (linear) for other arrays."""
    affine = np.asarray(scan.grid.affine, dtype=np.float64)
    pixel, slice_mm = float(np.linalg.norm(affine[:3, 0])), float(np.linalg.norm(affine[:3, 2]))
    spacing = (pixel, pixel, slice_mm)
    image = scan.unclipped if scan.unclipped is not None else scan.slices[:, 0].numpy() / 255.0
    moving = np.where(scan.foreground, image, 0.0).astype(np.float32)
    if mesh_mm == 0:  # the control: half a pixel along every axis, the interpolation's blur without any alignment
        transform = sitk.TranslationTransform(3, [m / 2 for m in spacing])
    else:
        key = hashlib.sha1(moving.tobytes() + f"{mesh_mm}-{ITERATIONS}".encode()).hexdigest()[:16]
        path = default_cache_dir() / "bspline" / f"{key}.tfm"
        if path.exists():
            transform = sitk.ReadTransform(str(path))
        else:
            transform = register_bspline(moving, template_on_grid(scan), spacing, mesh_mm)
            path.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteTransform(transform, str(path))

    def warp(array: np.ndarray) -> np.ndarray:
        return _warp(np.asarray(array, dtype=np.float32), transform, spacing)

    slices = np.clip(np.rint(warp(scan.slices[:, 0].numpy())), 0, 255).astype(np.uint8)
    changes = {"foreground": warp(scan.foreground) > 0.5, "slices": torch.from_numpy(slices)[:, None]}
    if scan.unclipped is not None:
        changes["unclipped"] = warp(scan.unclipped)
    if scan.lesion is not None:
        changes["lesion"] = warp(scan.lesion)
        changes["lesion_slices"] = (changes["lesion"] > 0.5).any(axis=(1, 2))
    return dataclasses.replace(scan, **changes), warp


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medflowad.mri.analysis import unclipped_intensity_map
    from medflowad.mri.config import load_mri_config
    from medflowad.prep import prepare

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("painted", type=Path, help="folder of painted copies <name>_t1.nii.gz with <name>_t1_mask")
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--mesh", type=float, nargs="+", default=[30.0, 15.0])
    parser.add_argument("--scans", type=int, default=3)
    args = parser.parse_args()
    config = load_mri_config("mri_demo").preprocessing
    paths = sorted(args.painted.glob("*-painted?_t1.nii.gz"))[:args.scans]
    fig, axes = plt.subplots(len(paths), 1 + len(args.mesh), figsize=(3 * (1 + len(args.mesh)), 3.2 * len(paths)),
                             squeeze=False)
    for row, path in zip(axes, paths, strict=True):
        scan = prepare(path, config, ("_t1", "_t1_mask"))
        z = int(np.argmax((scan.lesion > 0.5).sum(axis=(1, 2))))
        versions = [("affine", scan)] + [(f"B-spline {m:g} mm", refined(scan, m)[0]) for m in args.mesh]
        for ax, (label, version) in zip(row, versions, strict=True):
            ax.imshow(unclipped_intensity_map(version)[z], cmap="gray", vmin=0, vmax=1.2)
            ax.contour(version.lesion[z] > 0.5, levels=[0.5], colors="r", linewidths=0.8)
            ax.set_title(f"{path.name.removesuffix('_t1.nii.gz')} slice {z}\n{label}: lesion "
                         f"{int((version.lesion > 0.5).sum())} px", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)


if __name__ == "__main__":
    main()
