"""The masked likelihood of healthy-tissue training: which locations count, how many dimensions they hold,
and that no gradient reaches the terms of masked locations."""

import math

import torch

from medflowad.flows import Glow, GlowConfig
from medflowad.training.trainer import _Objective
from tests.flows.test_glow import _trained_looking_glow
from tests.training.test_trainer import tiny_config

CONFIG = GlowConfig(in_channels=1, image_size=(16, 16), levels=3, steps=2, hidden=8)


def _lesion_mask(batch: int) -> torch.Tensor:
    mask = torch.ones(batch, 1, 16, 16)
    mask[0, 0, 5:9, 2:4] = 0  # a lesion in the first image; the second image is all healthy
    return mask


def _kept_by_hand(mask: torch.Tensor, level: int) -> torch.Tensor:
    """(B, H_i, W_i): 1 where every pixel of the location's 2^i x 2^i block counts; by explicit loops."""
    factor = 2 ** (level + 1)
    b, _, h, w = mask.shape
    kept = torch.zeros(b, h // factor, w // factor)
    for n in range(b):
        for r in range(h // factor):
            for c in range(w // factor):
                kept[n, r, c] = float(bool(mask[n, 0, r * factor:(r + 1) * factor, c * factor:(c + 1) * factor].all()))
    return kept


def test_full_mask_gives_the_full_likelihood():
    model = _trained_looking_glow(CONFIG)
    out = model(torch.rand(2, 1, 16, 16) - 0.5)
    log_prob, dims = out.masked_log_prob(torch.ones(2, 1, 16, 16))
    assert torch.allclose(log_prob, out.log_prob, atol=1e-4)
    assert torch.equal(dims, torch.full((2,), float(CONFIG.num_dims)))


def test_masked_sum_and_dimensions_match_a_hand_computation():
    model = _trained_looking_glow(CONFIG)
    mask = _lesion_mask(2)
    out = model(torch.rand(2, 1, 16, 16) - 0.5)
    log_prob, dims = out.masked_log_prob(mask)
    expected_lp = torch.zeros(2)
    expected_dims = torch.zeros(2)
    for level, (contribution, latent) in enumerate(zip(out.contribution_maps, out.latents, strict=True)):
        kept = _kept_by_hand(mask, level)
        expected_lp += (kept * contribution).sum(dim=(1, 2))
        expected_dims += latent.shape[1] * kept.sum(dim=(1, 2))
    assert torch.allclose(log_prob, expected_lp, atol=1e-4)
    assert torch.equal(dims, expected_dims)
    assert dims[0] < CONFIG.num_dims and dims[1] == CONFIG.num_dims


def test_no_gradient_reaches_masked_locations_terms():
    model = _trained_looking_glow(CONFIG)
    mask = _lesion_mask(2)
    out = model(torch.rand(2, 1, 16, 16) - 0.5)
    terms = [*out.logdet_maps, *out.log_prior_maps]  # a location's term: its log-dets plus its log-prior
    for t in terms:
        t.retain_grad()
    log_prob, _ = out.masked_log_prob(mask)
    (-log_prob.sum()).backward()
    for i, t in enumerate(terms):
        kept = _kept_by_hand(mask, i % CONFIG.levels).bool()
        assert torch.all(t.grad[~kept] == 0), i
        assert torch.all(t.grad[kept] == -1), i  # each kept term enters the sum once


def test_training_objective_is_bits_per_kept_dimension():
    """The step loss with masks: mean over images of (-log p~ + D~ ln 256) / (D~ ln 2), from the maps by hand."""
    config = tiny_config("unused.npz", model={"in_channels": 1, "image_size": [16, 16], "levels": 3, "steps": 2,
                                               "hidden": 8})
    model = _trained_looking_glow(CONFIG)
    x = torch.rand(2, 1, 16, 16) - 0.5
    mask = _lesion_mask(2)
    loss, _ = _Objective(model, None, config)(x, None, None, mask)
    out = model(x)
    per_image = []
    for n in range(2):
        lp = sum((_kept_by_hand(mask, i)[n] * m[n]).sum() for i, m in enumerate(out.contribution_maps))
        d = sum(z.shape[1] * _kept_by_hand(mask, i)[n].sum() for i, z in enumerate(out.latents))
        per_image.append((-lp + d * math.log(256)) / (d * math.log(2)))
    assert torch.allclose(loss, torch.stack(per_image).mean(), atol=1e-5)
    assert isinstance(model, Glow)
