"""The contract every invertible layer in medflowad follows.

A layer maps ``x`` of shape ``(B, C, H, W)`` to ``y`` of shape ``(B, C', H', W')`` with
``C * H * W == C' * H' * W'`` and returns, besides ``y``, its log-Jacobian-determinant as a
*per-location map*::

    y, logdet_map = layer(x)          # logdet_map: (B, H', W')
    log|det dy/dx| = logdet_map.sum(dim=(-2, -1))

Every Glow layer (ActNorm, 1x1 convolution, coupling, squeeze) has a Jacobian whose log-determinant is
a sum of terms that each belong to one spatial position of the output, so keeping the map costs
nothing and is what turns a per-image likelihood into an anomaly map. ``inverse(y)`` returns
``(x, logdet_map_of_the_inverse)``, i.e. the negated map laid out on the grid of ``x``.
"""

from __future__ import annotations

import torch
from torch import nn


class InvertibleLayer(nn.Module):
    """Base class: ``forward(x) -> (y, logdet_map)`` and ``inverse(y) -> (x, logdet_map)``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class FlowSequence(InvertibleLayer):
    """Composition of layers that keep the spatial grid: log-det maps add up position by position."""

    def __init__(self, layers: list[InvertibleLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = x.new_zeros(x.shape[0], x.shape[2], x.shape[3])
        for layer in self.layers:
            x, logdet = layer(x)
            total = total + logdet
        return x, total

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = y.new_zeros(y.shape[0], y.shape[2], y.shape[3])
        for layer in reversed(self.layers):
            y, logdet = layer.inverse(y)
            total = total + logdet
        return y, total
