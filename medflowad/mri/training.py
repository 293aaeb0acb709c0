"""Training an MRI model folder (layout: :mod:`medflowad.mri.model`): the healthy scans are split by subject
(:mod:`medflowad.mri.selection`) and prepared (:mod:`medflowad.prep`), their healthy slices written as slice
sets, the general Glow trained on the pool (or copied), the in-distribution Glow fine-tuned from it, and the
pair calibrated on the held-apart scans (:mod:`medflowad.mri.calibration`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medflowad.config import DataConfig, OptimConfig, RunConfig
from medflowad.data.readers import ScanError, absolute_scan_path
from medflowad.data.scans import PreparedScan, ScanPreprocessing
from medflowad.data.slice_sets import SLICES_FILE, load_slice_set_manifest, save_slice_set
from medflowad.devices import resolve_device
from medflowad.mri.calibration import calibrate, calibration_summary, lesion_zone
from medflowad.mri.config import DEFAULT_PRESETS, MriConfig
from medflowad.mri.model import MRI_CONFIG, load_mri_model
from medflowad.mri.normative import calibration_shares, limit_setter_note
from medflowad.mri.position import scan_position_classes
from medflowad.mri.selection import mixed_modality_notes, split_healthy_scans, subject_of
from medflowad.prep import prepare
from medflowad.storage import ModelFolderError, load_model, read_yaml_mapping, write_json, write_tensors, write_yaml
from medflowad.training import distributed, train
from medflowad.training.trainer import CHECKPOINT

TRAINED_ON = "trained_on.json"


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


def check_preprocessing(source: Path, stored: dict | None, config: MriConfig) -> None:
    """A pool or general model prepared otherwise than ``config`` says would give the general model
    other images than the ones it is compared on; refuse it, naming the settings that differ."""
    if stored is None:
        return
    theirs, ours = ScanPreprocessing.from_dict(stored).to_dict(), config.preprocessing.to_dict()
    differing = [f"{key} {theirs[key]} there, {ours[key]} here" for key in ours if theirs.get(key) != ours[key]]
    if differing:
        raise ValueError(f"{source}: prepared with other preprocessing than this model's ({'; '.join(differing)}); "
                         "rebuild it with the config the model trains with (`medflowad pool build ... -c CONFIG`; "
                         "without --config, train --modality uses " + ", ".join(
                             f"{preset} for {modality}" for modality, preset in DEFAULT_PRESETS.items())
                         + " and mri_cpu for the others)")


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
    for note in mixed_modality_notes(healthy_scans, config.modality, pattern, "train"):
        say(f"note: {note}")
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
    note = limit_setter_note(calibration_shares(
        calibration, [absolute_scan_path(path) for split in ("train", "val") for path, _ in prepared[split]]))
    if note:
        say(f"note: {note}")
    summary = calibration_summary(calibration, config.fpr)
    write_json(out / "calibration.json", summary)
    metrics = {
        "modality": config.modality, "train_scans": len(prepared["train"]), "val_scans": len(prepared["val"]),
        "skipped_scans": skipped, "in_model_test_bpd": result.test_bpd,
        "train_slices": healthy_slices["train"], "val_slices": healthy_slices["val"],
        "calibration": summary, "limit_note": note,
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
        train_precision=config.train_precision,
    )


def _copy_model(source: Path, target: Path) -> None:
    load_model(source)  # validates the folder before anything is copied
    target.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.yaml"):
        shutil.copyfile(source / name, target / name)


__all__ = ["HealthySlices", "check_preprocessing", "mri_run_config", "train_mri_model"]
