"""Pixel-resolution maps from a trained flow pair: the llr's input gradient, and restoration residuals.

The flow maps of ``score`` are per-location contributions of each scale, one value per 2^i x 2^i block; at a
5 % healthy FPR they cover FLAIR tumours and spill 4-8 pixels past them (docs/results.md). Two maps that live on
pixels instead, for the development scripts:

- ``gradient_map``: d llr / d x, llr(x) = log p_g(x) - log p_in(x) summed over the slice, per pixel. Where it is
  positive, lowering the pixel makes the slice look more like the in-distribution: a hyperintense lesion.
- ``restoration_residual``: x - x*, with x* the slice moved towards the in-distribution by gradient steps on

      J(x') = -(log p_in(x') - beta log p_g(x')) / D + lam * mean |x' - x|,

  only inside the slice's foreground (plain gradient descent, ``steps`` steps of size ``lr``; Adam's per-pixel
  step sizes move every pixel alike and paint the flows' checkerboard instead). beta = 0 is restoration under
  the in-distribution prior (Chen et al., MedIA 2020, with a VAE); beta = 1 restores under the likelihood ratio,
  which does not reward smoothing the slice for its own sake (the general model likes smooth images as much).
  The L1 term keeps the change sparse: what it moves is what the model calls unlike healthy tissue. Signed,
  positive where the restoration darkened the pixel.
"""

from __future__ import annotations

import numpy as np
import torch

from medflowad.flows.glow import Glow
from medflowad.units import to_model_input


def _log_ratio(x: torch.Tensor, in_model: Glow, general_model: Glow, beta: float,
               labels: torch.Tensor | None) -> torch.Tensor:
    """(N,) log p_in(x) - beta log p_g(x), nats."""
    log_in = in_model(x, labels).log_prob
    return log_in if beta == 0 else log_in - beta * general_model(x).log_prob


def _frozen(*models: Glow) -> None:
    for model in models:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)


def gradient_map(slices: torch.Tensor, in_model: Glow, general_model: Glow, batch_size: int = 32,
                 labels: torch.Tensor | None = None) -> np.ndarray:
    """(N, S, S) d llr / d x for uint8 slices (N, 1, S, S) at the bin centres."""
    _frozen(in_model, general_model)
    out = []
    for start in range(0, len(slices), batch_size):
        x = to_model_input(slices[start:start + batch_size]).requires_grad_(True)
        part = None if labels is None else labels[start:start + batch_size]
        llr = -_log_ratio(x, in_model, general_model, 1.0, part).sum()
        (grad,) = torch.autograd.grad(llr, x)
        out.append(grad[:, 0].numpy())
    return np.concatenate(out)


def restoration_residual(slices: torch.Tensor, foreground: np.ndarray, in_model: Glow, general_model: Glow,
                         steps: int, lam: float, beta: float, lr: float = 0.01, batch_size: int = 32,
                         labels: torch.Tensor | None = None) -> np.ndarray:
    """(N, S, S) x - x* for uint8 slices (N, 1, S, S); ``foreground`` (N, S, S) bool: where x* may move."""
    _frozen(in_model, general_model)
    dims = float(np.prod(slices.shape[1:]))
    out = []
    for start in range(0, len(slices), batch_size):
        x0 = to_model_input(slices[start:start + batch_size])
        movable = torch.from_numpy(foreground[start:start + batch_size, None].astype(np.float32))
        part = None if labels is None else labels[start:start + batch_size]
        delta = torch.zeros_like(x0, requires_grad=True)
        optimiser = torch.optim.SGD([delta], lr=lr)
        for _ in range(steps):
            optimiser.zero_grad()
            moved = delta * movable
            objective = (-_log_ratio(x0 + moved, in_model, general_model, beta, part) / dims
                         + lam * moved.abs().mean(dim=(1, 2, 3))).sum()
            objective.backward()
            optimiser.step()
        out.append((-(delta.detach() * movable))[:, 0].numpy())
    return np.concatenate(out)
