"""Anomaly scores from one forward pass per model (higher = more anomalous, as in METHOD.md).

=================  ==================================================================
``nll``            -log p_in(x) in bits/dim
``llr``            log p_g(x) - log p_in(x), nats (needs a general model)
``last_scale``     -c_L(x) of p_in, nats
``c_<i>``          -c_i(x) of p_in for every scale i = 1..L, nats
``nll_general``    -log p_g(x) in bits/dim (needs a general model)
``input_complexity``  nll minus the PNG bits/dim of x (Serra et al. 2020)
=================  ==================================================================

For a class-conditional model, log p_in is the class mixture log((1/K) sum_c p(x|c)); its
per-scale contributions are taken under the most likely class. When each image's class is known (an MRI
slice's brain level, :mod:`medflowad.mri.position`), ``likelihoods(..., labels=...)`` gives log p(x | c)
under that class instead.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from medflowad.flows.glow import Glow, class_mixture_log_prob
from medflowad.units import bits_per_dim, to_model_input


@dataclass
class Likelihoods:
    """Per-image log p(x) (N,) and per-scale contributions (N, L) in nats, optionally maps per scale."""

    log_prob: np.ndarray
    contributions: np.ndarray
    maps: list[np.ndarray] | None = None


@torch.no_grad()
def likelihoods(
    model: Glow, images: torch.Tensor, batch_size: int = 256, keep_maps: bool = False,
    progress=None, labels: torch.Tensor | None = None,
) -> Likelihoods:
    """Evaluate ``model`` on uint8 images (N, C, H, W) with bin-centre dequantisation, in batches.

    ``labels`` (N,): each image's class under a class-conditional model (else the class mixture).
    ``progress`` is an optional callable taking the number of images just processed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if labels is not None:
        if not model.config.num_classes:
            raise ValueError("labels given for an unconditional model")
        if len(labels) != len(images) or (labels < 0).any() or (labels >= model.config.num_classes).any():
            raise ValueError(f"need one label in 0..{model.config.num_classes - 1} per image")
    device = next(model.parameters()).device
    model.eval()
    log_probs, contribs, maps = [], [], []
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start : start + batch_size].to(device))  # move uint8: 4x less traffic
        batch_labels = None if labels is None else labels[start : start + batch_size].to(device)
        out = model(x, batch_labels)
        if model.config.num_classes and batch_labels is None:
            per_class = out.log_prob  # (B, K)
            best = per_class.argmax(dim=1)
            rows = torch.arange(len(best), device=device)
            log_probs.append(class_mixture_log_prob(per_class).cpu())
            contribs.append(out.contributions[rows, best].cpu())
            if keep_maps:
                maps.append([m[rows, best].cpu() for m in out.contribution_maps])
        else:
            log_probs.append(out.log_prob.cpu())
            contribs.append(out.contributions.cpu())
            if keep_maps:
                maps.append([m.cpu() for m in out.contribution_maps])
        if progress is not None:
            progress(len(x))
    per_scale = None
    if keep_maps:
        per_scale = [torch.cat([batch[i] for batch in maps]).numpy() for i in range(model.config.levels)]
    return Likelihoods(torch.cat(log_probs).numpy().astype(np.float64),
                       torch.cat(contribs).numpy().astype(np.float64), per_scale)


def png_bits_per_dim(images: torch.Tensor) -> np.ndarray:
    """Lossless PNG size (zlib level 9) of each uint8 image, in bits per dimension."""
    out = np.empty(len(images))
    arrays = images.permute(0, 2, 3, 1).numpy()
    for i, arr in enumerate(arrays):
        buffer = io.BytesIO()
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buffer, format="PNG", compress_level=9)
        out[i] = 8 * buffer.tell() / arr.size
    return out


def scores_from_likelihoods(
    num_dims: int, p_in: Likelihoods, p_g: Likelihoods | None = None, png_bpd: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Every score of the module table from already computed likelihoods (no flow is re-run)."""
    nll = bits_per_dim(torch.from_numpy(p_in.log_prob), num_dims).numpy()
    scores = {"nll": nll, "last_scale": -p_in.contributions[:, -1]}
    for i in range(p_in.contributions.shape[1]):
        scores[f"c_{i + 1}"] = -p_in.contributions[:, i]
    if p_g is not None:
        scores["llr"] = p_g.log_prob - p_in.log_prob
        scores["nll_general"] = bits_per_dim(torch.from_numpy(p_g.log_prob), num_dims).numpy()
    if png_bpd is not None:
        scores["input_complexity"] = nll - png_bpd
    return scores


def compute_scores(
    images: torch.Tensor, in_model: Glow, general_model: Glow | None = None, batch_size: int = 256,
    input_complexity: bool = True, progress=None,
) -> tuple[dict[str, np.ndarray], Likelihoods, Likelihoods | None]:
    """All scores for uint8 images with one forward pass of each model; also returns the likelihoods."""
    p_in = likelihoods(in_model, images, batch_size, progress=progress)
    p_g = likelihoods(general_model, images, batch_size, progress=progress) if general_model else None
    png = png_bits_per_dim(images) if input_complexity else None
    num_dims = math.prod(images.shape[1:])
    return scores_from_likelihoods(num_dims, p_in, p_g, png), p_in, p_g
