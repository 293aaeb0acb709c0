"""Device selection."""

from __future__ import annotations

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU; an unavailable device is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch finds no CUDA GPU (use --device cpu)")
    return device
