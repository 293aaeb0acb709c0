"""Invertible layers and the multi-scale Glow."""

from medflowad.flows.actnorm import ActNorm
from medflowad.flows.base import FlowSequence, InvertibleLayer
from medflowad.flows.conv1x1 import InvConv1x1
from medflowad.flows.coupling import AdditiveCoupling, AffineCoupling
from medflowad.flows.glow import Glow, GlowConfig, GlowOutput, class_mixture_log_prob
from medflowad.flows.prior import LearnedGaussianPrior
from medflowad.flows.squeeze import Squeeze

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "FlowSequence",
    "Glow",
    "GlowConfig",
    "GlowOutput",
    "InvConv1x1",
    "InvertibleLayer",
    "LearnedGaussianPrior",
    "Squeeze",
    "class_mixture_log_prob",
]
