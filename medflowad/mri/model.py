"""MRI model folders: what they hold, loading one for scoring, and one prepared scan's scores and maps
(training: :mod:`medflowad.mri.training`; calibration: :mod:`medflowad.mri.calibration`; which scans:
:mod:`medflowad.mri.selection`; preparing scans: :mod:`medflowad.prep`).

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

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from medflowad.config import ConfigError
from medflowad.data.scans import PreparedScan
from medflowad.devices import resolve_device
from medflowad.flows.glow import Glow
from medflowad.mri.analysis import (
    MAP_TYPES,
    NORMATIVE_INTENSITY_READS,
    OPTIONAL_SCORES,
    SLICE_SCORES,
    ScanAnalysis,
    analyse_scan,
    threshold_at_fpr,
)
from medflowad.mri.calibration import validate_calibration
from medflowad.mri.config import MriConfig, mri_config_from_dict
from medflowad.mri.landmarks import standardise
from medflowad.mri.normative import (
    MODEL_FREE,
    NORMATIVE_MAPS,
    beyond_healthy_range,
    beyond_share,
    is_healthy_range,
    normative_map,
    slice_levels,
    slice_top_mean,
)
from medflowad.mri.position import scan_position_classes
from medflowad.storage import ModelFolderError, load_model, read_tensors, read_yaml_mapping

MRI_CONFIG = "mri.yaml"
RECALIBRATION_FILE = "recalibration.json"  # written by `medflowad calibrate` (medflowad.mri.recalibration)
# What `score` needs of a model folder (what a bundled model or an exported bundle ships).
SCORING_FILES = (MRI_CONFIG, "general/config.yaml", "general/model.safetensors", "in/config.yaml",
                 "in/model.safetensors", "calibration.safetensors", "calibration.json")


@dataclass
class MriModel:
    config: MriConfig
    in_model: Glow
    general_model: Glow
    calibration: dict[str, np.ndarray]  # "slice/<score>", "scan/<score>", "voxel/<map>"
    folder: Path

    def healthy_voxel_threshold(self, name: str, fpr: float) -> float | None:
        """The value that ``fpr`` of the calibration scans' healthy voxels exceed for map ``name``; None where the
        calibration holds no healthy voxels of that map (one made before the map existed)."""
        healthy = self.calibration.get(f"voxel/{name}")
        return threshold_at_fpr(healthy, fpr) if healthy is not None else None


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
        if config.standardise_intensity:
            expected.add(f"normative/{MODEL_FREE}/landmarks")
        missing = sorted(expected - set(calibration))
        if missing:
            raise ModelFolderError(f"{folder}: calibration lacks {', '.join(missing)} (made by an older "
                                   "medflowad); calibrate it anew on healthy scans (`medflowad calibrate`) or rerun "
                                   "`medflowad train --modality` with --general-model")
    return MriModel(config, in_model, general_model, calibration, folder)


def analyse(model: MriModel, prepared: PreparedScan, batch_size: int = 64) -> ScanAnalysis:
    """Scores and maps of a prepared scan, with the normative maps (``<map>_normative``) when the model's
    calibration holds per-location statistics (models calibrated before normative maps have none)."""
    analysis = analyse_scan(prepared, model.in_model, model.general_model, batch_size,
                            scan_position_classes(model.config, prepared), model.config.map_spread)
    standard = model.config.preprocessing.space == "standard"
    level = slice_levels(prepared, standard)
    region = prepared.scored
    for name in NORMATIVE_MAPS:
        centre = model.calibration.get(f"normative/{name}/centre")
        if centre is None:
            continue
        spread = model.calibration[f"normative/{name}/spread"]
        if is_healthy_range(model.calibration, name):  # the intensity (older calibrations: its z-score only)
            image = NORMATIVE_INTENSITY_READS[model.config.normative_intensity](prepared)
            if model.config.standardise_intensity:
                image = standardise(image, region, model.calibration[f"normative/{name}/landmarks"])
            analysis.maps[f"{name}_normative"] = beyond_healthy_range(
                image, region, level, model.calibration[f"normative/{name}/low"],
                model.calibration[f"normative/{name}/high"], spread)
            analysis.beyond_range_share = beyond_share(analysis.maps[f"{name}_normative"], region)
        else:
            analysis.maps[f"{name}_normative"] = normative_map(analysis.maps[name], region, level, centre, spread)
    if f"{MODEL_FREE}_normative" in analysis.maps:
        analysis.slice_scores[f"{MODEL_FREE}_normative"] = slice_top_mean(analysis.maps[f"{MODEL_FREE}_normative"],
                                                                          region)
    return analysis


__all__ = ["MriModel", "analyse", "bundled_models", "load_mri_model", "model_fingerprint", "resolve_model_dir"]
