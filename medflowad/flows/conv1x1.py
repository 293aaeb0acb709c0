"""Invertible 1x1 convolution with an LU-decomposed weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medflowad.flows.base import InvertibleLayer


class InvConv1x1(InvertibleLayer):
    r"""Channel mixing :math:`y_{:,h,w} = W x_{:,h,w}` with :math:`W = P L (U + \mathrm{diag}(\sigma e^{s}))`.

    ``P`` is a fixed permutation, ``L`` unit lower-triangular, ``U`` strictly upper-triangular, and
    :math:`\sigma` the fixed signs of the diagonal, so

    .. math:: \log|\det J| = \sum_{h,w} \sum_c s_c

    costs O(C) instead of O(C^3). ``W`` starts as a random rotation (QR of a Gaussian matrix) drawn from
    torch's global generator, so seeding torch makes models reproducible.
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(num_channels, num_channels, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        self.register_buffer("permutation", p.float())
        self.register_buffer("sign_s", torch.sign(diag).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(num_channels, num_channels), -1))
        self.register_buffer("eye", torch.eye(num_channels))
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(torch.abs(diag)).float())

    def weight(self) -> torch.Tensor:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.permutation @ lower @ upper

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight()
        y = F.conv2d(x, w.unsqueeze(-1).unsqueeze(-1))
        per_position = self.log_s.sum()
        return y, per_position.expand(x.shape[0], x.shape[2], x.shape[3])

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Invert in float64: W can be ill-conditioned after training, and sampling chains many inverses.
        w_inv = torch.linalg.inv(self.weight().double()).to(y.dtype)
        x = F.conv2d(y, w_inv.unsqueeze(-1).unsqueeze(-1))
        per_position = -self.log_s.sum()
        return x, per_position.expand(y.shape[0], y.shape[2], y.shape[3])
