"""Losses and score signs against hand-computed values (METHOD.md conventions)."""

import math

import numpy as np
import pytest
import torch

from medflowad.flows.glow import class_mixture_log_prob
from medflowad.scores import Likelihoods, scores_from_likelihoods
from medflowad.training.losses import outlier_bce, outlier_bce_per_location, outlier_margin, wrong_class_bce
from medflowad.units import bits_per_dim


def test_outlier_bce_hand_example():
    log_p_in = torch.tensor([-10.0, -20.0])
    log_p_g = torch.tensor([-12.0, -15.0])
    # d/T = [(-10 + 12) / 2, (-20 + 15) / 2] = [1, -2.5]
    expected = (math.log(1 + math.e**1) + math.log(1 + math.e**-2.5)) / 2
    assert outlier_bce(log_p_in, log_p_g, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_outlier_bce_pushes_general_samples_down_under_p_in():
    log_p_in = torch.tensor([-10.0], requires_grad=True)
    outlier_bce(log_p_in, torch.tensor([-12.0]), temperature=1000.0).backward()
    assert log_p_in.grad.item() > 0  # minimising the loss lowers log p_in of general samples


def test_per_location_outlier_bce_hand_example():
    # one image, scale 1: 2 channels at 2 locations, scale 2: 4 channels at 1 location; D = 2 * 2 + 4 = 8
    maps_in = [torch.tensor([[[-1.0, -3.0]]]), torch.tensor([[[-2.0]]])]
    maps_g = [torch.tensor([[[-2.0, -1.0]]]), torch.tensor([[[-6.0]]])]
    t = 16.0  # per-location temperatures 16 * 2 / 8 = 4 (scale 1) and 16 * 4 / 8 = 8 (scale 2)
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 2 / 8 * (softplus(1 / 4) + softplus(-2 / 4)) + 4 / 8 * softplus(4 / 8)
    assert outlier_bce_per_location(maps_in, maps_g, [2, 4], t).item() == pytest.approx(expected, rel=1e-6)


def test_per_location_outlier_bce_equals_the_image_loss_when_the_difference_is_even():
    # d per dimension 0.3 nats everywhere: scale 1 (3 channels, 4x4) and scale 2 (12 channels, 2x2), D = 96
    maps_g = [torch.zeros(2, 4, 4), torch.zeros(2, 2, 2)]
    maps_in = [torch.full((2, 4, 4), 3 * 0.3), torch.full((2, 2, 2), 12 * 0.3)]
    whole = outlier_bce(torch.full((2,), 96 * 0.3), torch.zeros(2), temperature=50.0)
    local = outlier_bce_per_location(maps_in, maps_g, [3, 12], temperature=50.0)
    assert local.item() == pytest.approx(whole.item(), rel=1e-6)


def test_per_location_outlier_bce_keeps_pushing_where_the_image_loss_has_stopped():
    """One location already far less likely under p_in, one not: the image's sum is far below zero, so the
    whole-image loss gives both almost no gradient; the per-location loss still pushes the second, at the
    slope 1 / (2T) per nat that the image loss has at d = 0, and leaves the first alone."""
    t = 10.0
    maps_in = torch.tensor([[[-1000.0, 0.0]]], requires_grad=True)
    outlier_bce_per_location([maps_in], [torch.zeros(1, 1, 2)], [1], t).backward()
    assert maps_in.grad[0, 0, 0].item() == pytest.approx(0.0, abs=1e-12)
    assert maps_in.grad[0, 0, 1].item() == pytest.approx(1 / (2 * t), rel=1e-6)
    log_p_in = torch.tensor([-1000.0], requires_grad=True)
    outlier_bce(log_p_in, torch.zeros(1), temperature=t).backward()
    assert log_p_in.grad.item() < 1e-40


def test_outlier_margin_hand_example():
    nll_in = torch.tensor([100.0, 100.0, 50.0])
    nll_g = torch.tensor([105.0, 130.0])
    # pairs (100, 105) and (100, 130) with m = 10: relu(5) and relu(-20)
    assert outlier_margin(nll_in, nll_g, margin=10.0).item() == pytest.approx(2.5)


def test_class_mixture_and_wrong_class_bce_hand_example():
    per_class = torch.tensor([[-1.0, -3.0], [-2.0, -2.0]])
    mix = class_mixture_log_prob(per_class)
    assert mix[0].item() == pytest.approx(math.log((math.exp(-1) + math.exp(-3)) / 2))
    assert mix[1].item() == pytest.approx(-2.0)
    log_p_g = torch.tensor([-2.0, -4.0])
    labels = torch.tensor([0, 1])
    # wrong classes: image 0 class 1 -> (-3 + 2) / 1; image 1 class 0 -> (-2 + 4) / 1
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2
    assert wrong_class_bce(per_class, log_p_g, labels, temperature=1.0).item() == pytest.approx(expected)


def test_bits_per_dim_formula():
    # (1000 + 100 ln 256) / (100 ln 2) = 1000 / (100 ln 2) + 8
    assert bits_per_dim(torch.tensor(-1000.0), 100).item() == pytest.approx(1000 / (100 * math.log(2)) + 8)


def test_score_signs_follow_method():
    """Higher = more anomalous: an image more likely under p_g than p_in gets a positive llr."""
    p_in = Likelihoods(np.array([-100.0, -300.0]), np.array([[-60.0, -40.0], [-100.0, -200.0]]))
    p_g = Likelihoods(np.array([-150.0, -250.0]), np.array([[-90.0, -60.0], [-100.0, -150.0]]))
    s = scores_from_likelihoods(10, p_in, p_g, png_bpd=np.array([1.0, 2.0]))
    assert s["llr"].tolist() == [-50.0, 50.0]
    assert s["last_scale"].tolist() == [40.0, 200.0]
    assert s["c_1"].tolist() == [60.0, 100.0]
    nll = [(100 + 10 * math.log(256)) / (10 * math.log(2)), (300 + 10 * math.log(256)) / (10 * math.log(2))]
    assert s["nll"] == pytest.approx(nll)
    assert s["input_complexity"] == pytest.approx([nll[0] - 1.0, nll[1] - 2.0])
    assert s["nll_general"][1] < s["nll"][1]
