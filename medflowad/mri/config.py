"""Settings of an MRI model: preprocessing, both models' training, calibration and scan aggregation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from medflowad.config import ConfigError, OutlierConfig, build_dataclass, check_train_precision
from medflowad.data.scans import ScanPreprocessing
from medflowad.flows.glow import GlowConfig
from medflowad.mri.analysis import (
    MAP_SPREADS,
    NORMATIVE_INTENSITY_READS,
    SCAN_Z_AND_LLR_MAP,
    SCAN_Z_MAP,
    SLICE_SCORES,
)
from medflowad.mri.normative import NORMATIVE_MAPS

MODALITIES = ("t1", "t2", "flair", "pd", "ct")
MASK_MAPS = ("llr", SCAN_Z_MAP, SCAN_Z_AND_LLR_MAP, *(f"{name}_normative" for name in NORMATIVE_MAPS))


def _mri_model() -> GlowConfig:
    return GlowConfig(in_channels=1, image_size=(64, 64), levels=3, steps=8, hidden=64)


@dataclass
class MriConfig:
    modality: str = "flair"
    preprocessing: ScanPreprocessing = field(default_factory=ScanPreprocessing)
    model: GlowConfig = field(default_factory=_mri_model)
    batch_size: int = 64
    general_steps: int = 2000
    general_lr: float = 5e-4
    in_steps: int = 1000
    in_lr: float = 2e-4  # fine-tuning from the general model; 1e-3 diverged in our runs
    # Scans with lesion masks train as healthy tissue: "drop_slices" on their lesion-free slices only; "mask" on
    # every slice, the (dilated) lesion's locations left out of the likelihood (measured worse in the LGG bench
    # with the outlier loss, docs/results.md, so not the default).
    lesions: str = "drop_slices"
    translate: float = 0.05
    hflip: bool = True  # brains are roughly left-right symmetric
    outlier: OutlierConfig = field(default_factory=OutlierConfig)
    # Position-aware in-distribution model (medflowad.mri.position): class-conditional priors, one class per
    # brain-level bin; 0: unconditional. The general model (``model``) stays unconditional.
    position_bins: int = 0
    val_fraction: float = 0.2  # healthy subjects held apart for calibration (see split_healthy_scans)
    top_fraction: float = 0.1  # scan score = mean of the top 10 % slice scores (at least one slice)
    # The scan score that flags scans, heads the report and is printed first (analysis.SLICE_SCORES). None:
    # intensity_scan_z for FLAIR models calibrated with it (the scan z map's bright area), else llr.
    scan_score: str | None = None
    # The map `score` thresholds into <id>_anomaly_mask and shows in the report: llr, intensity_scan_z (written as
    # <id>_scan_z), scan_z_and_llr (written as <id>_scan_z_and_llr) or a normative map (written as
    # <id>_normative). None: intensity_scan_z for FLAIR models calibrated with it, else llr_normative in standard
    # space and llr on a scan's own grid.
    mask_map: str | None = None
    fpr: float = 0.05  # default false-positive rate for flags
    # Voxel-level false-positive rate of the anomaly mask on healthy calibration voxels; None: fpr. At 5 %,
    # a 2 mm brain gets about 10,000 false voxels: a lesion is lost among them.
    voxel_fpr: float | None = None
    seed: int = 0
    calibration_seed: int | None = None  # draws the calibration scans; None: seed. Fix it to vary training alone
    device: str = "auto"
    channels_last: bool = False  # NHWC convolutions: a little faster on CPU, equal only to float precision
    # The coupling networks' precision in training steps (medflowad.config.RunConfig.train_precision): bfloat16
    # is faster on CPUs with AMX (GPUs not measured), slower elsewhere; scoring and calibration stay float32.
    train_precision: str = "float32"
    # How the flow maps' per-location values become pixels (analysis.MAP_SPREADS). The presets say "bilinear";
    # a model folder without the key was calibrated on "nearest" maps and keeps them.
    map_spread: str = "nearest"
    # The image the normative intensity (the healthy range) reads (analysis.NORMATIVE_INTENSITY_READS). The presets
    # say "unclipped"; a model folder without the key was calibrated on the clipped model input and keeps it.
    normative_intensity: str = "clipped"
    # Map that image's brain histogram onto the healthy calibration scans' intensity landmarks before it is
    # compared with the healthy range (medflowad.mri.landmarks): scans whose sequence or scanner places the
    # tissues elsewhere between the normalisation's percentiles become comparable. Models calibrated without
    # it have no landmarks and keep it off.
    standardise_intensity: bool = False

    def validate(self) -> None:
        check_train_precision(self.train_precision)
        if self.modality not in MODALITIES:
            raise ConfigError(f"modality must be one of {', '.join(MODALITIES)}, got {self.modality!r}")
        size = self.preprocessing.image_size
        if tuple(self.model.image_size) != (size, size) or self.model.in_channels != 1:
            raise ConfigError(f"model.image_size must be [{size}, {size}] with in_channels 1 "
                              "to match preprocessing.image_size")
        if self.scan_score not in (None, *SLICE_SCORES):
            raise ConfigError(f"scan_score must be one of {', '.join(SLICE_SCORES)} (or null), got {self.scan_score!r}")
        if self.mask_map not in (None, *MASK_MAPS):
            raise ConfigError(f"mask_map must be one of {', '.join(MASK_MAPS)} (or null), got {self.mask_map!r}")
        if self.model.num_classes:
            raise ConfigError("model.num_classes must be 0 (the general model is unconditional); "
                              "set position_bins for a position-aware in-distribution model")
        if self.position_bins < 0 or self.position_bins == 1:
            raise ConfigError(f"position_bins must be 0 (unconditional) or at least 2, got {self.position_bins}")
        if self.position_bins and self.outlier.enabled:
            raise ConfigError("position_bins and the outlier loss do not go together yet (not measured)")
        if self.map_spread not in MAP_SPREADS:
            raise ConfigError(f"map_spread must be one of {', '.join(MAP_SPREADS)}, got {self.map_spread!r}")
        if self.normative_intensity not in NORMATIVE_INTENSITY_READS:
            raise ConfigError(f"normative_intensity must be one of {', '.join(NORMATIVE_INTENSITY_READS)}, "
                              f"got {self.normative_intensity!r}")
        if self.lesions not in ("mask", "drop_slices"):
            raise ConfigError(f"lesions must be mask or drop_slices, got {self.lesions!r}")
        if not 0 < self.val_fraction < 1 or not 0 < self.top_fraction <= 1 or not 0 < self.fpr < 1:
            raise ConfigError("val_fraction, top_fraction and fpr must lie in (0, 1)")
        if self.voxel_fpr is not None and not 0 < self.voxel_fpr < 1:
            raise ConfigError(f"voxel_fpr must lie in (0, 1) (or be null), got {self.voxel_fpr}")
        if min(self.batch_size, self.general_steps, self.in_steps) < 1 or not min(self.general_lr, self.in_lr) >= 0:
            raise ConfigError("batch_size, general_steps and in_steps must be positive, general_lr and in_lr not "
                              "negative")

    @property
    def in_model(self) -> GlowConfig:
        """The in-distribution Glow: the general model's architecture, with one prior per position class."""
        return dataclasses.replace(self.model, num_classes=self.position_bins)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["preprocessing"] = self.preprocessing.to_dict()
        d["model"] = self.model.to_dict()
        return d


def mri_config_from_dict(values: dict, where: str = "mri config") -> MriConfig:
    values = dict(values)
    pre = ScanPreprocessing.from_dict(values.pop("preprocessing", {}))
    config = build_dataclass(MriConfig, values, where)
    config.preprocessing = pre
    config.validate()
    return config


DEFAULT_PRESETS = {"ct": "ct_cpu", "t1": "t1_cpu"}  # by modality; the others: mri_cpu


def default_mri_preset(modality: str) -> str:
    """The preset ``train --modality`` uses without ``--config``: CT's HU window (ct_cpu), T1's measured choices
    (t1_cpu: the normative intensity as map and score, N4, landmarks), and mri_cpu for FLAIR, T2 and PD."""
    return DEFAULT_PRESETS.get(modality, "mri_cpu")


def load_mri_config(name_or_path: str) -> MriConfig:
    path = Path(name_or_path)
    if path.exists():
        text, where = path.read_text(), str(path)
    else:
        resource = resources.files("medflowad.presets_data") / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise ConfigError(f"no MRI config file or preset named {name_or_path!r}")
        text, where = resource.read_text(), f"preset {name_or_path}"
    try:
        return mri_config_from_dict(yaml.safe_load(text) or {}, where)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: invalid YAML ({exc})") from exc
