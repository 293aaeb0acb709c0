"""Learned diagonal Gaussian priors for the latents of one Glow scale."""

from __future__ import annotations

import math

import torch
from torch import nn


class LearnedGaussianPrior(nn.Module):
    r"""Independent Gaussian per latent dimension with learned mean and log-std.

    .. math:: \log p(z) = \sum_{c,h,w} -\tfrac12 \log 2\pi - \sigma_{c,h,w}
              - \tfrac12 \big((z_{c,h,w} - \mu_{c,h,w}) e^{-\sigma_{c,h,w}}\big)^2

    Not conditioned on other latents, so log p(x) of a Glow factorises exactly by scale.
    With ``num_classes > 0`` there is one (mu, sigma) per class (the supervised setting).
    Both start at zero: a standard normal.
    """

    def __init__(self, shape: tuple[int, int, int], num_classes: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes
        lead = (max(num_classes, 1),)
        self.mean = nn.Parameter(torch.zeros(*lead, *shape))
        self.log_std = nn.Parameter(torch.zeros(*lead, *shape))

    def _params(self, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log_std) shaped to broadcast against (B, C, H, W) or, without labels, (B, K, C, H, W)."""
        if self.num_classes == 0:
            return self.mean, self.log_std
        if labels is not None:
            return self.mean[labels], self.log_std[labels]
        return self.mean.unsqueeze(0), self.log_std.unsqueeze(0)

    def log_prob_map(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Log-density summed over channels: (B, H, W), or (B, K, H, W) for every class at once."""
        mean, log_std = self._params(labels)
        if self.num_classes and labels is None:
            z = z.unsqueeze(1)
        normalised = (z - mean) * torch.exp(-log_std)
        per_dim = -0.5 * math.log(2 * math.pi) - log_std - 0.5 * normalised**2
        return per_dim.sum(dim=-3)

    def sample(
        self, n: int, temperature: float = 1.0, labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        if self.num_classes and labels is None:
            raise ValueError("a class-conditional prior needs labels to sample")
        mean, log_std = self._params(labels)
        mean = mean.expand(n, *self.mean.shape[1:])
        log_std = log_std.expand(n, *self.mean.shape[1:])
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + temperature * torch.exp(log_std) * noise
