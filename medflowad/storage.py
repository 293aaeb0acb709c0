"""Model folders and checkpoints: safetensors for tensors, YAML/JSON for everything else, written atomically.

A model folder holds ``model.safetensors`` and ``config.yaml`` (the resolved run configuration, whose
``model`` section rebuilds the architecture). Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medflowad.config import ConfigError, RunConfig, config_from_dict, config_to_dict
from medflowad.flows.glow import Glow

MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.yaml"


class ModelFolderError(ValueError):
    """A model folder that is missing, incomplete or does not match its configuration."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through ``write(tmp_path)`` into a temporary file beside ``path``, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; outputs are for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_yaml(path: Path, data: Any) -> None:
    write_text(path, yaml.safe_dump(data, sort_keys=False))


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ModelFolderError(f"{path}: cannot read safetensors file ({exc})") from exc


def save_model(model: Glow, config: RunConfig, folder: Path) -> None:
    folder = Path(folder)
    write_yaml(folder / MODEL_CONFIG, config_to_dict(config))
    write_tensors(folder / MODEL_WEIGHTS, model.state_dict(), metadata={"format": "medflowad-glow"})


def read_yaml_mapping(path: Path) -> dict:
    """A YAML file of a model or run folder as a mapping (empty file: empty mapping), parsed as data only
    (``safe_load``: no tag can run code); anything else is a ModelFolderError naming the file."""
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelFolderError(f"{path}: cannot read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ModelFolderError(f"{path}: not a text file (byte {exc.start} is not UTF-8)") from exc
    except yaml.YAMLError as exc:  # e.g. a python/object tag: refused without running anything
        raise ModelFolderError(f"{path}: not valid medflowad YAML ({' '.join(str(exc).split())})") from exc
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ModelFolderError(f"{path}: expected a mapping of settings, got {type(values).__name__}")
    return values


def read_model_config(folder: Path) -> RunConfig:
    folder = Path(folder)
    path = folder / MODEL_CONFIG
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: model folder does not exist")
    if not path.exists():
        if (folder / "mri.yaml").is_file():  # an MRI model folder holds two Glow folders, in/ and general/
            raise ModelFolderError(f"{folder}: an MRI model folder; evaluate it with --scans, or name one of its "
                                   f"Glows ({folder / 'in'}, {folder / 'general'})")
        raise ModelFolderError(f"{folder}: not a model folder (no {MODEL_CONFIG})")
    values = read_yaml_mapping(path)
    try:
        return config_from_dict(values, str(path))
    except ConfigError as exc:
        raise ModelFolderError(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}") from exc


PRIOR_PARAMETER = re.compile(r"priors\.\d+\.(mean|log_std)")


def load_weights(model: Glow, path: Path, classes_from_unconditional: bool = False) -> None:
    """Load a state dict saved by :func:`save_model` into ``model``; mismatches are clear errors.

    ``classes_from_unconditional``: an unconditional model's priors start every class's prior of a
    class-conditional ``model`` (fine-tuning a position-aware model from the general one).
    """
    state = read_tensors(path)
    expected = model.state_dict()
    if classes_from_unconditional:
        for key, value in state.items():
            target = expected.get(key)
            if (PRIOR_PARAMETER.fullmatch(key) and target is not None and value.shape[0] == 1
                    and value.shape[1:] == target.shape[1:]):
                state[key] = value.expand_as(target).clone()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    common = sorted(set(state) & set(expected))
    wrong = [k for k in common if state[k].shape != expected[k].shape]
    wrong_dtype = [k for k in common if state[k].dtype != expected[k].dtype]
    if missing or unexpected or wrong or wrong_dtype:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
                                ("wrong dtype", wrong_dtype)) if keys
        )
        raise ModelFolderError(f"{path}: weights do not fit the configured architecture ({detail})")
    non_finite = [k for k in common if state[k].is_floating_point() and not bool(torch.isfinite(state[k]).all())]
    if non_finite:
        raise ModelFolderError(f"{path}: non-finite weights in {', '.join(non_finite[:5])} (a diverged or damaged "
                               "model)")
    model.load_state_dict(state)


def load_model(folder: Path, device: str | torch.device = "cpu") -> tuple[Glow, RunConfig]:
    """Rebuild the Glow of a model folder in eval mode on ``device``."""
    folder = Path(folder)
    config = read_model_config(folder)
    weights = folder / MODEL_WEIGHTS
    if not weights.exists():
        raise ModelFolderError(f"{folder}: no {MODEL_WEIGHTS} (training not finished?)")
    model = Glow(config.model)
    load_weights(model, weights)
    model.to(device).eval()
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, config
