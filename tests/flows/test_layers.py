"""Invertibility and log-determinants of every layer against brute-force autograd Jacobians."""

import math

import pytest
import torch

from medflowad.flows import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    FlowSequence,
    InvConv1x1,
    LearnedGaussianPrior,
    Squeeze,
)


def _randomise(layer: torch.nn.Module) -> None:
    """Move every parameter off its (often trivial) initial value so the checks are not vacuous."""
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))


def _brute_force_logdet(layer, x: torch.Tensor) -> float:
    """log|det J| of layer's forward at a single input, from the full autograd Jacobian in float64."""
    def f(flat):
        y, _ = layer(flat.reshape(x.shape))
        return y.reshape(-1)

    jac = torch.autograd.functional.jacobian(f, x.reshape(-1))
    return torch.linalg.slogdet(jac.double())[1].item()


LAYERS = {
    "actnorm": lambda c: ActNorm(c),
    "conv1x1": lambda c: InvConv1x1(c),
    "affine": lambda c: AffineCoupling(c, hidden=8),
    "additive": lambda c: AdditiveCoupling(c, hidden=8),
    "squeeze": lambda c: Squeeze(2),
}


@pytest.mark.parametrize("name", LAYERS)
def test_layer_logdet_matches_autograd_jacobian(name):
    torch.manual_seed(0)
    layer = LAYERS[name](4).double()
    layer.eval()  # keep ActNorm from re-initialising on this single sample
    _randomise(layer)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    _, logdet_map = layer(x)
    expected_grid = (2, 2) if name == "squeeze" else (4, 4)
    assert logdet_map.shape == (1, *expected_grid)
    assert logdet_map.sum().item() == pytest.approx(_brute_force_logdet(layer, x), abs=1e-3)


@pytest.mark.parametrize("name", LAYERS)
def test_layer_inverse_reconstructs_and_negates_logdet(name):
    torch.manual_seed(1)
    layer = LAYERS[name](6)
    layer.eval()
    _randomise(layer)
    x = torch.randn(3, 6, 8, 8)
    y, logdet = layer(x)
    x_rec, inv_logdet = layer.inverse(y)
    assert (x_rec - x).abs().max().item() < 1e-4
    assert torch.allclose(inv_logdet.sum(dim=(1, 2)), -logdet.sum(dim=(1, 2)), atol=1e-4)


def test_affine_coupling_logdet_is_local_sum_of_log_scales():
    """Per-location map must be the channel sum of log s at that location (not just the right total)."""
    torch.manual_seed(2)
    layer = AffineCoupling(4, hidden=8)
    _randomise(layer)
    x = torch.randn(2, 4, 5, 5)
    y, logdet_map = layer(x)
    # log s recovered from the output itself: y_b = (x_b + t) * s with t from the network.
    out = layer.net(x[:, :2])
    t, h = out[:, :2], out[:, 2:]
    s = torch.sigmoid(h + 2)
    assert torch.allclose(y[:, 2:], (x[:, 2:] + t) * s, atol=1e-6)
    assert torch.allclose(logdet_map, torch.log(s).sum(dim=1), atol=1e-5)


def test_actnorm_data_dependent_init_gives_zero_mean_unit_variance():
    torch.manual_seed(3)
    layer = ActNorm(5)
    x = 3.0 + 2.5 * torch.randn(64, 5, 6, 6) * torch.arange(1, 6).view(1, 5, 1, 1)
    y, _ = layer(x)
    assert bool(layer.initialized)
    mean = y.mean(dim=(0, 2, 3))
    var = y.var(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(mean, torch.zeros(5), atol=1e-5)
    assert torch.allclose(var, torch.ones(5), atol=1e-4)
    # A second batch must not re-initialise.
    before = layer.log_scale.detach().clone()
    layer(torch.randn(8, 5, 6, 6))
    assert torch.equal(before, layer.log_scale.detach())


def test_conv1x1_starts_orthogonal_and_weight_matches_lu_parametrisation():
    torch.manual_seed(4)
    layer = InvConv1x1(6)
    w = layer.weight()
    assert torch.allclose(w @ w.T, torch.eye(6), atol=1e-5)
    _randomise(layer)
    assert layer.log_s.sum().item() == pytest.approx(torch.linalg.slogdet(layer.weight())[1].item(), abs=1e-4)


def test_squeeze_layout():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y, _ = Squeeze(2)(x)
    # Channel i*2+j holds pixel (2h+i, 2w+j).
    assert y[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert y[0, :, 1, 1].tolist() == [10.0, 11.0, 14.0, 15.0]


def test_prior_log_prob_matches_torch_normal():
    torch.manual_seed(5)
    prior = LearnedGaussianPrior((3, 4, 4))
    _randomise(prior)
    z = torch.randn(2, 3, 4, 4)
    expected = torch.distributions.Normal(prior.mean, prior.log_std.exp()).log_prob(z).sum(dim=1)
    assert torch.allclose(prior.log_prob_map(z), expected, atol=1e-5)


def test_class_conditional_prior_per_class_and_with_labels_agree():
    torch.manual_seed(6)
    prior = LearnedGaussianPrior((2, 2, 2), num_classes=3)
    _randomise(prior)
    z = torch.randn(4, 2, 2, 2)
    labels = torch.tensor([0, 2, 1, 2])
    all_classes = prior.log_prob_map(z)
    assert all_classes.shape == (4, 3, 2, 2)
    picked = all_classes[torch.arange(4), labels]
    assert torch.allclose(prior.log_prob_map(z, labels), picked)
    # Independent check for class 1.
    normal = torch.distributions.Normal(prior.mean[1], prior.log_std[1].exp())
    assert torch.allclose(all_classes[:, 1], normal.log_prob(z).sum(dim=1), atol=1e-5)


def test_flow_sequence_adds_maps():
    torch.manual_seed(7)
    seq = FlowSequence([ActNorm(4), InvConv1x1(4), AffineCoupling(4, 8)]).double().eval()
    _randomise(seq)
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    _, logdet = seq(x)
    assert logdet.sum().item() == pytest.approx(_brute_force_logdet(seq, x), abs=1e-3)
    assert not math.isnan(logdet.sum().item())


@pytest.mark.parametrize("name", ["affine", "additive"])
def test_coupling_networks_in_bfloat16_round_only_the_network_and_restore(name):
    """Inside coupling_networks_in the network's output is bfloat16-rounded (the shift and scale agree with
    float32 to bfloat16's precision), y and the log-det stay float32 and invertible at that precision; outside,
    the layer computes exactly as before."""
    from medflowad.flows.coupling import coupling_networks_in

    torch.manual_seed(3)
    layer = LAYERS[name](4)
    _randomise(layer)
    x = torch.randn(2, 4, 6, 6)
    y32, logdet32 = layer(x)
    with coupling_networks_in(layer, torch.bfloat16):
        y16, logdet16 = layer(x)
        back, _ = layer.inverse(y16)
    assert y16.dtype == logdet16.dtype == torch.float32
    assert not torch.equal(y16, y32) and torch.allclose(y16, y32, rtol=0.05, atol=0.05)
    assert torch.allclose(logdet16, logdet32, rtol=0.05, atol=0.05)
    assert torch.allclose(back, x, atol=1e-5)  # the same rounded network both ways: inverse still exact
    y_after, logdet_after = layer(x)
    assert torch.equal(y_after, y32) and torch.equal(logdet_after, logdet32)


@pytest.mark.parametrize("nhwc", [False, True])
def test_reduced_precision_network_runs_nhwc_and_answers_in_the_models_layout(nhwc):
    """In bfloat16 the coupling network's convolutions get an NHWC input whatever the model's layout (oneDNN's
    fast path), and its output comes back in the layout of the channel slice it was given, with the values of
    the same network run on the NCHW input to bfloat16's precision."""
    from medflowad.flows.coupling import coupling_network, run_network

    torch.manual_seed(4)
    net = coupling_network(3, 6, 8)
    _randomise(net)
    x = torch.randn(2, 6, 5, 7)
    if nhwc:
        net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    x_a = x[:, :3]
    seen = []
    net[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    out = run_network(net, x_a, torch.bfloat16)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)  # autocast casts it inside each convolution
    layout = torch.channels_last if nhwc else torch.contiguous_format
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=layout)
    reference = net(x_a.contiguous())
    assert torch.allclose(out, reference, rtol=0.05, atol=0.05) and not torch.equal(out, reference)
