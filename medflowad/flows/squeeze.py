"""Space-to-depth reshaping."""

from __future__ import annotations

import torch

from medflowad.flows.base import InvertibleLayer


class Squeeze(InvertibleLayer):
    r"""Space-to-depth by ``factor``: ``(B, C, H, W) -> (B, C f^2, H/f, W/f)``.

    A permutation of the inputs, so :math:`\log|\det J| = 0`. Output channel ``c * f^2 + i * f + j``
    holds input pixel ``(c, f h + i, f w + j)``.
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        f = self.factor
        if h % f or w % f:
            raise ValueError(f"squeeze by {f} needs H and W divisible by {f}, got {h}x{w}")
        y = x.reshape(b, c, h // f, f, w // f, f).permute(0, 1, 3, 5, 2, 4)
        y = y.reshape(b, c * f * f, h // f, w // f)
        return y, x.new_zeros(b, h // f, w // f)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = y.shape
        f = self.factor
        x = y.reshape(b, c // (f * f), f, f, h, w).permute(0, 1, 4, 2, 5, 3)
        x = x.reshape(b, c // (f * f), h * f, w * f)
        return x, y.new_zeros(b, h * f, w * f)
