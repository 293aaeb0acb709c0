"""Affine and additive coupling layers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from medflowad.flows.base import InvertibleLayer


def coupling_network(in_channels: int, out_channels: int, hidden: int) -> nn.Sequential:
    """conv3x3 -> ReLU -> conv1x1 -> ReLU -> conv3x3, the last one zero-initialised.

    Zero initialisation makes every coupling start as (a scaled) identity, which keeps a deep Glow
    trainable from the first step.
    """
    last = nn.Conv2d(hidden, out_channels, kernel_size=3, padding=1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(hidden, hidden, kernel_size=1),
        nn.ReLU(),
        last,
    )


def run_network(net: nn.Module, x_a: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A coupling network's output; with ``dtype`` its convolutions run under autocast in that precision (the
    shift and scale they give are then rounded to it) and the output returns as float32, so the affine map and
    its log-determinant stay in float32.

    In reduced precision the network's input is made NHWC whatever the model's layout: oneDNN (and cuDNN's
    tensor cores) run bfloat16 convolutions on NHWC, and on an NCHW input every convolution reorders its
    operands, forward and backward (a fifth of a default-layout training step in copies, docs/speed.md). The
    output comes back in the model's layout."""
    if dtype is None:
        return net(x_a)
    with torch.autocast(x_a.device.type, dtype=dtype):
        out = net(x_a.contiguous(memory_format=torch.channels_last))
    return out.float().contiguous(memory_format=_layout_of(x_a))


def _layout_of(x: torch.Tensor) -> torch.memory_format:
    """NHWC for a tensor whose channels are its innermost dimension (as in a channel slice of an NHWC tensor),
    else NCHW."""
    return torch.channels_last if x.stride(1) == 1 and x.shape[1] > 1 else torch.contiguous_format


def training_dtype(precision: str) -> torch.dtype | None:
    """The coupling networks' dtype in training steps for a ``train_precision`` (None: float32, as the model)."""
    return torch.bfloat16 if precision == "bfloat16" else None


@contextmanager
def coupling_networks_in(model: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Run every coupling network of ``model`` in ``dtype`` (None: float32) inside the block: training's fast
    path on hardware with fast bfloat16 convolutions; what the model computes outside the block is unchanged."""
    couplings = [m for m in model.modules() if isinstance(m, (AffineCoupling, AdditiveCoupling))]
    before = [c.network_dtype for c in couplings]
    for coupling in couplings:
        coupling.network_dtype = dtype
    try:
        yield
    finally:
        for coupling, dtype_before in zip(couplings, before, strict=True):
            coupling.network_dtype = dtype_before


class AffineCoupling(InvertibleLayer):
    r"""Affine coupling: the first half of the channels conditions an affine map of the second half.

    .. math::
        x = (x_a, x_b),\quad (t, h) = \mathrm{NN}(x_a),\quad s = \sigma(h + 2),\\
        y_a = x_a,\quad y_b = (x_b + t) \odot s,\qquad
        \log|\det J| = \sum_{h,w} \sum_c \log s_{c,h,w}.

    The sigmoid keeps the scale in (0, 1), which bounds the log-det from above and makes training
    stable; ``+2`` starts it near 0.88 rather than 0.5.
    """

    def __init__(self, num_channels: int, hidden: int) -> None:
        super().__init__()
        if num_channels < 2:
            raise ValueError(f"coupling needs at least 2 channels, got {num_channels}")
        self.split = num_channels // 2
        self.net = coupling_network(self.split, 2 * (num_channels - self.split), hidden)
        self.network_dtype: torch.dtype | None = None  # see coupling_networks_in

    def _shift_and_log_scale(self, x_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, pre_scale = run_network(self.net, x_a, self.network_dtype).chunk(2, dim=1)
        return shift, nn.functional.logsigmoid(pre_scale + 2.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = x[:, : self.split], x[:, self.split :]
        shift, log_scale = self._shift_and_log_scale(x_a)
        y_b = (x_b + shift) * torch.exp(log_scale)
        return torch.cat([x_a, y_b], dim=1), log_scale.sum(dim=1)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y_a, y_b = y[:, : self.split], y[:, self.split :]
        shift, log_scale = self._shift_and_log_scale(y_a)
        x_b = y_b * torch.exp(-log_scale) - shift
        return torch.cat([y_a, x_b], dim=1), -log_scale.sum(dim=1)


class AdditiveCoupling(InvertibleLayer):
    r"""Additive (volume-preserving) coupling: :math:`y_b = x_b + t(x_a)`, :math:`\log|\det J| = 0`."""

    def __init__(self, num_channels: int, hidden: int) -> None:
        super().__init__()
        if num_channels < 2:
            raise ValueError(f"coupling needs at least 2 channels, got {num_channels}")
        self.split = num_channels // 2
        self.net = coupling_network(self.split, num_channels - self.split, hidden)
        self.network_dtype: torch.dtype | None = None  # see coupling_networks_in

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_a, x_b = x[:, : self.split], x[:, self.split :]
        y = torch.cat([x_a, x_b + run_network(self.net, x_a, self.network_dtype)], dim=1)
        return y, x.new_zeros(x.shape[0], x.shape[2], x.shape[3])

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y_a, y_b = y[:, : self.split], y[:, self.split :]
        x = torch.cat([y_a, y_b - run_network(self.net, y_a, self.network_dtype)], dim=1)
        return x, y.new_zeros(y.shape[0], y.shape[2], y.shape[3])
