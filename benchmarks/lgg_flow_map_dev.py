"""Development split of protocol B for the flow maps: how a scale's per-location llr is laid onto pixels.

    MEDFLOWAD_DATA=/path/to/data python benchmarks/lgg_flow_map_dev.py -m runs/bench_mri_v11/flair_outlier \\
        -o runs/lgg_flow_map_dev                                        # the model's 12 calibration patients
    MEDFLOWAD_DATA=/path/to/data python benchmarks/lgg_flow_map_dev.py -m runs/bench_mri_v11/flair_outlier \\
        -o runs/lgg_flow_map_test --split test --maps llr llr:bilinear_s2 ...  # once per setting reported

Why: scale i's contribution c_i is one number per location, a 2^i x 2^i block of pixels (8 x 8 at the last
of three scales), and ``score`` spreads it over that block evenly (nearest upsampling). The overlays of
protocol B show the result: blocky hot cells on the tumours' bright rims, boundaries on the block grid, not the
lesion's. Variants of each flow map, measured on the same native brain voxels as the intensity baseline and the
product's scan z:

- ``nearest``: the product's map;
- ``bilinear``: each scale's grid of locations upsampled bilinearly to pixels (a location's value at its
  block's centre), then summed over scales; the same total mass per scale up to the edges
  (``analysis.spread_to_pixels``, which the product uses with ``map_spread: bilinear``);
- ``_s<sigma>``: either of those smoothed in-plane within the scored brain (``analysis.smoothed_within``);
- with ``--guided R:EPS ...``: ``<map>:<spread>_gR_eEPS``, the model's own spread refined by a guided filter
  (He, Sun and Tang, ECCV 2010) with the prepared image as guide, within the scored brain (:func:`guided_within`):
  where the image has an edge stronger than sqrt(EPS) inside a (2R+1)-pixel window the map follows it, elsewhere
  it is the window's mean. At a 5 % healthy FPR the flow maps cover the lesions but spill 4-8 pixels past them
  (a scale-2 or -3 location is 4 or 8 pixels wide): does snapping them to the image's edges help?
- with ``--gradient``: ``grad``, the llr's input gradient d llr / d x per pixel (``flow_restoration.gradient_map``),
  and with ``--restore STEPS:LR:LAM:BETA ...``: ``restore_<setting>``, the residual of restoring the slice towards the
  in-distribution (``flow_restoration.restoration_residual``); both at pixel resolution, each also smoothed
  (``_s<sigma>``). They ask whether the flows locate a lesion better through their input than through their
  per-location contributions, which are one value per 2^i x 2^i block.
- with ``--with-scan-z W ...``: ``intensity_scan_z+W*<map>_z``, the product's scan z plus W times the flow map
  (the model's own spread) read as a robust z against the scan's own scored brain (``analysis.intensity_scan_z``,
  as the scan z reads the intensity): does the flow add to the intensity? No labels enter the sum.
- with ``--with-min``: ``min(intensity_scan_z,<map>_z)``, the smaller of the scan z and the flow map's z (as above):
  a voxel scores high only where it is bright for its brain *and* the flow calls it unlike healthy tissue. An AND
  where the sum above is an OR: the scan z hugs a lesion's outline and lights bright healthy spots too; the flow
  covers the lesion and spills past it, so the AND might keep the lesion and drop both kinds of false flag.
  Controls without a model: ``min(intensity_scan_z,intensity_scan_z_s<sigma>_z)``, the scan z gated by its own
  blur (sigma in MIN_CONTROL_SIGMAS pixels), read as a z the same way: a gate as coarse as the flow's, which knows
  nothing the scan z does not. And ``min(intensity_z,llr_z)``: the llr's gate on the model's input itself (the
  clipped intensity, unsmoothed) read as a z against the scan's brain, with its blur control at the middle sigma.
- with ``--reconstruct`` (needs ``--with-min``): ``rec(<base>|<gate>)``, each gate above grown back inside its base
  map by greyscale reconstruction (:func:`reconstruct_within`): a voxel keeps its base value (scan z or intensity
  z) where a path of voxels at least that high joins it to a voxel the gate holds at that height too, in-plane
  (``rec``) or in 3D (``rec3d``). The gate is an AND per voxel, so lesion parts the flow's coarse map misses are
  lost; as an AND per bright region, a lesion confirmed anywhere keeps its whole outline and an isolated bright
  healthy spot that the gate drops stays dropped (hysteresis thresholding, continuous).

With ``--crossfit DIR`` (``lgg_crossfit.py``'s folder) instead of ``--model``, every train patient is read by the
fold model that left it out: a development split of up to 60 patients.

The development split is the model's calibration patients (``data/healthy_val``: unseen by both models'
training; lesion slices too); ``--split test`` reads protocol B's test patients. Metrics as
``lgg_intensity_dev.py``: pooled voxel AUPRC over the scored slices' brain voxels, and Dice at the value 5 % of
the *other* patients' healthy voxels exceed (lesions dilated by 2 voxels are not healthy). Where the flags
go, at that threshold: ``lesion_flagged`` (the share of lesion voxels flagged) and ``false_flags_near`` (the
share of flagged voxels outside the lesion that lie within NEAR_VOXELS of it: a map that spills over the
lesion's edge, rather than lighting healthy tissue elsewhere). For the maps the product calibrates
(PRODUCT_MAPS), also at protocol B's threshold, the value 5 % of the reading model's calibration patients' healthy
voxels exceed: the Dice there, and the share of these patients' healthy voxels and of their lesion voxels above
it. And once, ``dice_ceiling_5%``: the Dice of a map that flags every lesion voxel and exactly 5 % of the healthy
ones, 2P / (2P + 0.05 H) (P lesion, H healthy voxels), which no map reaches at a threshold that transfers.
With ``--matched-fpr F ...``: each map's Dice where exactly F of these patients' own healthy voxels are flagged
(pooled; it reads these patients' labels, so it is a comparison of maps at one operating point, not a result).
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from data_root import data_root
from flow_restoration import gradient_map, restoration_residual
from lgg_intensity_dev import HEALTHY_FPR, flags_at_others_threshold, voxel_metrics
from scipy import ndimage

from medflowad.bench.mri import LESION_MASKS, read_split
from medflowad.data.readers import load_scan
from medflowad.data.scans import IN_PLANE_CROSS, to_native
from medflowad.mri.analysis import (
    MAP_SPREADS,
    SCAN_Z_AND_LLR_MAP,
    SCAN_Z_MAP,
    analyse_scan,
    intensity_map,
    intensity_scan_z,
    smoothed_within,
)
from medflowad.mri.evaluate import dice, healthy_voxels
from medflowad.mri.model import analyse, load_mri_model
from medflowad.mri.position import scan_position_classes
from medflowad.mri.score import scans_the_model_saw
from medflowad.prep.stage import companion_path, mask_on_scan, prepare_volume

FLOW_MAPS = ("llr", "llr_c2", "last_scale")
# --with-min's controls: is the flow's gate more than a blur? The llr's coarsest locations are 8 pixels wide.
MIN_CONTROL_SIGMAS = (2.0, 4.0, 8.0)
# the product's name of each map that a model's calibration holds thresholds of, by this script's name
PRODUCT_MAPS = {"intensity": "intensity", SCAN_Z_MAP: SCAN_Z_MAP, f"min({SCAN_Z_MAP},llr_z)": SCAN_Z_AND_LLR_MAP}
NEAR_VOXELS = 8  # native in-plane voxels, 16 mm nominal: 4-5 pixels of the 64 x 64 grid (a brain cut from 128 x 128)


def guided_within(image: np.ndarray, guide: np.ndarray, region: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """(Z, S, S) guided filter of ``image`` by ``guide``, in-plane, over ``region`` only, zero outside.

    With window means m(x) = box(r x) / box(r) (normalised like ``smoothed_within``, so the zeros outside the
    brain do not enter): a = cov(I, p) / (var(I) + eps), b = m(p) - a m(I) per window, and the output is
    m(a) I + m(b): locally linear in the guide I, equal to p's window mean where I is flat.
    """
    size = (1, 2 * radius + 1, 2 * radius + 1)
    weight = np.maximum(ndimage.uniform_filter(region.astype(np.float64), size), 1e-6)

    def mean(x: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(np.where(region, x, 0.0).astype(np.float64), size) / weight

    mean_i, mean_p = mean(guide), mean(image)
    a = (mean(guide * image) - mean_i * mean_p) / (mean(guide * guide) - mean_i ** 2 + eps)
    b = mean_p - a * mean_i
    return np.where(region, mean(a) * guide + mean(b), 0.0).astype(np.float32)


def reconstruct_within(marker: np.ndarray, mask: np.ndarray, region: np.ndarray, in_plane: bool = True) -> np.ndarray:
    """Greyscale reconstruction by dilation of ``marker`` (<= ``mask``) under ``mask``, over ``region``, zero
    outside: repeat marker <- min(dilate(marker), mask) until nothing changes. A voxel ends at the largest t with a
    path inside ``region`` along which ``mask`` >= t to a voxel whose ``marker`` >= t (capped by its own mask).
    8-connected in-plane, or 26-connected in 3D."""
    floor = np.float32(-1e9)
    limit = np.where(region, mask, floor).astype(np.float32)
    current = np.minimum(np.where(region, marker, floor).astype(np.float32), limit)
    footprint = np.ones((1, 3, 3) if in_plane else (3, 3, 3), dtype=bool)
    while True:
        grown = np.minimum(ndimage.grey_dilation(current, footprint=footprint), limit)
        if np.array_equal(grown, current):
            return np.where(region, current, 0.0).astype(np.float32)
        current = grown


def flow_variants(prepared, model, product, region: np.ndarray, sigmas: list[float]) -> dict[str, np.ndarray]:
    """Every variant of FLOW_MAPS on the (Z, S, S) model grid, zero outside the scored brain. ``product`` is
    ``analyse(model, prepared)``: its maps are the model's own ``map_spread``; only the other spread is computed."""
    out = {}
    for mode in MAP_SPREADS:
        maps = product.maps if mode == model.config.map_spread else analyse_scan(
            prepared, model.in_model, model.general_model, classes=scan_position_classes(model.config, prepared),
            spread=mode).maps
        for name in FLOW_MAPS:
            out[name if mode == "nearest" else f"{name}:{mode}"] = maps[name]
            for sigma in sigmas:
                out[f"{name}:{mode}_s{sigma:g}"] = smoothed_within(maps[name], region, sigma)
    return out


def pixel_maps(prepared, model, region: np.ndarray, sigmas: list[float], gradient: bool,
               restore: list[str]) -> dict[str, np.ndarray]:
    """The input-gradient and restoration maps (module docstring) on the (Z, S, S) model grid, zero outside the
    scored slices' foreground, each also smoothed within the scored brain."""
    keep = np.nonzero(prepared.keep)[0]
    classes = scan_position_classes(model.config, prepared)
    labels = None if classes is None else torch.as_tensor(np.asarray(classes)[keep], dtype=torch.long)
    slices, foreground = prepared.slices[keep], prepared.foreground[keep]
    kept = {}
    if gradient:
        kept["grad"] = gradient_map(slices, model.in_model, model.general_model, labels=labels)
    for setting in restore:
        steps, lr, lam, beta = setting.split(":")
        kept[f"restore_{setting}"] = restoration_residual(slices, foreground > 0, model.in_model,
                                                          model.general_model, int(steps), float(lam), float(beta),
                                                          lr=float(lr), labels=labels)
    out = {}
    for name, values in kept.items():
        full = np.zeros(prepared.foreground.shape, dtype=np.float32)
        full[keep] = values * foreground
        out[name] = full
        for sigma in sigmas:
            out[f"{name}_s{sigma:g}"] = smoothed_within(full, region, sigma)
    return out


def lgg_scan(patient: str) -> Path:
    return data_root() / "medical" / "lgg_flair128" / f"{patient}_flair.nii.gz"


def split_scans(model, split: str) -> list[Path]:
    """The LGG FLAIR scans of ``split``: ``calibration``, the model's calibration patients (the development
    split), or ``test``, protocol B's test patients."""
    if split == "calibration":
        scans = sorted(Path(p) for p, role in scans_the_model_saw(model.folder).items() if role == "calibrated")
    else:
        scans = [lgg_scan(p) for p in read_split(None)["test"]]
    if not scans:
        raise SystemExit(f"{model.folder}: no {split} scans")
    return scans


def crossfit_pairs(folder: Path) -> list[tuple]:
    """(model, scan) for every held-out patient of ``lgg_crossfit.py``'s trained folds in ``folder``."""
    pairs = []
    for fold in json.loads((folder / "folds.json").read_text())["folds"]:
        if not (folder / fold["model"] / "calibration.safetensors").exists():
            print(f"{folder / fold['model']}: not trained (yet), its patients left out", flush=True)
            continue
        model = load_mri_model(folder / fold["model"], "cpu")
        pairs += [(model, lgg_scan(p)) for p in fold["held_out"]]
    if not pairs:
        raise SystemExit(f"{folder}: no trained fold")
    return pairs


def add_reader_arguments(parser: argparse.ArgumentParser) -> None:
    """--model with --split, or --crossfit: which models read which patients (:func:`reading_pairs`)."""
    parser.add_argument("-m", "--model", type=Path, help="the model (else --crossfit)")
    parser.add_argument("--crossfit", type=Path, help="lgg_crossfit.py's folder: each train patient by the fold "
                        "model that left it out (instead of --model and --split)")
    parser.add_argument("--split", choices=("calibration", "test"), default="calibration")


def reading_pairs(args: argparse.Namespace) -> list[tuple]:
    """(model, scan) pairs of :func:`add_reader_arguments`' choice: the cross-fit's, or one model's split."""
    if args.crossfit:
        return crossfit_pairs(args.crossfit)
    if args.model:
        model = load_mri_model(args.model, "cpu")
        return [(model, scan) for scan in split_scans(model, args.split)]
    raise SystemExit("give --model or --crossfit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_reader_arguments(parser)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[1.0, 2.0, 4.0, 6.0])
    parser.add_argument("--maps", nargs="+", help="report only these maps (the test split: the chosen ones)")
    parser.add_argument("--with-scan-z", type=float, nargs="*", default=[], metavar="W",
                        help="also measure scan z + W x (the flow map's z against the scan's own brain), per W")
    parser.add_argument("--with-min", action="store_true",
                        help="also measure min(scan z, the flow map's z against the scan's own brain)")
    parser.add_argument("--reconstruct", action="store_true",
                        help="with --with-min: also each gate grown back inside its base map (reconstruct_within)")
    parser.add_argument("--matched-fpr", type=float, nargs="*", default=[], metavar="F",
                        help="also each map's Dice at the value F of these patients' own healthy voxels exceed")
    parser.add_argument("--guided", nargs="*", default=[], metavar="R:EPS",
                        help="also measure each flow map refined by a guided filter of radius R and eps EPS")
    parser.add_argument("--gradient", action="store_true", help="also measure the llr's input gradient")
    parser.add_argument("--restore", nargs="*", default=[], metavar="STEPS:LR:LAM:BETA",
                        help="also measure restoration residuals, one per setting")
    args = parser.parse_args()
    pairs = reading_pairs(args)

    # each flow map's key under the models' own map_spread (flow_variants names the nearest one plainly)
    spread = pairs[0][0].config.map_spread
    own_spread = {name: name if spread == "nearest" else f"{name}:{spread}" for name in FLOW_MAPS}
    values: dict[str, list[np.ndarray]] = {}
    labels, healthy_of, patient_of, near_of = [], [], [], []
    product_names = {**PRODUCT_MAPS, own_spread["llr"]: "llr"}
    model_thresholds: dict[str, list[float]] = {name: [] for name in product_names}  # per patient
    thresholds_of: dict[Path, dict[str, float | None]] = {}  # per model folder
    for i, (model, path) in enumerate(pairs):
        lesion_file = load_scan(companion_path(path, LESION_MASKS))
        prepared = prepare_volume(load_scan(path), model.config.preprocessing, lesion_mask=lesion_file)
        lesion = mask_on_scan(lesion_file, prepared.native)
        region = prepared.scored
        product = analyse(model, prepared)
        maps = {"intensity": intensity_map(prepared), SCAN_Z_MAP: product.maps[SCAN_Z_MAP],
                **flow_variants(prepared, model, product, region, args.sigmas),
                **pixel_maps(prepared, model, region, args.sigmas, args.gradient, args.restore)}
        for setting in args.guided:
            radius, eps = setting.split(":")
            for own in own_spread.values():
                maps[f"{own}_g{radius}_e{eps}"] = guided_within(maps[own], maps["intensity"], region, int(radius),
                                                                float(eps))
        for w in args.with_scan_z:  # the flow map read against the scan's own brain, added to the scan z
            for name in FLOW_MAPS:
                flow = maps[own_spread[name]]
                maps[f"{SCAN_Z_MAP}+{w:g}*{name}_z"] = maps[SCAN_Z_MAP] + w * intensity_scan_z(flow, region)
        if args.with_min:
            flow_z = {name: intensity_scan_z(maps[own_spread[name]], region) for name in FLOW_MAPS}
            for name in FLOW_MAPS:
                maps[f"min({SCAN_Z_MAP},{name}_z)"] = np.minimum(maps[SCAN_Z_MAP], flow_z[name])
            # the same gate on the intensity (clipped, unsmoothed) read as a z against the scan's brain
            intensity_z = intensity_scan_z(maps["intensity"], region)
            maps["min(intensity_z,llr_z)"] = np.minimum(intensity_z, flow_z["llr"])
            blurred_z = intensity_scan_z(smoothed_within(intensity_z, region, MIN_CONTROL_SIGMAS[1]), region)
            maps[f"min(intensity_z,intensity_z_s{MIN_CONTROL_SIGMAS[1]:g}_z)"] = np.minimum(intensity_z, blurred_z)
            for sigma in MIN_CONTROL_SIGMAS:  # model-free controls: the scan z gated by a blur of itself
                blurred_z = intensity_scan_z(smoothed_within(maps[SCAN_Z_MAP], region, sigma), region)
                maps[f"min({SCAN_Z_MAP},{SCAN_Z_MAP}_s{sigma:g}_z)"] = np.minimum(maps[SCAN_Z_MAP], blurred_z)
            if args.reconstruct:
                blur = f"s{MIN_CONTROL_SIGMAS[1]:g}_z"
                gates = {SCAN_Z_MAP: [f"min({SCAN_Z_MAP},llr_z)", f"min({SCAN_Z_MAP},{SCAN_Z_MAP}_{blur})"],
                         "intensity_z": ["min(intensity_z,llr_z)", f"min(intensity_z,intensity_z_{blur})"]}
                bases = {SCAN_Z_MAP: maps[SCAN_Z_MAP], "intensity_z": intensity_z}
                for base, names in gates.items():
                    for gate in names:
                        for tag, in_plane in (("rec", True), ("rec3d", False)):
                            maps[f"{tag}({base}|{gate})"] = reconstruct_within(maps[gate], bases[base], region,
                                                                               in_plane)
        native_region = to_native(region.astype(np.float32), prepared, mode="nearest") > 0.5
        for name, image in maps.items():
            if args.maps is None or name in args.maps or name in ("intensity", SCAN_Z_MAP) or "_z" in name:
                values.setdefault(name, []).append(to_native(image, prepared)[native_region])
        truth = lesion[native_region]
        labels.append(truth)
        healthy_of.append(healthy_voxels(lesion)[native_region])
        near_of.append(ndimage.binary_dilation(lesion, IN_PLANE_CROSS, iterations=NEAR_VOXELS)[native_region])
        patient_of.append(np.full(truth.size, i, dtype=np.int32))
        if model.folder not in thresholds_of:  # one model reads every patient, or one per cross-fit fold
            thresholds_of[model.folder] = {name: model.healthy_voxel_threshold(product_name, HEALTHY_FPR)
                                           for name, product_name in product_names.items()}
        for name, threshold in thresholds_of[model.folder].items():
            model_thresholds[name].append(np.nan if threshold is None else threshold)
        print(f"{i + 1}/{len(pairs)} {path.name}: {truth.size} voxels, {int(truth.sum())} lesion", flush=True)

    truth, healthy, patient = np.concatenate(labels), np.concatenate(healthy_of), np.concatenate(patient_of)
    near = np.concatenate(near_of)
    result = {"model": str(args.crossfit or args.model), "split": "crossfit" if args.crossfit else args.split,
              "patients": len(pairs), "voxels": int(truth.size),
              "lesion_voxels": int(truth.sum()),
              "dice_ceiling_5%": float(2 * truth.sum() / (2 * truth.sum() + HEALTHY_FPR * healthy.sum())),
              "maps": {}}
    for name, parts in values.items():
        scores = np.concatenate(parts)
        flagged = flags_at_others_threshold(scores, healthy, patient)
        auprc, dice_lopo, threshold = voxel_metrics(scores, truth, healthy, flagged)
        false_flags = flagged & ~truth
        result["maps"][name] = {"voxel_auprc": auprc, "dice_at_5%_healthy_fpr": dice_lopo,
                                "healthy_threshold_5%": threshold, "lesion_flagged": float(flagged[truth].mean()),
                                "false_flags_near": float(near[false_flags].mean()) if false_flags.any() else 0.0}
        for fpr in args.matched_fpr:
            own_threshold = np.quantile(scores[healthy], 1 - fpr)
            result["maps"][name][f"dice_at_own_{fpr:g}_fpr"] = dice(scores > own_threshold, truth)
        if name in model_thresholds and np.isfinite(model_thresholds[name]).all():
            above = scores > np.asarray(model_thresholds[name])[patient]
            result["maps"][name].update({"dice_at_model_threshold": dice(above, truth),
                                         "healthy_fpr_at_model_threshold": float(above[healthy].mean()),
                                         "lesion_flagged_at_model_threshold": float(above[truth].mean())})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"Dice ceiling at 5 % healthy FPR: {result['dice_ceiling_5%']:.3f}")
    for name, m in sorted(result["maps"].items(), key=lambda kv: -kv[1]["voxel_auprc"]):
        print(f"{name:28s} AUPRC {m['voxel_auprc']:.3f}  Dice@5% {m['dice_at_5%_healthy_fpr']:.3f}  lesion flagged "
              f"{m['lesion_flagged']:.3f}  false flags near it {m['false_flags_near']:.3f}")
        if args.matched_fpr:
            print(f"{'':28s} Dice at these patients' own healthy FPR " + ", ".join(
                f"{fpr:g}: {m[f'dice_at_own_{fpr:g}_fpr']:.3f}" for fpr in args.matched_fpr))
        if "dice_at_model_threshold" in m:
            print(f"{'':28s} at the model's threshold: Dice {m['dice_at_model_threshold']:.3f}  healthy FPR "
                  f"{m['healthy_fpr_at_model_threshold']:.3f}  lesion flagged "
                  f"{m['lesion_flagged_at_model_threshold']:.3f}")


if __name__ == "__main__":
    main()
