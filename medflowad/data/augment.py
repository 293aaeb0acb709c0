"""Batch augmentations on uint8 image tensors, driven by an explicit generator (exactly reproducible)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_translate(images: torch.Tensor, max_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_fraction`` of its size in x and y, filling by reflection.

    Reflection rather than zero fill, so the model does not learn black borders as a feature.
    """
    if max_fraction <= 0:
        return images
    b, _, h, w = images.shape
    max_dy, max_dx = round(max_fraction * h), round(max_fraction * w)
    if max_dy == 0 and max_dx == 0:
        return images
    padded = F.pad(images.float(), (max_dx, max_dx, max_dy, max_dy), mode="reflect").to(images.dtype)
    dy = torch.randint(0, 2 * max_dy + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_dx + 1, (b,), generator=generator)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


def random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    out = images.clone()
    out[flip] = images[flip].flip(-1)
    return out
