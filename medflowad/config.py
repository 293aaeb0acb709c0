"""Run configuration: nested dataclasses read from and written to readable YAML."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medflowad.flows.glow import GlowConfig


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file or key."""


@dataclass
class DataConfig:
    """Where the images come from and how they are augmented (natural-image runs)."""

    train: str | None = None  # data set spec, see medflowad.data.natural
    test: str | None = None  # held-out set for bits/dim during and after training
    general: str | None = None  # general-distribution samples for the outlier loss
    hflip: bool = True
    translate: float = 0.1  # fraction of the image size
    test_limit: int = 2000  # images of the test set used for the bits/dim report (0 = all)


@dataclass
class OptimConfig:
    optimizer: str = "adamax"  # adamax | adam
    lr: float = 5e-4
    weight_decay: float = 5e-5
    warmup_steps: int = 200
    batch_size: int = 64
    steps: int = 2000
    max_grad_norm: float = 100.0  # on the bits/dim loss; 0 disables clipping


@dataclass
class OutlierConfig:
    """Outlier loss against a frozen general model (METHOD.md); weights are per published defaults."""

    enabled: bool = False
    kind: str = "bce"  # bce | margin
    temperature: float = 1000.0  # T, nats
    weight: float = 6000.0  # w
    margin: float = 0.0  # m, nats (margin variant)
    batch_size: int = 64  # general samples per step
    # bce at every location of every scale instead of on the image's sum (training/losses.py); not the paper's
    per_location: bool = False


TRAIN_PRECISIONS = ("float32", "bfloat16")  # RunConfig.train_precision


def check_train_precision(precision: str) -> None:
    """Refuse a ``train_precision`` other than TRAIN_PRECISIONS (run configs and MRI configs alike)."""
    if precision not in TRAIN_PRECISIONS:
        raise ConfigError(f"train_precision must be one of {', '.join(TRAIN_PRECISIONS)}, got {precision!r}")


@dataclass
class RunConfig:
    model: GlowConfig = field(default_factory=GlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    outlier: OutlierConfig = field(default_factory=OutlierConfig)
    supervised: bool = False  # class-conditional priors (model.num_classes must be set)
    init_from: str | None = None  # model folder whose weights start this run (fine-tuning)
    general_model: str | None = None  # frozen general model folder (outlier / supervised losses, llr)
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 500
    eval_every: int = 500
    # NHWC layout of the convolutions: the same numbers to float precision, at another speed. Measured on
    # 2 CPU cores (docs/speed.md): 10-13 % more training images/s for the MRI and CIFAR CPU presets.
    channels_last: bool = False
    # Precision of the coupling networks' convolutions in training steps: "bfloat16" runs them under autocast
    # (much faster where the hardware multiplies bfloat16 natively: CPUs with AMX or AVX512-BF16; GPUs with
    # bfloat16 support, not measured; slower elsewhere), the flow's affine maps, log-determinants and loss stay
    # float32; evaluation and scoring always compute in float32. docs/speed.md measures speed and test bits/dim.
    train_precision: str = "float32"

    def validate(self) -> None:
        check_train_precision(self.train_precision)
        if self.optim.optimizer not in ("adamax", "adam"):
            raise ConfigError(f"optim.optimizer must be 'adamax' or 'adam', got {self.optim.optimizer!r}")
        if self.outlier.kind not in ("bce", "margin"):
            raise ConfigError(f"outlier.kind must be 'bce' or 'margin', got {self.outlier.kind!r}")
        if self.outlier.enabled and not self.data.general:
            raise ConfigError("the outlier loss needs general samples: set data.general")
        if self.outlier.enabled and self.outlier.kind == "bce" and not self.general_model:
            raise ConfigError("the outlier loss (kind bce) needs general_model, a trained model folder")
        if self.outlier.enabled and self.outlier.temperature <= 0:
            raise ConfigError("outlier.temperature must be positive")
        if self.outlier.enabled and self.outlier.per_location and (self.outlier.kind != "bce" or self.supervised):
            raise ConfigError("outlier.per_location needs kind bce and an unconditional model (a class mixture has "
                              "no per-location contributions)")
        if self.supervised and self.model.num_classes < 2:
            raise ConfigError("supervised training needs model.num_classes >= 2")
        if not self.supervised and self.model.num_classes:
            raise ConfigError("model.num_classes is set but supervised is false")
        if self.optim.steps < 1 or self.optim.batch_size < 1:
            raise ConfigError("optim.steps and optim.batch_size must be positive")
        if not self.optim.lr >= 0:  # 0 is allowed (nothing moves); negative or NaN is a mistake
            raise ConfigError(f"optim.lr must not be negative, got {self.optim.lr}")


def build_dataclass(cls: type, values: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, recursively; unknown keys and wrong types are errors."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_dataclass(hint, value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, hint, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is tuple:
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def config_from_dict(values: dict, where: str = "config") -> RunConfig:
    config = build_dataclass(RunConfig, values, where)
    config.validate()
    return config


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
    return config_from_dict(values, str(path))


def config_to_dict(config: RunConfig) -> dict:
    out = dataclasses.asdict(config)
    out["model"] = config.model.to_dict()
    return out


def with_overrides(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Apply dotted overrides such as ``{"optim.lr": 2e-4, "data.train": "x.zip"}``; ``None`` values are skipped."""
    values = config_to_dict(config)
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = values
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        if leaf not in node:
            raise ConfigError(f"unknown setting {dotted}")
        node[leaf] = value
    return config_from_dict(values, "config with overrides")
