"""Activation normalisation (Kingma & Dhariwal 2018)."""

from __future__ import annotations

import torch
from torch import nn

from medflowad.flows.base import InvertibleLayer


class ActNorm(InvertibleLayer):
    r"""Per-channel affine map with data-dependent initialisation.

    .. math:: y_{c,h,w} = (x_{c,h,w} + b_c)\, e^{s_c}, \qquad
              \log|\det J| = \sum_{h,w} \sum_c s_c

    so every spatial position carries :math:`\sum_c s_c`. On the first forward pass in training mode
    ``b`` and ``s`` are set from that batch so the output has zero mean and unit variance per channel.
    The ``initialized`` buffer is saved with the weights, so loading a trained model never
    re-initialises it.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        self.eps = eps

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not bool(self.initialized):
            self.initialize(x)
        y = (x + self.bias) * torch.exp(self.log_scale)
        per_position = self.log_scale.sum()
        return y, per_position.expand(x.shape[0], x.shape[2], x.shape[3])

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = y * torch.exp(-self.log_scale) - self.bias
        per_position = -self.log_scale.sum()
        return x, per_position.expand(y.shape[0], y.shape[2], y.shape[3])
