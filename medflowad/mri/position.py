r"""Position-aware in-distribution models: a slice is compared with healthy slices of the same brain level.

With ``position_bins = K > 0`` in an MRI config, the in-distribution Glow has class-conditional priors
(METHOD.md's supervised setting) whose class is the slice's brain level in K equal bins,

.. math:: c(z) = \lfloor K\, \ell(z) / N \rfloor,

where :math:`\ell(z)` is the slice's level and N the number of levels (:func:`medflowad.mri.normative.slice_levels`:
in standard space the slice index of the standard grid, on a scan's own grid its relative position among the
scored slices). Training maximises :math:`\log p(x \mid c)` of each healthy slice under its own class; scoring
evaluates every slice under its own class, so ``llr = log p_g(x) - log p_in(x | c)`` and the maps are
per-location contributions under that class. The general model stays unconditional. The priors start from the
general model's (every class alike) when the in-distribution model is fine-tuned from it.
"""

from __future__ import annotations

import numpy as np

from medflowad.data.scans import PreparedScan
from medflowad.mri.config import MriConfig
from medflowad.mri.normative import level_count, slice_levels


def position_classes(prepared: PreparedScan, standard: bool, bins: int) -> np.ndarray:
    """(Z,) the position class (0..bins-1) of every slice; -1 for slices that are not scored."""
    if bins < 1:
        raise ValueError(f"bins must be positive, got {bins}")
    levels = slice_levels(prepared, standard)
    count = level_count(prepared, standard)
    return np.where(levels >= 0, np.minimum(levels * bins // count, bins - 1), -1)


def scan_position_classes(config: MriConfig, prepared: PreparedScan) -> np.ndarray | None:
    """The position classes of a scan's slices under an MRI model's config; None for an unconditional model."""
    if not config.position_bins:
        return None
    return position_classes(prepared, config.preprocessing.space == "standard", config.position_bins)
