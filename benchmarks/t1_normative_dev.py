"""Development split of protocol D: choices for the normative intensity map, made without the test subjects.

    MEDFLOWAD_DATA=/path/to/data python benchmarks/t1_normative_dev.py -o runs/t1_dev [--model runs/bench_t1/t1]

Paints ``--copies`` copies of each IXI *training* subject of the fixed split (seeds 1000 + ..., never the
test subjects' seeds), prepares everything in standard space (mri_demo preparation, cached) and, leaving
one subject out at a time, fits the per-location healthy statistics of the intensity on the other subjects'
unpainted scans and measures on the left-out subject's painted copies:

- voxel AUPRC inside the brain (model grid, pooled) of the normative intensity map: signed and two-sided
  z, and the distance beyond the healthy range (medflowad.mri.normative); of the plain intensity and of
  its |z| against the scan's own brain;
- Dice of the signed z and the healthy-range map at thresholds that give voxel FPRs of 5 %, 1 %, 0.3 %
  and 0.1 % on the left-out subjects' unpainted scans;
- scan AUROC of painted copies against the left-out subject's own unpainted scan, for slice scores that
  are the mean of the top k normative values of a slice (k in --top), aggregated over the top 10 % slices;
- voxel AUPRC per lesion kind (``voxel_auprc_by_kind``): lesion voxels brighter, or not, than the unpainted
  scan at the same place, each against every lesion-free voxel; with ``--by-tissue`` each kind split again by
  the tissue the lesion voxels replace (white matter, or grey matter and CSF; ``voxel_auprc_by_kind_and_tissue``).

``--held-apart`` reads a setting chosen here once on protocol D's held-apart test heads (sample_data/mri, healthy
and painted) against the statistics of all five training subjects: voxel AUPRC pooled, by kind and by tissue.
``--smooth S`` reads the image smoothed in-plane within the brain (Gaussian, sigma S pixels) before everything.
``--low-radius R`` fits the healthy range's low bound within R pixels instead of the high bound's radius.
``--local-contrast S`` also measures the healthy range of the image minus its Gaussian-weighted mean over the
brain (sigma S pixels), and the larger of that range's and the intensity's distances.

With ``--model``, the model's flow maps (llr, llr per scale, last_scale) and their normative versions on the
same painted copies are measured too.
Those subjects trained the model, so its figures here are in-sample (favourable to the model).
``--config`` picks the preparation (e.g. a copy of mri_demo with ``n4: true``). With ``--bias-field S`` the
left-out subject's scans (unpainted and painted) are measured multiplied by a linear left-right field of
strength S (:func:`medflowad.data.painting.linear_bias_field`), while the statistics and the Dice
thresholds stay those of the unbiased scans, as a calibration made without the field would be; the output
adds each map's voxel FPR on the biased unpainted scans at those thresholds.

``--deformable MESH_MM`` measures everything after a B-spline refinement of each prepared scan onto the template
(``bspline_refinement.py``; the voxels are then the template's, and each painted copy's lesion kind is read on the
affine grid and carried by its own warp, as is its tissue with ``--by-tissue``).

``--standardised`` reads the unclipped image standardised to the fold's healthy subjects' intensity landmarks
(:mod:`medflowad.mri.landmarks`). ``--phantoms N`` also measures N healthy T1 heads simulated from the MNI
template (seeds 300 + i; :mod:`medflowad.data.phantoms`: another anatomy, contrast and shading than IXI's
scanner, a stand-in for healthy scans of another site) against each fold's statistics: the share of their
brain voxels above the healthy-range map's thresholds, and how often a painted copy outscores them
(``scan_auroc["phantoms_..."]``: painted copies against the phantoms, within each fold).
"""

import argparse
import json
import shutil
import tempfile
from functools import cache, partial
from pathlib import Path

import nibabel as nib
import numpy as np
from bspline_refinement import refined
from data_root import data_root
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from medflowad.bench.mri import read_split
from medflowad.data.painting import bias_scan_file, paint_scan_file, tissue_classes
from medflowad.data.phantoms import load_template, save_scan, simulate_subject
from medflowad.mri.analysis import (
    aggregate,
    intensity_scan_z,
    scale_map_names,
    threshold_at_fpr,
    unclipped_intensity_map,
)
from medflowad.mri.analysis import intensity_map as intensity
from medflowad.mri.calibration import healthy_parts
from medflowad.mri.config import load_mri_config
from medflowad.mri.evaluate import dice
from medflowad.mri.landmarks import standard_landmarks, standardise
from medflowad.mri.model import analyse, load_mri_model
from medflowad.mri.normative import (
    beyond_healthy_range,
    beyond_share,
    fit_healthy_range,
    fit_normative,
    normative_map,
    slice_levels,
    slice_top_mean,
)
from medflowad.prep import prepare
from medflowad.prep.stage import standard_slices

ROOT = Path(__file__).resolve().parents[1]
MASKS = ("_t1", "_t1_mask")
DICE_MAPS = ("intensity_normative_signed", "intensity_beyond_healthy_range")


def development_copies(ixi: Path, subject: str, index: int, tmp: Path, painted_dir: Path, copies: int) -> Path:
    """The subject's healthy head under tmp as ``<subject>_t1.nii.gz`` (the name the lesion masks pair with),
    with its painted copies ``<subject>-painted<k>_t1.nii.gz`` in painted_dir (development seeds 1000 + 100 i)."""
    source = tmp / f"{subject}_t1.nii.gz"
    source.symlink_to(ixi / f"{subject}_T1.nii.gz")
    if not (painted_dir / f"{subject}-painted{copies}_t1.nii.gz").exists():
        paint_scan_file(source, ixi / f"{subject}_dlmuse.nii.gz", painted_dir, copies, 1000 + 100 * index)
    return source


def normative_maps(scan, read, centre, spread, low, high) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scan's scored region, its signed z and its distance beyond the healthy range under these statistics,
    of the image that ``read`` takes from the prepared scan."""
    region, image, level = scan.scored, read(scan), slice_levels(scan, True)
    return (region, normative_map(image, region, level, centre, spread),
            beyond_healthy_range(image, region, level, low, high, spread))


def brain_smoothed(scan, read, sigma: float) -> np.ndarray:
    """The image's Gaussian-weighted mean over the scored region, slice by slice (zero outside it): outside voxels
    neither darken the brain's edge nor count."""
    image, region = read(scan), scan.scored.astype(np.float32)
    weight = ndimage.gaussian_filter(region, (0, sigma, sigma))
    mean = ndimage.gaussian_filter(image * region, (0, sigma, sigma)) / np.maximum(weight, 1e-6)
    return np.where(region > 0, mean, 0.0).astype(np.float32)


def local_contrast(scan, read, sigma: float) -> np.ndarray:
    """The image minus its Gaussian-weighted mean over the scored region, slice by slice (zero outside it): a
    voxel against its surroundings, which a dark blob in white matter stands out from and thin sulcal CSF less."""
    return np.where(scan.scored, read(scan) - brain_smoothed(scan, read, sigma), 0.0).astype(np.float32)


def mirrored_low(scan, read, low_wide: np.ndarray, low_here: np.ndarray, radius: int) -> np.ndarray:
    """The scan's own low bound: the healthy range's wide low bound, raised where the scan's mirror-image side
    (left-right, about the standard grid's midline) holds nothing as dark within ``radius`` pixels (and the
    neighbouring slices) to the healthy range's low bound at the location itself: darkness that neither this
    place in healthy heads nor the scan's own other side explains (CSF lies on both sides of a healthy brain)."""
    image, region = read(scan), scan.scored
    flipped = np.flip(np.where(region, image, np.inf), axis=-1)
    mirror = ndimage.minimum_filter(flipped, size=(3, 2 * radius + 1, 2 * radius + 1), mode="constant", cval=np.inf)
    return np.maximum(low_wide, np.minimum(low_here, mirror)).astype(np.float32)


@cache
def white_matter(ixi: Path, subject: str) -> tuple[np.ndarray, np.ndarray]:
    """(white-matter indicator, affine) of the unpainted head on its own grid: the painting's k-means classes."""
    source = nib.load(str(ixi / f"{subject}_T1.nii.gz"))
    brain = np.asarray(nib.load(str(ixi / f"{subject}_dlmuse.nii.gz")).dataobj) > 0
    classes = tissue_classes(np.asarray(source.get_fdata(dtype=np.float32)), brain)[0]
    return (classes == 3).astype(np.float32), source.affine


def white_matter_on_grid(ixi: Path, subject: str, scan) -> np.ndarray:
    """(Z, S, S) share of each model-grid pixel that is the unpainted head's white matter, resampled as the
    preparation resamples the lesion mask (standard space only)."""
    indicator, affine = white_matter(ixi, subject)
    grid_affine = np.asarray(scan.grid.affine, dtype=np.float64)
    shape = tuple(int(n) for n in scan.grid.shape[1:])
    return standard_slices(indicator, affine, grid_affine, shape, scan.transform)


def fold_read_and_fit(scans: list, base_read, args) -> tuple:
    """The fold's read of the image (standardised to ``scans``' landmarks, smoothed with --smooth) and the
    arguments of the per-location fits (normative.fit_normative, fit_healthy_range) on ``scans``."""
    read = fold_read(base_read, scans, args.standardised)
    if args.smooth:
        read = partial(brain_smoothed, read=read, sigma=args.smooth)
    fit = ([read(p) for p in scans], [healthy_parts(p)[1] for p in scans], [slice_levels(p, True) for p in scans],
           scans[0].num_slices, True)
    return read, fit


def kind_and_tissue_groups(bright: np.ndarray, in_white: np.ndarray) -> dict[str, np.ndarray]:
    """Each lesion kind (brighter or darker than the unpainted scan) split by the tissue it replaces."""
    return {f"{kind}_{tissue}": side & place for kind, side in (("brighter", bright), ("darker", ~bright))
            for tissue, place in (("white", in_white), ("grey_or_csf", ~in_white))}


def held_apart(args, ixi: Path, healthy: dict, config, base_read) -> None:
    """The held-apart test heads of sample_data/mri (protocol D's test split, healthy and painted) against the
    statistics of all five training subjects: voxel AUPRC pooled, by lesion kind and by tissue, and the share of
    the healthy test heads beyond the range. For reading a setting chosen on development once, not for choosing."""
    read, fit = fold_read_and_fit(list(healthy.values()), base_read, args)
    statistics = (*fit_normative(*fit), *fit_healthy_range(*fit))
    samples = ROOT / "sample_data" / "mri"
    truth, values, brighter, white, shares = [], [], [], [], {}
    for subject in read_split(None, "ixi_t1_split.tsv")["test"]:
        unpainted = prepare(samples / f"{subject}_t1.nii.gz", config)
        region, _, beyond = normative_maps(unpainted, read, *statistics)
        shares[subject] = beyond_share(beyond, region)
        for path in sorted(samples.glob(f"{subject}-painted?_t1.nii.gz")):
            scan = prepare(path, config, MASKS)
            region, _, beyond = normative_maps(scan, read, *statistics)
            truth.append(scan.lesion[region] > 0.5)
            values.append(beyond[region])
            brighter.append((read(scan) > read(unpainted))[region])
            white.append((white_matter_on_grid(ixi, subject, scan) > 0.5)[region])
    labels, scores = np.concatenate(truth), np.concatenate(values)
    bright, in_white = np.concatenate(brighter), np.concatenate(white)
    groups = {"all": np.ones_like(labels), "brighter": bright, "darker": ~bright,
              **kind_and_tissue_groups(bright, in_white)}
    result = {"smooth": args.smooth, "voxels": int(labels.size), "healthy_share_beyond": shares,
              "lesion_voxels": {g: int((labels & c).sum()) for g, c in groups.items()},
              "voxel_auprc": {g: float(average_precision_score(labels[~labels | c], scores[~labels | c]))
                              for g, c in groups.items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "held_apart.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def simulated_heads(folder: Path, count: int) -> list[Path]:
    """``count`` healthy T1 heads simulated from the MNI template in sample_data (seeds 300 + i), written once."""
    paths = [folder / f"sim-{300 + i}_t1.nii.gz" for i in range(count)]
    missing = [p for p in paths if not p.exists()]
    if missing:
        template = load_template(ROOT / "sample_data" / "mni_icbm152")
        folder.mkdir(parents=True, exist_ok=True)
        for path in missing:
            save_scan(path, simulate_subject(template, int(path.name[4:7])).t1, template.affine)
    return paths


def fold_read(read, others: list, standardised: bool):
    """``read``, or with ``standardised`` the image it reads mapped onto the intensity landmarks of ``others``."""
    if not standardised:
        return read
    standard = standard_landmarks([read(p) for p in others], [p.scored for p in others])
    return lambda scan: standardise(read(scan), scan.scored, standard)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--top", type=int, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--model", type=Path, help="also measure this model's llr maps (in-sample)")
    parser.add_argument("--config", default="mri_demo", help="MRI config whose preparation to use")
    parser.add_argument("--bias-field", type=float, default=0.0, help="measure on scans with this field")
    parser.add_argument("--unclipped", action="store_true", help="normative maps of the normalised image before "
                        "its clip at 1 (the model's input is clipped)")
    parser.add_argument("--standardised", action="store_true", help="the unclipped image standardised to the "
                        "healthy subjects' intensity landmarks")
    parser.add_argument("--phantoms", type=int, default=0, help="also measure this many simulated healthy heads")
    parser.add_argument("--local-contrast", type=float, default=0.0, help="also measure the healthy range of the "
                        "image minus its Gaussian-weighted mean over the brain within this sigma (pixels), and the "
                        "larger of both ranges' distances")
    parser.add_argument("--mirror", type=int, default=None, help="raise the healthy range's low bound to the "
                        "location's own (radius --mirror-here) where the scan's mirror side has nothing as dark within "
                        "this many pixels")
    parser.add_argument("--mirror-here", type=int, default=0,
                        help="radius of the location's own low bound for --mirror")
    parser.add_argument("--low-radius", type=int, default=None, help="in-plane radius of the healthy range's low "
                        "bound (default: the high bound's, normative.RANGE_RADIUS)")
    parser.add_argument("--smooth", type=float, default=0.0, help="read the image smoothed in-plane within the "
                        "brain by a Gaussian of this sigma (pixels) first, in the statistics and the measured scans")
    parser.add_argument("--held-apart", action="store_true", help="measure the held-apart test heads of "
                        "sample_data/mri once against all training subjects (held_apart.json) instead")
    parser.add_argument("--by-tissue", action="store_true", help="also split each lesion kind's AUPRC by the "
                        "tissue its voxels replace (white matter or not, by the unpainted head's k-means classes)")
    parser.add_argument("--deformable", type=float, default=None, help="refine every prepared scan onto the "
                        "template by a B-spline registration of this control-point spacing (mm; 0: a half-pixel "
                        "shift, the control; bspline_refinement.py)")
    args = parser.parse_args()
    if args.deformable is not None and args.bias_field:
        parser.error("--deformable refines the painted and healthy scans only: not with --bias-field")
    ixi = data_root() / "medical" / "ixi_t1_2mm"
    subjects = read_split(None, "ixi_t1_split.tsv")["train"]
    config = load_mri_config(args.config).preprocessing
    painted_dir = args.out / "painted"
    biased_dir = args.out / f"biased{args.bias_field:g}"
    if args.bias_field:
        biased_dir.mkdir(parents=True, exist_ok=True)
    healthy, painted, biased_healthy = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, subject in enumerate(subjects):
            source = development_copies(ixi, subject, i, Path(tmp), painted_dir, args.copies)
            healthy[subject] = prepare(source, config)
            measured_dir = painted_dir
            if args.bias_field:  # the measured scans carry the field; the statistics' scans do not
                measured_dir = biased_dir
                for k in range(1, args.copies + 1):
                    name = f"{subject}-painted{k}_t1"
                    bias_scan_file(painted_dir / f"{name}.nii.gz", biased_dir / f"{name}.nii.gz", args.bias_field)
                    shutil.copyfile(painted_dir / f"{name}_mask.nii.gz", biased_dir / f"{name}_mask.nii.gz")
                biased_healthy[subject] = prepare(
                    bias_scan_file(source, biased_dir / f"{subject}_t1.nii.gz", args.bias_field), config)
            painted[subject] = [prepare(measured_dir / f"{subject}-painted{k}_t1.nii.gz", config, MASKS)
                                for k in range(1, args.copies + 1)]
    base_read = unclipped_intensity_map if args.unclipped or args.standardised else intensity
    if args.held_apart:
        held_apart(args, ixi, healthy, config, base_read)
        return
    phantoms = [prepare(path, config) for path in simulated_heads(args.out / "phantoms", args.phantoms)]
    affine_healthy, affine_painted, warps = dict(healthy), {s: list(v) for s, v in painted.items()}, {}
    if args.deformable is not None:  # every scan refined onto the template; painted copies keep their warps
        for subject in subjects:
            healthy[subject] = refined(healthy[subject], args.deformable)[0]
            for k, scan in enumerate(painted[subject]):
                painted[subject][k], warps[(subject, k)] = refined(scan, args.deformable)
        phantoms = [refined(p, args.deformable)[0] for p in phantoms]
    model = load_mri_model(args.model, "cpu") if args.model else None
    flow_maps = {"llr", "last_scale", *scale_map_names(model.config.model.levels)} if model else set()

    voxel: dict[str, list] = {n: [] for n in ("intensity_normative_signed", "intensity_normative_two_sided",
                                              "intensity_beyond_healthy_range",
                                              "intensity", "intensity_abs_z")}
    # healthy: each subject's unpainted scan against the others' statistics (biased: as measured)
    truth, healthy_values, biased_values, brighter, white = [], [], [], [], []
    scan_scores: dict[str, dict[str, list]] = {}
    phantom_values: list[np.ndarray] = []
    # share of each scan's scored voxels beyond its location's healthy range (at any distance)
    shares: dict[str, list[float]] = {"healthy": [], "painted": [], "phantoms": []}
    phantom_wins: dict[str, list[float]] = {}
    for subject in subjects:
        others = [healthy[s] for s in subjects if s != subject]
        read, fit = fold_read_and_fit(others, base_read, args)
        centre, spread = fit_normative(*fit)
        low, high = fit_healthy_range(*fit)
        if args.low_radius is not None:
            low = fit_healthy_range(*fit, radius=args.low_radius)[0]
        statistics = (centre, spread, low, high)
        low_here = fit_healthy_range(*fit, radius=args.mirror_here)[0] if args.mirror is not None else None

        def statistics_of(scan, statistics=statistics, low_here=low_here, read=read):
            """The fold's statistics, with --mirror the low bound raised for this scan (mirrored_low)."""
            if low_here is None:
                return statistics
            centre, spread, low, high = statistics
            return centre, spread, mirrored_low(scan, read, low, low_here, args.mirror), high
        if args.local_contrast:
            contrast_read = partial(local_contrast, read=read, sigma=args.local_contrast)
            contrast_fit = ([contrast_read(p) for p in others], *fit[1:])
            contrast_statistics = (*fit_normative(*contrast_fit), *fit_healthy_range(*contrast_fit))
        measured = biased_healthy.get(subject, healthy[subject])
        measured_image = read(measured)  # what each painted copy's lesion kind is read against
        for index, (label, scan) in enumerate([(False, measured)] + [(True, p) for p in painted[subject]]):
            region, signed, beyond = normative_maps(scan, read, *statistics_of(scan))
            shares["painted" if label else "healthy"].append(beyond_share(beyond, region))
            maps = {"intensity_normative_signed": signed, "intensity_normative_two_sided": np.abs(signed),
                    "intensity_beyond_healthy_range": beyond,
                    "intensity": intensity(scan), "intensity_abs_z": np.abs(intensity_scan_z(intensity(scan), region))}
            if args.local_contrast:
                contrast_beyond = normative_maps(scan, contrast_read, *contrast_statistics)[2]
                maps["contrast_beyond_healthy_range"] = contrast_beyond
                maps["larger_beyond_healthy_range"] = np.maximum(beyond, contrast_beyond)
            if model is not None:
                analysis = analyse(model, scan)
                # every flow map (llr, its scales, last_scale) and its normative version; the model's
                # intensity maps are left to the fold's own statistics above
                maps.update({name: m for name, m in analysis.maps.items() if name in flow_maps
                             or name.removesuffix("_normative") in flow_maps})
            for side in ("normative_signed", "normative_two_sided", "beyond_healthy_range"):
                for k in args.top:
                    name = f"{side}_top{k}"
                    score = aggregate(slice_top_mean(maps[f"intensity_{side}"], region, k), 0.1)
                    scan_scores.setdefault(name, {}).setdefault(subject, []).append((label, score))
            if not label:
                biased_values.append({n: maps[n][region] for n in DICE_MAPS})
                if scan is healthy[subject]:
                    healthy_values.append(biased_values[-1])
                else:  # thresholds from the unbiased scan, as calibrated
                    unbiased_region, *unbiased = normative_maps(healthy[subject], read,
                                                                *statistics_of(healthy[subject]))
                    healthy_values.append({n: m[unbiased_region] for n, m in zip(DICE_MAPS, unbiased, strict=True)})
            if label:
                truth.append(scan.lesion[region] > 0.5)
                # lesion kind by how the painted copy differs from its unpainted scan on the same grid
                if args.deformable is not None:  # the kind read on the affine grid, carried by the copy's own warp
                    kind = read(affine_painted[subject][index - 1]) > read(affine_healthy[subject])
                    brighter.append((warps[(subject, index - 1)](kind) > 0.5)[region])
                else:
                    brighter.append((read(scan) > measured_image)[region])
                if args.by_tissue and args.deformable is not None:  # read on the affine grid like the kind
                    share = white_matter_on_grid(ixi, subject, affine_painted[subject][index - 1])
                    white.append((warps[(subject, index - 1)](share) > 0.5)[region])
                elif args.by_tissue:
                    white.append((white_matter_on_grid(ixi, subject, scan) > 0.5)[region])
                for name in maps:
                    voxel.setdefault(name, []).append(maps[name][region])
        for phantom in phantoms:  # against this fold's painted copies, under the same statistics
            region, _, beyond = normative_maps(phantom, read, *statistics_of(phantom))
            phantom_values.append(beyond[region])
            shares["phantoms"].append(beyond_share(beyond, region))
            for k in args.top:
                name = f"beyond_healthy_range_top{k}"
                score = aggregate(slice_top_mean(beyond, region, k), 0.1)
                phantom_wins.setdefault(name, []).extend(
                    float(s > score) for lab, s in scan_scores[name][subject] if lab)
    labels = np.concatenate(truth)
    result = {"subjects": subjects, "copies": args.copies, "config": args.config, "bias_field": args.bias_field,
              "unclipped": args.unclipped, "standardised": args.standardised, "phantoms": args.phantoms,
              "voxels": int(labels.size),
              "lesion_voxels": int(labels.sum()),
              "voxel_auprc": {n: float(average_precision_score(labels, np.concatenate(v))) for n, v in voxel.items()
                              if v},
              "scan_auroc": {}, "beyond_share": shares}
    # each lesion kind against every lesion-free voxel (the other kind's voxels left out)
    bright = np.concatenate(brighter)
    result["voxel_auprc_by_kind"] = {
        kind: {n: float(average_precision_score(labels[keep], np.concatenate(v)[keep])) for n, v in voxel.items()
               if v}
        for kind, keep in (("brighter", ~labels | bright), ("darker", ~labels | ~bright))}
    if args.by_tissue:
        groups = kind_and_tissue_groups(bright, np.concatenate(white))
        result["voxel_auprc_by_kind_and_tissue"] = {
            group: {n: float(average_precision_score(labels[~labels | chosen], np.concatenate(v)[~labels | chosen]))
                    for n, v in voxel.items() if v} for group, chosen in groups.items()}
        result["lesion_voxels_by_kind_and_tissue"] = {group: int((labels & chosen).sum())
                                                      for group, chosen in groups.items()}
    result["lesion_voxels_by_kind"] = {"brighter": int((labels & bright).sum()),
                                       "darker": int((labels & ~bright).sum())}
    # Dice at thresholds giving these voxel FPRs on the healthy scans
    result["dice_at_voxel_fpr"], result["healthy_fpr_measured"] = {}, {}
    for name in DICE_MAPS:
        values = np.concatenate(voxel[name])
        healthy_all = np.concatenate([h[name] for h in healthy_values])
        measured_all = np.concatenate([h[name] for h in biased_values])
        thresholds = {fpr: threshold_at_fpr(healthy_all, fpr) for fpr in (0.05, 0.01, 0.003, 0.001)}
        result["dice_at_voxel_fpr"][name] = {str(f): dice(values > t, labels) for f, t in thresholds.items()}
        result["healthy_fpr_measured"][name] = {str(f): float(np.mean(measured_all > t))
                                                for f, t in thresholds.items()}
    if phantom_values:
        healthy_all = np.concatenate([h["intensity_beyond_healthy_range"] for h in healthy_values])
        values = np.concatenate(phantom_values)
        result["phantom_voxel_fpr"] = {str(f): float(np.mean(values > threshold_at_fpr(healthy_all, f)))
                                       for f in (0.05, 0.01, 0.003, 0.001)}
        for name, wins in phantom_wins.items():
            result["scan_auroc"][f"phantoms_{name}"] = float(np.mean(wins))
    for name, per_subject in scan_scores.items():
        pairs = [pair for rows in per_subject.values() for pair in rows]
        result["scan_auroc"][name] = float(roc_auc_score([p[0] for p in pairs], [p[1] for p in pairs]))
        # within subject: painted copies above their own unpainted scan
        wins = [np.mean([s > rows[0][1] for lab, s in rows if lab]) for rows in per_subject.values()]
        result["scan_auroc"][f"{name}_within_subject"] = float(np.mean(wins))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
