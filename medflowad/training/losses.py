r"""Training objectives of METHOD.md, in nats unless the name says bits/dim.

Outlier loss (binary cross-entropy between p_in and a frozen general model p_g):

.. math:: \mathcal{L}_{out} = \mathrm{mean}_{x_g}\ \mathrm{softplus}\big((\log p_{in}(x_g) - \log p_g(x_g)) / T\big)

Margin variant: :math:`\mathrm{mean}\ \mathrm{relu}(m + \mathrm{NLL}_{in}(x_{in}) - \mathrm{NLL}_{in}(x_g))`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def outlier_bce(log_p_in_general: torch.Tensor, log_p_g_general: torch.Tensor, temperature: float) -> torch.Tensor:
    """Pushes general samples towards "not in-distribution"; p_g must be detached (frozen) by the caller."""
    return F.softplus((log_p_in_general - log_p_g_general) / temperature).mean()


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
