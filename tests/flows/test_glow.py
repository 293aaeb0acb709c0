"""Whole-Glow checks: reconstruction, brute-force log p(x), per-scale and per-location decomposition."""

import pytest
import torch

from medflowad.flows import Glow, GlowConfig


def _trained_looking_glow(config: GlowConfig, seed: int = 0) -> Glow:
    """A Glow whose parameters are all moved off initialisation (zero-init convs would hide bugs)."""
    torch.manual_seed(seed)
    model = Glow(config)
    model.train()
    model(torch.rand(8, config.in_channels, *config.image_size) - 0.5)  # ActNorm init
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_glow_reconstruction(levels):
    config = GlowConfig(in_channels=3, image_size=(16, 16), levels=levels, steps=3, hidden=16)
    model = _trained_looking_glow(config)
    x = torch.rand(4, 3, 16, 16) - 0.5
    with torch.no_grad():
        out = model(x)
        x_rec = model.inverse(out.latents)
    assert (x_rec - x).abs().max().item() < 1e-4


def test_latent_shapes_follow_method():
    model = Glow(GlowConfig(in_channels=3, image_size=(32, 32), levels=3, steps=1, hidden=4))
    assert model.latent_shapes == [(6, 16, 16), (12, 8, 8), (48, 4, 4)]
    out = model(torch.rand(2, 3, 32, 32) - 0.5)
    assert [tuple(z.shape[1:]) for z in out.latents] == model.latent_shapes
    assert [tuple(m.shape[1:]) for m in out.contribution_maps] == [(16, 16), (8, 8), (4, 4)]


def _brute_force_log_prob(model: Glow, x: torch.Tensor) -> float:
    """log p(x) = sum_i log N(z_i) + log|det dz/dx| with the full autograd Jacobian (float64)."""
    def latents_flat(flat):
        out = model(flat.reshape(x.shape))
        return torch.cat([z.reshape(-1) for z in out.latents])

    jac = torch.autograd.functional.jacobian(latents_flat, x.reshape(-1))
    logdet = torch.linalg.slogdet(jac)[1]
    out = model(x)
    log_prior = 0.0
    for prior, z in zip(model.priors, out.latents, strict=True):
        normal = torch.distributions.Normal(prior.mean[0], prior.log_std[0].exp())
        log_prior = log_prior + normal.log_prob(z[0]).sum()
    return (logdet + log_prior).item()


@pytest.mark.parametrize(("levels", "coupling"), [(1, "affine"), (2, "affine"), (2, "additive")])
def test_glow_log_prob_matches_brute_force_jacobian(levels, coupling):
    config = GlowConfig(in_channels=3, image_size=(4, 4), levels=levels, steps=2, hidden=8, coupling=coupling)
    model = _trained_looking_glow(config).double()
    x = torch.rand(1, 3, 4, 4, dtype=torch.float64) - 0.5
    out = model(x)
    assert out.log_prob.item() == pytest.approx(_brute_force_log_prob(model, x), abs=1e-3)


def test_per_scale_contributions_and_maps_match_brute_force_per_scale():
    """c_i from maps == log N(z_i) + log|det| of scale i's own Jacobian, computed independently."""
    config = GlowConfig(in_channels=2, image_size=(8, 8), levels=3, steps=2, hidden=8)
    model = _trained_looking_glow(config, seed=3).double()
    x = torch.rand(1, 2, 8, 8, dtype=torch.float64) - 0.5
    out = model(x)
    h = x
    for level in range(config.levels):
        h_in = model.squeeze(h)[0]

        def scale_fn(flat, shape=h_in.shape, level=level):
            return model.scales[level](flat.reshape(shape))[0].reshape(-1)

        jac = torch.autograd.functional.jacobian(scale_fn, h_in.reshape(-1))
        logdet = torch.linalg.slogdet(jac)[1].item()
        prior = model.priors[level]
        normal = torch.distributions.Normal(prior.mean[0], prior.log_std[0].exp())
        expected = logdet + normal.log_prob(out.latents[level][0]).sum().item()
        assert out.contribution_maps[level].sum().item() == pytest.approx(expected, abs=1e-3)
        assert out.contributions[0, level].item() == pytest.approx(expected, abs=1e-3)
        h_out = model.scales[level](h_in)[0]
        h = h_out[:, h_out.shape[1] // 2 :]


def test_contribution_map_is_local():
    """Changing one corner of the image must leave the far corner of the last-scale map unchanged
    for a 1-level model with a small receptive field."""
    config = GlowConfig(in_channels=1, image_size=(16, 16), levels=1, steps=1, hidden=4)
    model = _trained_looking_glow(config, seed=4)
    x = torch.rand(1, 1, 16, 16) - 0.5
    x2 = x.clone()
    x2[..., :2, :2] += 0.3
    with torch.no_grad():
        m1 = model(x).contribution_maps[0]
        m2 = model(x2).contribution_maps[0]
    assert not torch.allclose(m1[..., 0, 0], m2[..., 0, 0])
    assert torch.allclose(m1[..., 4:, 4:], m2[..., 4:, 4:])


def test_class_conditional_glow_shapes_and_label_selection():
    config = GlowConfig(in_channels=1, image_size=(8, 8), levels=2, steps=1, hidden=4, num_classes=3)
    model = _trained_looking_glow(config, seed=5)
    x = torch.rand(4, 1, 8, 8) - 0.5
    labels = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        all_classes = model(x)
        picked = model(x, labels)
    assert all_classes.log_prob.shape == (4, 3)
    assert all_classes.contributions.shape == (4, 3, 2)
    assert torch.allclose(all_classes.log_prob[torch.arange(4), labels], picked.log_prob, atol=1e-5)


def test_sampling_shapes_and_temperature():
    config = GlowConfig(in_channels=3, image_size=(8, 8), levels=2, steps=2, hidden=8)
    model = _trained_looking_glow(config, seed=6)
    gen = torch.Generator().manual_seed(0)
    cold = model.sample(16, temperature=0.0, generator=gen)
    assert cold.shape == (16, 3, 8, 8)
    # Temperature 0 gives the image of the prior means: every sample is the same.
    assert torch.allclose(cold, cold[:1].expand_as(cold), atol=1e-5)
    warm = model.sample(16, temperature=1.0, generator=gen)
    assert warm.std(dim=0).mean() > 0.01


def test_wrong_input_shape_is_a_clear_error():
    model = Glow(GlowConfig(in_channels=3, image_size=(8, 8), levels=1, steps=1, hidden=4))
    with pytest.raises(ValueError, match="expects inputs of shape"):
        model(torch.zeros(1, 1, 8, 8))


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        GlowConfig(image_size=(12, 12), levels=3)
    with pytest.raises(ValueError, match="coupling"):
        GlowConfig(coupling="spline")
