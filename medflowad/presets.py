"""Named configuration presets shipped with the package (the repository's configs/ folder)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from medflowad.config import ConfigError, RunConfig, config_from_dict, load_config


def preset_names() -> list[str]:
    folder = resources.files("medflowad.presets_data")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset_or_file(name_or_path: str) -> RunConfig:
    """A YAML path if it exists or ends in .yaml/.yml, else a preset name."""
    if Path(name_or_path).exists() or name_or_path.endswith((".yaml", ".yml")):
        return load_config(name_or_path)
    resource = resources.files("medflowad.presets_data") / f"{name_or_path}.yaml"
    if not resource.is_file():
        raise ConfigError(f"no config file or preset named {name_or_path!r} (presets: {', '.join(preset_names())})")
    return config_from_dict(yaml.safe_load(resource.read_text()) or {}, f"preset {name_or_path}")
