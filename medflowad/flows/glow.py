"""Multi-scale Glow whose log-likelihood is kept per scale and per location."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from medflowad.flows.actnorm import ActNorm
from medflowad.flows.base import FlowSequence
from medflowad.flows.conv1x1 import InvConv1x1
from medflowad.flows.coupling import AdditiveCoupling, AffineCoupling
from medflowad.flows.prior import LearnedGaussianPrior
from medflowad.flows.squeeze import Squeeze


@dataclass(frozen=True)
class GlowConfig:
    """Architecture of a :class:`Glow`; stored next to the weights as readable YAML."""

    in_channels: int = 3
    image_size: tuple[int, int] = (32, 32)
    levels: int = 3
    steps: int = 8
    hidden: int = 128
    coupling: str = "affine"
    num_classes: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
        h, w = self.image_size
        if self.levels < 1 or self.steps < 1 or self.hidden < 1 or self.in_channels < 1:
            raise ValueError(f"levels, steps, hidden and in_channels must be positive: {self}")
        if h % 2**self.levels or w % 2**self.levels:
            raise ValueError(f"image size {h}x{w} must be divisible by 2^levels = {2**self.levels}")
        if self.coupling not in ("affine", "additive"):
            raise ValueError(f"coupling must be 'affine' or 'additive', got {self.coupling!r}")

    @property
    def num_dims(self) -> int:
        return self.in_channels * self.image_size[0] * self.image_size[1]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d


@dataclass
class GlowOutput:
    """Latents and the log-likelihood of each input, split by scale and by location.

    ``logdet_maps[i]`` is (B, H_i, W_i): the log-determinants of scale i's flow steps per position.
    ``log_prior_maps[i]`` is (B, H_i, W_i), or (B, K, H_i, W_i) for a class-conditional model scored
    without labels (one map per class). Everything is in nats; higher means more likely.
    """

    latents: list[torch.Tensor]
    logdet_maps: list[torch.Tensor]
    log_prior_maps: list[torch.Tensor]

    def rows(self, which: slice) -> GlowOutput:
        """The outputs of some of the batch's images (one forward pass of several batches, split again)."""
        return GlowOutput([z[which] for z in self.latents], [m[which] for m in self.logdet_maps],
                          [m[which] for m in self.log_prior_maps])

    @property
    def contribution_maps(self) -> list[torch.Tensor]:
        """c_i per location: log-dets plus log-prior, summed over channels only."""
        out = []
        for logdet, prior in zip(self.logdet_maps, self.log_prior_maps, strict=True):
            if prior.dim() == 4:  # one map per class
                logdet = logdet.unsqueeze(1)
            out.append(logdet + prior)
        return out

    @property
    def contributions(self) -> torch.Tensor:
        """c_1..c_L per image: (B, L), or (B, K, L) per class."""
        return torch.stack([m.sum(dim=(-2, -1)) for m in self.contribution_maps], dim=-1)

    @property
    def log_prob(self) -> torch.Tensor:
        """log p(x) = c_1 + ... + c_L: (B,), or (B, K) per class."""
        return self.contributions.sum(dim=-1)

    def masked_log_prob(self, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Log-likelihood of the locations that touch no masked pixel, and how many dimensions they hold.

        ``pixel_mask`` is (B, 1, H, W), 1 where a pixel counts. A location of scale i covers
        :math:`2^i \times 2^i` pixels; it is kept (:math:`k_{i,l} = 1`) when all of them count, and

        .. math:: \log \tilde p(x) = \sum_i \sum_l k_{i,l}\, c_i(x)[l],\qquad
                  \tilde D = \sum_i d_i \sum_l k_{i,l},

        with :math:`d_i` the latent channels of scale i (so :math:`\tilde D = D` without masked pixels and
        the sum is ``log_prob``). Masked locations' terms are left out of the sum, so no gradient flows
        from them. Needs one map per scale: an unconditional model, or a class-conditional one evaluated with
        labels. Returns ((B,) nats, (B,) dimensions).
        """
        kept_log_prob = 0.0
        kept_dims = 0.0
        outside = 1.0 - pixel_mask.float()
        for contribution, latent in zip(self.contribution_maps, self.latents, strict=True):
            if contribution.dim() != 3:
                raise ValueError("masked likelihood needs one map per scale (an unconditional model, or labels)")
            factor = pixel_mask.shape[-1] // contribution.shape[-1]
            keep = 1.0 - torch.nn.functional.max_pool2d(outside, factor)[:, 0]  # (B, H_i, W_i)
            kept_log_prob = kept_log_prob + (keep * contribution).sum(dim=(-2, -1))
            kept_dims = kept_dims + latent.shape[1] * keep.sum(dim=(-2, -1))
        return kept_log_prob, kept_dims


def class_mixture_log_prob(log_p_given_class: torch.Tensor) -> torch.Tensor:
    """log((1/K) sum_c p(x | c)) from (B, K) per-class log-likelihoods."""
    return torch.logsumexp(log_p_given_class, dim=-1) - math.log(log_p_given_class.shape[-1])


def _flow_step(channels: int, hidden: int, coupling: str) -> FlowSequence:
    coupling_cls = AffineCoupling if coupling == "affine" else AdditiveCoupling
    return FlowSequence([ActNorm(channels), InvConv1x1(channels), coupling_cls(channels, hidden)])


class Glow(nn.Module):
    r"""Glow with L scales of K flow steps (ActNorm -> 1x1 conv -> coupling) and per-scale priors.

    Scale i squeezes, runs K steps, then (for i < L) splits off half the channels as z_i; the last
    scale keeps all its channels as z_L. With learned unconditional priors,

    .. math:: \log p(x) = \sum_{i=1}^{L} c_i(x),\qquad
              c_i(x) = \log p_i(z_i) + \sum_{\text{steps of scale } i} \log|\det J|.

    Inputs are continuous images in [-0.5, 0.5) (see :func:`medflowad.units.to_model_input`).
    """

    def __init__(self, config: GlowConfig) -> None:
        super().__init__()
        self.config = config
        c = config.in_channels
        h, w = config.image_size
        self.squeeze = Squeeze(2)
        self.scales = nn.ModuleList()
        self.priors = nn.ModuleList()
        for level in range(config.levels):
            c, h, w = c * 4, h // 2, w // 2
            self.scales.append(
                FlowSequence([_flow_step(c, config.hidden, config.coupling) for _ in range(config.steps)])
            )
            is_last = level == config.levels - 1
            z_channels = c if is_last else c // 2
            self.priors.append(LearnedGaussianPrior((z_channels, h, w), config.num_classes))
            c = c - z_channels

    @property
    def latent_shapes(self) -> list[tuple[int, int, int]]:
        return [tuple(p.mean.shape[1:]) for p in self.priors]

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> GlowOutput:
        expected = (self.config.in_channels, *self.config.image_size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"Glow expects inputs of shape (B, {expected}), got {tuple(x.shape)}")
        latents, logdet_maps, prior_maps = [], [], []
        h = x
        for level, (flow, prior) in enumerate(zip(self.scales, self.priors, strict=True)):
            h, _ = self.squeeze(h)
            h, logdet = flow(h)
            if level < self.config.levels - 1:
                half = h.shape[1] // 2
                z, h = h[:, :half], h[:, half:]
            else:
                z = h
            latents.append(z)
            logdet_maps.append(logdet)
            prior_maps.append(prior.log_prob_map(z, labels))
        return GlowOutput(latents, logdet_maps, prior_maps)

    def inverse(self, latents: list[torch.Tensor]) -> torch.Tensor:
        """Map latents z_1..z_L back to the image."""
        h = latents[-1]
        for level in reversed(range(self.config.levels)):
            if level < self.config.levels - 1:
                h = torch.cat([latents[level], h], dim=1)
            h, _ = self.scales[level].inverse(h)
            h, _ = self.squeeze.inverse(h)
        return h

    @torch.no_grad()
    def sample(
        self, n: int, temperature: float = 1.0, labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw n images; ``temperature`` scales the prior standard deviations."""
        latents = [p.sample(n, temperature, labels, generator) for p in self.priors]
        return self.inverse(latents)
