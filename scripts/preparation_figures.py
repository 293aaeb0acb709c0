"""Pictures of the preparation stage for docs/mri.md, from the data pack (prepared results come from the cache).

    MEDFLOWAD_DATA=/path/to/data python scripts/preparation_figures.py [--out docs/images]

- preparation_ixi.png: two IXI T1 heads: the scan as stored with deepbet's brain contour, then three standard-space
  slices the model sees with the template brain's outline (cyan) over them: registration quality at a glance.
- preparation_lgg_standard_refused.png: two LGG scans forced into standard space with the checks off: their
  nominal header leaves them turned by 90 degrees although their masks overlap the template's well.
- preparation_lgg.png: two LGG FLAIR patients prepared in native space with brain extraction (the in-plane
  standardisation): scan with brain (yellow) and lesion (cyan) contours, and the model's slices.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from medflowad.data.readers import load_scan
from medflowad.data.scans import ScanPreprocessing, volume_to_display
from medflowad.prep import prepare
from medflowad.prep.registration import resample
from medflowad.prep.template import load_template, standard_grid

IXI = ("IXI012-HH-1211", "IXI051-HH-1328")
LGG = ("TCGA_CS_4941_19960909", "TCGA_HT_7680_19970202")


def _native_axial(path: Path, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Middle axial slice of the scan and of a mask on its grid, in display orientation (via RAS)."""
    import nibabel as nib

    image = nib.load(str(path))
    ornt = nib.orientations.io_orientation(image.affine)
    data = nib.orientations.apply_orientation(np.asarray(image.dataobj, dtype=np.float32), ornt)
    mask_ras = nib.orientations.apply_orientation(mask.astype(np.float32), ornt)
    z = int(np.argmax(mask_ras.sum(axis=(0, 1))))
    return volume_to_display(data[:, :, z : z + 1])[0], volume_to_display(mask_ras[:, :, z : z + 1])[0]


def ixi_figure(data: Path, out: Path) -> None:
    config = ScanPreprocessing(space="standard", brain="deepbet")
    grid_affine, grid_shape = standard_grid(config.image_size, config.slice_mm)
    template = load_template()
    outline = volume_to_display(resample(template.brain.astype(np.float32), template.affine, grid_affine, grid_shape))
    fig, axes = plt.subplots(len(IXI), 4, figsize=(11, 3 * len(IXI)))
    for row, subject in zip(axes, IXI, strict=True):
        path = data / "medical" / "ixi_t1_2mm" / f"{subject}_T1.nii.gz"
        prepared = prepare(path, config)
        image, brain = _native_axial(path, prepared.brain)
        row[0].imshow(image, cmap="gray")
        row[0].contour(brain, levels=[0.5], colors="yellow", linewidths=0.8)
        row[0].set_title(f"{subject}: scan + deepbet brain", fontsize=8)
        for ax, level in zip(row[1:], (0.3, 0.5, 0.7), strict=True):
            z = int(level * (grid_shape[2] - 1))
            ax.imshow(prepared.slices[z, 0].numpy(), cmap="gray")
            ax.contour(outline[z], levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_title(f"standard slice {z} (z = {grid_affine[2, 3] + z * grid_affine[2, 2]:.0f} mm)", fontsize=8)
    _save(fig, axes, out / "preparation_ixi.png")


def _save(fig, axes, path: Path) -> None:
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def lgg_figure(data: Path, out: Path) -> None:
    config = ScanPreprocessing(brain="deepbet", brain_volume_ml=None)
    fig, axes = plt.subplots(len(LGG), 4, figsize=(11, 3 * len(LGG)))
    for row, patient in zip(axes, LGG, strict=True):
        path = data / "medical" / "lgg_flair128" / f"{patient}_flair.nii.gz"
        prepared = prepare(path, config, lesion_replace=("_flair", "_mask"))
        lesion_native = load_scan(path.with_name(f"{patient}_mask.nii.gz"))[0].numpy() > 0
        z_lesion = int(np.argmax(lesion_native.sum(axis=(0, 1))))
        scan = np.asarray(load_scan(path)[0].numpy())
        row[0].imshow(volume_to_display(scan[:, :, z_lesion : z_lesion + 1])[0], cmap="gray")
        row[0].contour(volume_to_display(prepared.brain[:, :, z_lesion : z_lesion + 1].astype(float))[0], levels=[0.5],
                       colors="yellow", linewidths=0.8)
        row[0].contour(volume_to_display(lesion_native[:, :, z_lesion : z_lesion + 1].astype(float))[0],
                       levels=[0.5], colors="cyan", linewidths=0.8)
        row[0].set_title(f"{patient}: slice {z_lesion}, brain + lesion", fontsize=8)
        scored = np.nonzero(prepared.keep)[0]
        for ax, z in zip(row[1:], (scored[len(scored) // 4], z_lesion, scored[3 * len(scored) // 4]), strict=True):
            ax.imshow(prepared.slices[z, 0].numpy(), cmap="gray")
            if prepared.lesion is not None and prepared.lesion[z].any():
                ax.contour(prepared.lesion[z], levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_title(f"model slice {z}", fontsize=8)
    _save(fig, axes, out / "preparation_lgg.png")


def lgg_standard_figure(data: Path, out: Path) -> None:
    """Two LGG scans forced into standard space (checks off): turned by 90 degrees, though the masks overlap."""
    import dataclasses

    config = dataclasses.replace(ScanPreprocessing(space="standard", brain="deepbet"), min_template_overlap=0.0,
                                 max_template_scaling=1e9, brain_volume_ml=None)
    grid_affine, grid_shape = standard_grid(config.image_size, config.slice_mm)
    template = load_template()
    outline = volume_to_display(resample(template.brain.astype(np.float32), template.affine, grid_affine, grid_shape))
    patients = ("TCGA_CS_5395_19981004", "TCGA_CS_4944_20010208")
    fig, axes = plt.subplots(len(patients), 4, figsize=(11, 3 * len(patients)))
    for row, patient in zip(axes, patients, strict=True):
        prepared = prepare(data / "medical" / "lgg_flair128" / f"{patient}_flair.nii.gz", config)
        for ax, z in zip(row, (15, 22, 28, 35), strict=True):
            ax.imshow(prepared.slices[z, 0].numpy(), cmap="gray")
            ax.contour(outline[z], levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_title(f"{patient}: standard slice {z}", fontsize=8)
    _save(fig, axes, out / "preparation_lgg_standard_refused.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("MEDFLOWAD_DATA", "../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ixi_figure(Path(args.data), args.out)
    lgg_figure(Path(args.data), args.out)
    lgg_standard_figure(Path(args.data), args.out)
    print(f"figures in {args.out}")


if __name__ == "__main__":
    main()
