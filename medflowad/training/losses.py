r"""Training objectives of METHOD.md, in nats unless the name says bits/dim.

Outlier loss (binary cross-entropy between p_in and a frozen general model p_g):

.. math:: \mathcal{L}_{out} = \mathrm{mean}_{x_g}\ \mathrm{softplus}\big((\log p_{in}(x_g) - \log p_g(x_g)) / T\big)

Per-location variant (medflowad's, not in the paper): the same cross-entropy for every location l of every
scale i, with :math:`d_{i,l} = c^{in}_i(x_g)[l] - c^{g}_i(x_g)[l]` (METHOD.md's per-location contributions),
:math:`n_i` the latent channels of scale i and D the image's dimensions,

.. math:: \mathcal{L}_{loc} = \mathrm{mean}_{x_g} \sum_{i,l} \frac{n_i}{D}\,
          \mathrm{softplus}\big(d_{i,l} / T_{i}\big),\qquad T_i = T\, n_i / D.

Each location's temperature is T's share by dimensions, so an image whose difference is spread evenly over its
dimensions gets the whole-image loss exactly, and the slope at d = 0 is the same, 1 / (2T) per nat, at every
location. Where the whole-image loss stops pushing once the image's sum is far below zero (a few very unlikely
locations are enough), this one keeps pushing every location that is not yet less likely under p_in.

Margin variant: :math:`\mathrm{mean}\ \mathrm{relu}(m + \mathrm{NLL}_{in}(x_{in}) - \mathrm{NLL}_{in}(x_g))`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def outlier_bce(log_p_in_general: torch.Tensor, log_p_g_general: torch.Tensor, temperature: float) -> torch.Tensor:
    """Pushes general samples towards "not in-distribution"; p_g must be detached (frozen) by the caller."""
    return F.softplus((log_p_in_general - log_p_g_general) / temperature).mean()


def outlier_bce_per_location(
    maps_in_general: list[torch.Tensor], maps_g_general: list[torch.Tensor], channels: list[int], temperature: float
) -> torch.Tensor:
    """The per-location cross-entropy above, from each scale's (B, H_i, W_i) contribution maps under p_in and p_g
    (p_g's detached by the caller) and each scale's latent channels n_i."""
    num_dims = sum(n * m.shape[-2] * m.shape[-1] for n, m in zip(channels, maps_in_general, strict=True))
    loss = 0.0
    for m_in, m_g, n in zip(maps_in_general, maps_g_general, channels, strict=True):
        share = n / num_dims
        loss = loss + share * F.softplus((m_in - m_g) / (temperature * share)).sum(dim=(-2, -1))
    return loss.mean()


def outlier_margin(nll_in_inlier: torch.Tensor, nll_in_general: torch.Tensor, margin: float) -> torch.Tensor:
    """Hinge on pairs (i-th in-distribution image, i-th general image): general should be m nats less likely."""
    n = min(len(nll_in_inlier), len(nll_in_general))
    return F.relu(margin + nll_in_inlier[:n] - nll_in_general[:n]).mean()


def wrong_class_bce(
    log_p_given_class: torch.Tensor, log_p_g: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean over images and wrong classes c' != y of softplus((log p(x | c') - log p_g(x)) / T)."""
    terms = F.softplus((log_p_given_class - log_p_g.unsqueeze(-1)) / temperature)
    wrong = torch.ones_like(terms, dtype=torch.bool)
    wrong[torch.arange(len(labels)), labels] = False
    return terms[wrong].mean()
