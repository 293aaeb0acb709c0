"""Conversions between image bytes, model inputs and likelihood units."""

from __future__ import annotations

import math

import torch

BINS = 256


def to_model_input(images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 pixels k in 0..255 -> k/256 - 0.5 + u/256.

    ``noise`` is u in [0, 1) of the same shape (uniform dequantisation in training); ``None`` uses the
    bin centre u = 1/2, so evaluation scores are deterministic.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels, got {images.dtype}")
    x = images.float()
    x = x + (0.5 if noise is None else noise)
    return x / BINS - 0.5


def bits_per_dim(log_prob: torch.Tensor, num_dims: int | torch.Tensor) -> torch.Tensor:
    """Discrete negative log-likelihood in bits per dimension: (-log p(x) + D ln 256) / (D ln 2).

    ``num_dims`` may be a tensor of per-image dimension counts (the masked likelihood's kept dimensions)."""
    return (-log_prob + num_dims * math.log(BINS)) / (num_dims * math.log(2))
