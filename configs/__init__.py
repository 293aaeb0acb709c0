# Installed as the data package medflowad.presets_data so presets work from any install (see pyproject.toml).
