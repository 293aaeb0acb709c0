"""The same heads as another site may hand them over: skull-stripped and resampled to MNI at 1 mm.

    MEDFLOWAD_CACHE=... python benchmarks/stripped_mni.py -o runs/stripped_mni [--scans sample_data/mri] [--model demo]
    medflowad score runs/stripped_mni/scans --model demo --report --out runs/stripped_mni/score
    python benchmarks/stripped_mni.py -o runs/zscored_mni --z-score      # the copies z-scored inside the brain too
    python benchmarks/stripped_mni.py -o runs/grid_variants --grid-variants   # which step moves N4's field

Each ``*_t1.nii.gz`` of ``--scans`` is brain-extracted (deepbet), registered to the MNI template as the
preparation does it, and resampled (linear) onto the 1 mm MNI ICBM152 grid in sample_data/mni_icbm152, zero
outside the brain; its lesion mask (``*_t1_mask.nii.gz``) follows (linear, > 0.5). Public MS and stroke data
often come so, and often z-scored as well (``--z-score``: the brain's mean 0 and standard deviation 1, zero
outside). Then, for each healthy scan (no lesion in its mask, or no mask), both versions are prepared with
``--model``'s preprocessing, with its N4 setting and with N4 off, and the script prints:

- the white matter's intensity ratio (copy / original) slice by slice on the standard grid, inside both
  brains where the original's normalised image is above 0.75: the same head should give the same image;
- with N4 as the model has it, each version's share of brain voxels beyond the model's healthy range (what marks a
  scan ``unlike_healthy``) and its scan score (the normative intensity's top-slice mean).

``--grid-variants`` also writes, per healthy scan, the steps of that copy one at a time (skull-stripped on its own
grid; resampled to MNI with its skull at 2 mm and at 1 mm) and adds each one's white-matter ratio range with the
model's N4 (``grid_variants``), to tell which step moves N4's field.
"""

import argparse
import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from medflowad.mri.model import analyse, load_mri_model
from medflowad.prep import prepare
from medflowad.prep.brain import deepbet_mask
from medflowad.prep.registration import register_affine, resample
from medflowad.prep.template import load_template

ROOT = Path(__file__).resolve().parents[1]
MNI_1MM = ROOT / "sample_data" / "mni_icbm152" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def lesion_mask_of(scan: Path) -> Path:
    """Where the scan's lesion mask lies (``*_t1_mask.nii.gz`` beside it), whether or not it exists."""
    return scan.with_name(scan.name.replace("_t1.nii.gz", "_t1_mask.nii.gz"))


def registered_head(scan: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image, its RAS affine, deepbet brain mask, template-to-scan transform) of ``scan``, registered to the
    MNI template as the preparation does it."""
    head = nib.as_closest_canonical(nib.load(scan))
    data = head.get_fdata(dtype=np.float32)
    brain = deepbet_mask(data, head.affine)
    template = load_template()
    to_scan = register_affine(template.image, template.affine, np.where(brain, data, 0), head.affine)
    return data, head.affine, brain, to_scan


def stripped_mni_copy(scan: Path, out: Path, z_score: bool) -> Path:
    """``scan`` skull-stripped and on the 1 mm MNI grid (z-scored inside the brain with ``z_score``), with its
    lesion mask when it has one."""
    reference = nib.load(MNI_1MM)
    data, affine, brain, to_scan = registered_head(scan)
    moved = resample(np.where(brain, data, 0), affine, reference.affine, reference.shape, to_scan)
    if z_score:
        inside = moved > 0
        moved = np.where(inside, (moved - moved[inside].mean()) / moved[inside].std(), 0.0)
    target = out / scan.name
    nib.save(nib.Nifti1Image(moved.astype(np.float32), reference.affine), target)
    mask = lesion_mask_of(scan)
    if mask.exists():
        lesion = nib.as_closest_canonical(nib.load(mask)).get_fdata(dtype=np.float32)
        moved_mask = resample(lesion, affine, reference.affine, reference.shape, to_scan) > 0.5
        nib.save(nib.Nifti1Image(moved_mask.astype(np.uint8), reference.affine), out / mask.name)
    return target


def grid_variants(scan: Path, out: Path) -> dict[str, Path]:
    """``scan`` skull-stripped on its own grid, and resampled to MNI with its skull at 2 mm and at 1 mm."""
    reference = nib.load(MNI_1MM)
    data, affine, brain, to_scan = registered_head(scan)
    coarse = reference.affine.copy()
    coarse[:3, :3] *= 2
    grids = {"mni_2mm_with_skull": (coarse, tuple(int(np.ceil(n / 2)) for n in reference.shape)),
             "mni_1mm_with_skull": (reference.affine, reference.shape)}
    stem = scan.name.replace("_t1.nii.gz", "")
    paths = {"stripped_own_grid": out / f"{stem}-stripped_own_grid_t1.nii.gz"}
    nib.save(nib.Nifti1Image(np.where(brain, data, 0).astype(np.float32), affine), paths["stripped_own_grid"])
    for name, (grid_affine, shape) in grids.items():
        paths[name] = out / f"{stem}-{name}_t1.nii.gz"
        nib.save(nib.Nifti1Image(resample(data, affine, grid_affine, shape, to_scan).astype(np.float32), grid_affine),
                 paths[name])
    return paths


def has_lesion(scan: Path) -> bool:
    """Whether the scan's lesion mask (``*_t1_mask.nii.gz`` beside it) marks any voxel."""
    mask = lesion_mask_of(scan)
    return mask.exists() and bool(np.asanyarray(nib.load(mask).dataobj).any())


def white_matter_ratio(original, copy) -> list[float | None]:
    """Median of copy / original over white matter (original above 0.75), slice by slice; None where < 20 voxels."""
    both = original.scored & copy.scored
    wm = both & (original.unclipped > 0.75)
    ratio = copy.unclipped / np.maximum(original.unclipped, 1e-3)
    return [round(float(np.median(ratio[z][wm[z]])), 3) if wm[z].sum() >= 20 else None
            for z in range(original.num_slices)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--scans", type=Path, default=ROOT / "sample_data" / "mri")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--z-score", action="store_true", help="z-score the copies inside the brain")
    parser.add_argument("--grid-variants", action="store_true", help="also measure each step of the copy alone")
    args = parser.parse_args()
    copies = args.out / "scans"
    copies.mkdir(parents=True, exist_ok=True)
    scans = sorted(args.scans.glob("*_t1.nii.gz"))
    for scan in scans:
        if not (copies / scan.name).exists():
            stripped_mni_copy(scan, copies, args.z_score)
    model = load_mri_model(args.model, "cpu")
    config = model.config.preprocessing
    result: dict = {"model": args.model, "n4": config.n4, "scans": {}}
    healthy = [s for s in scans if not has_lesion(s)]
    for scan in healthy:
        row: dict = {}
        for n4 in sorted({config.n4, False}, reverse=True):
            settings = dataclasses.replace(config, n4=n4)
            original, copy = prepare(scan, settings), prepare(copies / scan.name, settings)
            row[f"white_matter_ratio_n4_{n4}"] = white_matter_ratio(original, copy)
            if n4 == config.n4:
                as_model_prepares = original
                for label, prepared in (("original", original), ("stripped_mni", copy)):
                    analysis = analyse(model, prepared)
                    row[f"beyond_share_{label}"] = round(analysis.beyond_range_share, 4)
                    scores = analysis.scan_scores(model.config.top_fraction)
                    row[f"score_{label}"] = round(scores["intensity_normative"], 3)
        if args.grid_variants:
            (args.out / "variants").mkdir(exist_ok=True)
            variants = grid_variants(scan, args.out / "variants")
            ratios = {name: [r for r in white_matter_ratio(as_model_prepares, prepare(path, config)) if r is not None]
                      for name, path in variants.items()}
            row["grid_variants"] = {name: [min(r), max(r)] for name, r in ratios.items()}
        result["scans"][scan.name] = row
    (args.out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
