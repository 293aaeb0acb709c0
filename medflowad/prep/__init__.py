"""Preparation of scans before any model sees them: brain extraction, registration to the MNI template,
resampling onto a standard grid, and the way back to each scan's own grid (see :mod:`medflowad.prep.stage`)."""

from medflowad.prep.stage import (
    Preparation,
    companion_path,
    default_cache_dir,
    prepare,
    prepare_volume,
    run_preparation,
    write_entry,
)

__all__ = ["Preparation", "companion_path", "default_cache_dir", "prepare", "prepare_volume", "run_preparation",
           "write_entry"]
