"""MRI model folders: training both models from scans, and loading for scoring (calibration:
:mod:`medflowad.mri.calibration`; preparing scans: :mod:`medflowad.prep`).

Layout of MODEL_DIR (all that ``medflowad score`` needs)::

    mri.yaml                 modality, preprocessing, scoring settings (readable)
    general/                 general-distribution Glow (model.safetensors + config.yaml)
    in/                      in-distribution Glow, fine-tuned from general/
    calibration.safetensors  healthy validation slice, scan and voxel scores
    calibration.json         the same summarised: counts and thresholds at the configured FPR
    data/healthy_train/      the healthy training slices (slice set) and their manifest
    data/healthy_val/        the healthy validation slices
    metrics.json, train.log
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from medflowad.config import ConfigError, DataConfig, OptimConfig, RunConfig
from medflowad.data.readers import ScanError, absolute_scan_path, find_scans, scan_id, split_series
from medflowad.data.scans import PreparedScan, ScanPreprocessing
from medflowad.data.slice_sets import SLICES_FILE, load_slice_set_manifest, save_slice_set
from medflowad.devices import resolve_device
from medflowad.flows.glow import Glow
from medflowad.mri.analysis import (
    MAP_TYPES,
    NORMATIVE_INTENSITY_READS,
    OPTIONAL_SCORES,
    SLICE_SCORES,
    ScanAnalysis,
    analyse_scan,
)
from medflowad.mri.calibration import calibrate, calibration_summary, lesion_zone, validate_calibration
from medflowad.mri.config import MriConfig, mri_config_from_dict
from medflowad.mri.normative import (
    MODEL_FREE,
    NORMATIVE_MAPS,
    beyond_healthy_range,
    is_healthy_range,
    normative_map,
    slice_levels,
    slice_top_mean,
)
from medflowad.mri.position import scan_position_classes
from medflowad.prep import prepare
from medflowad.storage import (
    ModelFolderError,
    load_model,
    read_tensors,
    read_yaml_mapping,
    write_json,
    write_tensors,
    write_yaml,
)
from medflowad.training import distributed, train
from medflowad.training.trainer import CHECKPOINT

log = logging.getLogger("medflowad.mri")
MRI_CONFIG = "mri.yaml"
# What `score` needs of a model folder (what a bundled model or an exported bundle ships).
SCORING_FILES = (MRI_CONFIG, "general/config.yaml", "general/model.safetensors", "in/config.yaml",
                 "in/model.safetensors", "calibration.safetensors", "calibration.json")
TRAINED_ON = "trained_on.json"
NAME_TOKENS = {"t1": {"t1", "t1w", "mprage"}, "t2": {"t2", "t2w"}, "pd": {"pd", "pdw"}, "ct": {"ct"}}
BIDS_SUBJECT = re.compile(r"(sub-[A-Za-z0-9]+)_")  # BIDS file names start with the subject entity


@dataclass
class MriModel:
    config: MriConfig
    in_model: Glow
    general_model: Glow
    calibration: dict[str, np.ndarray]  # "slice/<score>", "scan/<score>", "voxel/<map>"
    folder: Path


def matches_pattern(scan: Path, pattern: str) -> bool:
    """Case-insensitive glob on the file name or the scan id (a DICOM series' id holds its description)."""
    pattern = pattern.lower()
    return fnmatch.fnmatch(scan.name.lower(), pattern) or fnmatch.fnmatch(scan_id(scan).lower(), pattern)


def listed(names: Sequence[str], most: int = 3) -> str:
    """The first ``most`` names, comma-separated, ending in ', ...' when there are more (for messages)."""
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def modality_in_name(scan: Path) -> str | None:
    """The modality a scan's name or series description states (``FLAIR``, ``T1w``, ``MPRAGE``, ``T2``,
    ``PD``, ``CT``), or None when it states none or several. FLAIR wins over T2 (``T2_FLAIR`` is FLAIR)."""
    name = scan_id(scan).lower()
    if "flair" in name:
        return "flair"
    tokens = set(re.split(r"[^a-z0-9]+", name))
    named = {modality for modality, words in NAME_TOKENS.items() if tokens & words}
    return named.pop() if len(named) == 1 else None


def select_scans(inputs: Sequence[str | Path], pattern: str | None, mask_replace: tuple[str, str] | None) -> list[Path]:
    scans = find_scans(inputs)
    if pattern:
        scans = [s for s in scans if matches_pattern(s, pattern)]
    if mask_replace:
        scans = [s for s in scans if mask_replace[1] not in s.name]
    return scans


@dataclass
class HealthySlices:
    """The healthy tissue of some prepared scans, as the in-distribution model trains on it."""

    images: torch.Tensor  # uint8 (N, 1, S, S)
    source_index: torch.Tensor  # (N,) which scan each slice comes from
    masks: torch.Tensor | None  # uint8 (N, 1, S, S), 0 where a pixel is left out of the likelihood; None: none is
    labels: torch.Tensor | None  # (N,) position classes (medflowad.mri.position); None: unconditional model


def _healthy_slices(prepared: list[PreparedScan], lesions: str, config: MriConfig | None = None) -> HealthySlices:
    """The healthy tissue in ``prepared``, with position classes when ``config`` has ``position_bins``.

    ``lesions="drop_slices"``: the scored slices without lesion. ``"mask"``: every scored slice, with a mask
    that is 0 within LESION_MARGIN pixels of a lesion (the model learns healthy tissue at every brain level);
    masks are None when no scan has a lesion.
    """
    images, index, masks, labels = [], [], [], []
    for i, p in enumerate(prepared):
        keep = p.keep & ~p.lesion_slices if (lesions == "drop_slices" and p.lesion_slices is not None) else p.keep
        picked = np.nonzero(keep)[0]
        images.append(p.slices[picked])
        index += [i] * len(picked)
        classes = scan_position_classes(config, p) if config is not None else None
        if classes is not None:
            labels.append(torch.from_numpy(classes[picked]).to(torch.int64))
        if lesions == "mask" and p.lesion is not None:
            masks.append(torch.from_numpy(~lesion_zone(p)[picked])[:, None].to(torch.uint8))
        else:
            masks.append(torch.ones(len(picked), 1, *p.slices.shape[-2:], dtype=torch.uint8))
    if not index:
        raise ValueError("no usable healthy slices (all slices lack foreground or contain lesions)")
    mask = torch.cat(masks)
    return HealthySlices(torch.cat(images), torch.tensor(index), None if bool(mask.all()) else mask,
                         torch.cat(labels) if labels else None)


def subject_of(scan: Path) -> str:
    """Who a scan belongs to, as far as its name tells: the BIDS subject when the file (or DICOM folder) is
    named ``sub-<label>_...`` (one key for all its sessions, under ``.../sub-<label>/`` or side by side),
    otherwise the visit: the DICOM folder of a series, or the file itself."""
    location = split_series(scan)[0]
    match = BIDS_SUBJECT.match(location.name)
    if match is None:
        return str(location)
    subject = match.group(1)
    root = next((folder.parent for folder in location.parents if folder.name == subject), location.parent)
    return str(root / subject)


def split_healthy_scans(
    healthy: Sequence[str | Path], config: MriConfig, pattern: str | None = None,
    mask_replace: tuple[str, str] | None = None,
) -> tuple[list[Path], list[Path]]:
    """(training scans, scans held apart for calibration) among the healthy scans that training finds:
    a draw of ``val_fraction`` of their subjects (:func:`subject_of`), seeded by ``calibration_seed``
    (default ``seed``). All scans of a subject are drawn together, so that no one calibrates what they
    trained: the series of one visit, and the sessions of one BIDS subject."""
    scans = select_scans(healthy, pattern, mask_replace)
    subject = {scan: subject_of(scan) for scan in scans}
    subjects = list(dict.fromkeys(subject.values()))
    if len(subjects) < 2:
        raise ValueError(f"need healthy scans of at least 2 subjects or visits (one for calibration), found "
                         f"{len(subjects)}{f' ({subjects[0]})' if subjects else ''}")
    seed = config.seed if config.calibration_seed is None else config.calibration_seed
    order = torch.randperm(len(subjects), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(config.val_fraction * len(subjects)))
    held_apart = {subjects[i] for i in order[:n_val]}
    return (sorted(s for s in scans if subject[s] not in held_apart),
            sorted(s for s in scans if subject[s] in held_apart))


def check_preprocessing(source: Path, stored: dict | None, config: MriConfig) -> None:
    """A pool or general model prepared otherwise than ``config`` says would give the general model
    other images than the ones it is compared on; refuse it, naming the settings that differ."""
    if stored is None:
        return
    theirs, ours = ScanPreprocessing.from_dict(stored).to_dict(), config.preprocessing.to_dict()
    differing = [f"{key} {theirs[key]} there, {ours[key]} here" for key in ours if theirs.get(key) != ours[key]]
    if differing:
        raise ValueError(f"{source}: prepared with other preprocessing than this model's ({'; '.join(differing)}); "
                         "rebuild it with the same --config")


def train_mri_model(
    config: MriConfig, healthy: Sequence[str | Path], out: Path, pool: Path | None = None,
    general_model: Path | None = None, pattern: str | None = None, mask_replace: tuple[str, str] | None = None,
    show_progress: bool = True, echo: Callable[[str], None] = print,
) -> dict:
    """Train (or resume) the general and in-distribution models and calibrate; returns metrics.

    Under torchrun (``torchrun ... -m medflowad train --modality ...``) rank 0 prepares the scans, writes the
    slice sets and calibrates; every rank trains both models (:mod:`medflowad.training.distributed`)."""
    config.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    group = distributed.init(resolve_device(config.device))
    say = echo if group.is_main else (lambda message: None)
    if general_model is None and pool is None:
        raise ValueError("give --pool (to train the general model) or --general-model (a trained one)")
    if pool is not None:
        check_preprocessing(Path(pool), load_slice_set_manifest(Path(pool)).get("preprocessing"), config)
    if general_model is not None and (Path(general_model).parent / MRI_CONFIG).is_file():
        stored = read_yaml_mapping(Path(general_model).parent / MRI_CONFIG)
        check_preprocessing(Path(general_model), stored.get("preprocessing"), config)
    train_scans, val_scans = split_healthy_scans(healthy, config, pattern, mask_replace)
    healthy_scans = train_scans + val_scans
    mixed = {  # healthy scans that may be of another modality than the model's
        "are series of DICOM folders holding several series":
            [s for s in healthy_scans if pattern is None and split_series(s)[1] is not None],
        f"are named as another modality than {config.modality}":
            [s for s in healthy_scans if modality_in_name(s) not in (None, config.modality)],
    }
    for what, scans in mixed.items():
        if scans:
            say(f"note: {len(scans)} of {len(healthy_scans)} healthy scans {what} "
                f"({listed([scan_id(s) for s in scans])}); all train the {config.modality} model. To keep only "
                f"{config.modality} scans, pass a pattern (e.g. --pattern '*{config.modality}*').")
    general_dir = out / "general"
    if group.is_main:  # under torchrun, rank 0 prepares the scans; every rank trains on the slice sets it writes
        prepared, skipped, healthy_slices = _prepare_healthy_slices(config, train_scans, val_scans, out, pool,
                                                                    mask_replace, say)
        write_yaml(out / MRI_CONFIG, config.to_dict())
        if general_model is not None:
            _copy_model(Path(general_model), general_dir)
    distributed.barrier(group)
    if general_model is None:
        say(f"training the general model on {pool}")
        train(mri_run_config(config, train_spec=str(pool), steps=config.general_steps, lr=config.general_lr),
              general_dir, show_progress=show_progress)
    general_cfg = load_model(general_dir)[1]
    if general_cfg.model != config.model:
        raise ModelFolderError(f"{general_dir}: general model architecture differs from the MRI config's model")

    say("fine-tuning the in-distribution model on healthy slices")
    in_run = mri_run_config(config, train_spec=str(out / "data" / "healthy_train"), steps=config.in_steps,
                            lr=config.in_lr, test_spec=str(out / "data" / "healthy_val"), init_from=str(general_dir),
                            position_aware=True)
    if config.outlier.enabled:
        if pool is None:
            raise ValueError("the outlier loss needs --pool (general samples)")
        in_run.outlier = config.outlier
        in_run.general_model = str(general_dir)
        in_run.data.general = str(pool)
    result = train(in_run, out / "in", show_progress=show_progress)
    if not group.is_main:
        distributed.barrier(group)  # rank 0 calibrates
        return json.loads((out / "metrics.json").read_text())

    model = load_mri_model(out, calibrated=False)
    calibration = calibrate(model, [p for _, p in prepared["val"]], [p for _, p in prepared["train"]],
                            [subject_of(path) for split in ("train", "val") for path, _ in prepared[split]])
    write_tensors(out / "calibration.safetensors", {k: torch.from_numpy(v) for k, v in calibration.items()})
    summary = calibration_summary(calibration, config.fpr)
    write_json(out / "calibration.json", summary)
    metrics = {
        "modality": config.modality, "train_scans": len(prepared["train"]), "val_scans": len(prepared["val"]),
        "skipped_scans": skipped, "in_model_test_bpd": result.test_bpd,
        "train_slices": healthy_slices["train"], "val_slices": healthy_slices["val"],
        "calibration": summary,
    }
    write_json(out / "metrics.json", metrics)
    distributed.barrier(group)
    return metrics


def _prepare_healthy_slices(
    config: MriConfig, train_scans: list[Path], val_scans: list[Path], out: Path, pool: Path | None,
    mask_replace: tuple[str, str] | None, say: Callable[[str], None],
) -> tuple[dict[str, list], list[dict], dict[str, int]]:
    """Prepare the healthy scans and write the slice sets both models train and validate on: returns the
    prepared scans by split (for calibration), the scans skipped with their reasons, and slice counts."""
    prepared: dict[str, list] = {"train": [], "val": []}
    skipped = []
    for split, paths in (("train", train_scans), ("val", val_scans)):
        for path in paths:
            try:
                # Only the model-grid slices are needed from here on; dropping the native volume keeps
                # memory at a few MB per scan even for 1 mm volumes.
                scan = prepare(path, config.preprocessing, mask_replace)
                prepared[split].append((path, dataclasses.replace(scan, native=None, brain=None)))
            except ScanError as exc:
                skipped.append({"scan": str(path), "error": str(exc)})
                say(f"skipped {path}: {exc}")
    for split in ("train", "val"):
        if not prepared[split]:
            raise ValueError(f"no readable {split} scans")
    _refuse_other_data(out, {split: [absolute_scan_path(path) for path, _ in prepared[split]]
                             for split in ("train", "val")}, pool)
    healthy_slices = {}
    for split in ("train", "val"):
        # Calibration scans give the validation bits/dim on lesion-free slices; calibrate() takes their healthy parts.
        lesions = config.lesions if split == "train" else "drop_slices"
        healthy = _healthy_slices([p for _, p in prepared[split]], lesions, config)
        healthy_slices[split] = len(healthy.source_index)
        save_slice_set(out / "data" / f"healthy_{split}", healthy.images, healthy.source_index, {
            "kind": f"healthy-{split}", "modality": config.modality, "lesions": lesions,
            "masked_pixels": int((healthy.masks == 0).sum()) if healthy.masks is not None else 0,
            "position_bins": config.position_bins,
            "sources": [{"path": str(path), "slices": int((healthy.source_index == i).sum())}
                        for i, (path, _) in enumerate(prepared[split])],
        }, masks=healthy.masks, labels=healthy.labels)
    return prepared, skipped, healthy_slices


def _refuse_other_data(out: Path, healthy: dict[str, list[str]], pool: Path | None) -> None:
    """Record what the models in ``out`` train on (``data/trained_on.json``: the healthy scans and the pool's
    slices), and refuse a rerun that would resume or reuse them with other data: the data's paths stay the
    same, so training alone would not notice, and the folder would describe data its models never saw."""
    record = out / "data" / TRAINED_ON
    now = {"healthy_train": healthy["train"], "healthy_val": healthy["val"],
           "pool_slices_sha256": _file_sha256(Path(pool) / SLICES_FILE) if pool is not None else None}
    if record.is_file() and any((out / part / "model.safetensors").exists() or (out / part / CHECKPOINT).exists()
                                for part in ("general", "in")):
        try:
            before = json.loads(record.read_text())
            before.get("healthy_train")
        except (OSError, ValueError, AttributeError) as exc:
            raise ModelFolderError(f"{record}: not a readable record of the training data ({exc}); delete {out} "
                                   "to start again") from exc
        changed = [key for key, value in now.items() if before.get(key) != value]
        if changed:
            raise ValueError(f"{out} holds models trained on other data (changed: {', '.join(changed)}); "
                             "choose another --out, or delete that folder to start again")
    write_json(record, now)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mri_run_config(config: MriConfig, train_spec: str, steps: int, lr: float, test_spec: str | None = None,
                   init_from: str | None = None, position_aware: bool = False) -> RunConfig:
    """The training run of one of an MRI model's Glows (or of a 2D model trained like them);
    ``position_aware``: the in-distribution model, class-conditional when the config has ``position_bins``."""
    conditional = position_aware and config.position_bins > 0
    return RunConfig(
        model=config.in_model if conditional else config.model, supervised=conditional,
        data=DataConfig(train=train_spec, test=test_spec, hflip=config.hflip, translate=config.translate,
                        test_limit=0),
        optim=OptimConfig(lr=lr, steps=steps, batch_size=config.batch_size,
                          warmup_steps=min(200, max(1, steps // 10))),
        init_from=init_from, seed=config.seed, device=config.device,
        checkpoint_every=max(50, steps // 10), eval_every=max(50, steps // 4), channels_last=config.channels_last,
    )


def _copy_model(source: Path, target: Path) -> None:
    load_model(source)  # validates the folder before anything is copied
    target.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.yaml"):
        shutil.copyfile(source / name, target / name)


def bundled_models() -> list[str]:
    """Names of the models shipped inside the package (see medflowad/models/)."""
    root = resources.files("medflowad") / "models"
    return sorted(p.name for p in root.iterdir() if (p / MRI_CONFIG).is_file()) if root.is_dir() else []


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """A model folder on disk, or the name of a bundled model (``demo``); a folder wins over a name."""
    path = Path(name_or_path)
    if path.exists():
        return path
    if str(name_or_path) in bundled_models():
        return Path(str(resources.files("medflowad") / "models" / str(name_or_path)))
    names = ", ".join(bundled_models()) or "none"
    raise ModelFolderError(f"{path}: no such model folder, and not a bundled model (bundled: {names})")


def model_fingerprint(folder: Path | str) -> str:
    """SHA-256 over the files that scoring reads (:data:`SCORING_FILES`): equal exactly when two folders
    score alike, wherever they lie."""
    folder = resolve_model_dir(folder)
    digest = hashlib.sha256()
    for name in SCORING_FILES:
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return digest.hexdigest()


def load_mri_model(folder: Path | str, device: str = "auto", calibrated: bool = True) -> MriModel:
    """Load an MRI model folder, or a bundled model by name (see :func:`resolve_model_dir`)."""
    folder = resolve_model_dir(folder)
    path = folder / MRI_CONFIG
    if not path.exists():
        raise ModelFolderError(f"{folder}: not an MRI model folder (no {MRI_CONFIG}; train with --modality)")
    values = read_yaml_mapping(path)
    try:
        config = mri_config_from_dict(values, str(path))
    except ConfigError as exc:
        raise ModelFolderError(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}") from exc
    dev = resolve_device(device)
    in_model, _ = load_model(folder / "in", dev)
    general_model, _ = load_model(folder / "general", dev)
    calibration: dict[str, np.ndarray] = {}
    if calibrated:
        if not (folder / "calibration.safetensors").exists():
            raise ModelFolderError(f"{folder}: no calibration.safetensors (training did not finish)")
        calibration = {k: v.numpy() for k, v in read_tensors(folder / "calibration.safetensors").items()}
        try:
            validate_calibration(calibration, config.preprocessing.image_size, str(folder / "calibration.safetensors"))
        except ValueError as exc:
            raise ModelFolderError(str(exc)) from exc
        expected = {f"{level}/{n}" for level in ("slice", "scan") for n in SLICE_SCORES if n not in OPTIONAL_SCORES}
        expected |= {f"voxel/{n}" for n in MAP_TYPES}
        if config.scan_score is not None:
            expected.add(f"scan/{config.scan_score}")
        if config.mask_map is not None:
            expected.add(f"voxel/{config.mask_map}")
        missing = sorted(expected - set(calibration))
        if missing:
            raise ModelFolderError(f"{folder}: calibration lacks {', '.join(missing)} (made by an older "
                                   "medflowad); rerun `medflowad train --modality` with --general-model")
    return MriModel(config, in_model, general_model, calibration, folder)


def analyse(model: MriModel, prepared: PreparedScan, batch_size: int = 64) -> ScanAnalysis:
    """Scores and maps of a prepared scan, with the normative maps (``<map>_normative``) when the model's
    calibration holds per-location statistics (models calibrated before normative maps have none)."""
    analysis = analyse_scan(prepared, model.in_model, model.general_model, batch_size,
                            scan_position_classes(model.config, prepared), model.config.map_spread)
    standard = model.config.preprocessing.space == "standard"
    level = slice_levels(prepared, standard)
    region = prepared.foreground & prepared.keep[:, None, None]
    for name in NORMATIVE_MAPS:
        centre = model.calibration.get(f"normative/{name}/centre")
        if centre is None:
            continue
        spread = model.calibration[f"normative/{name}/spread"]
        if is_healthy_range(model.calibration, name):  # the intensity (older calibrations: its z-score only)
            image = NORMATIVE_INTENSITY_READS[model.config.normative_intensity](prepared)
            analysis.maps[f"{name}_normative"] = beyond_healthy_range(
                image, region, level, model.calibration[f"normative/{name}/low"],
                model.calibration[f"normative/{name}/high"], spread)
        else:
            analysis.maps[f"{name}_normative"] = normative_map(analysis.maps[name], region, level, centre, spread)
    if f"{MODEL_FREE}_normative" in analysis.maps:
        analysis.slice_scores[f"{MODEL_FREE}_normative"] = slice_top_mean(analysis.maps[f"{MODEL_FREE}_normative"],
                                                                          region)
    return analysis


__all__ = ["MriModel", "analyse", "bundled_models", "load_mri_model", "model_fingerprint",
           "resolve_model_dir", "select_scans", "train_mri_model"]
