"""pyproject.toml lists every package, so a regular (non-editable) install is complete."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "medflowad").rglob("__init__.py")}
    assert on_disk <= listed, sorted(on_disk - listed)
    assert config["package-dir"] == {"medflowad.cli": "cli", "medflowad.presets_data": "configs"}
