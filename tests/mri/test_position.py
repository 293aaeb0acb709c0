"""Position-aware in-distribution models: position classes, class priors started from the general model,
likelihoods under a known class, the masked class-conditional objective, and a trained model end to end."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from medflowad.config import ConfigError
from medflowad.data.slice_sets import load_slice_tensors
from medflowad.flows import Glow, GlowConfig
from medflowad.mri.config import mri_config_from_dict
from medflowad.mri.model import load_mri_model
from medflowad.mri.position import position_classes
from medflowad.mri.training import train_mri_model
from medflowad.scores import likelihoods
from medflowad.storage import ModelFolderError, load_weights
from medflowad.training.trainer import _Objective
from medflowad.units import to_model_input
from tests.flows.test_glow import _trained_looking_glow
from tests.mri.conftest import TINY_MRI, brain_like, oblique_lps_affine, save_nifti
from tests.training.test_trainer import tiny_config

CONFIG = GlowConfig(in_channels=1, image_size=(16, 16), levels=2, steps=2, hidden=8)


def _scan(keep: list[bool]) -> SimpleNamespace:
    return SimpleNamespace(keep=np.array(keep), num_slices=len(keep))


def test_position_classes_by_hand():
    # standard space: the class of slice z is floor(3 z / 10) of the grid's 10 slices
    scan = _scan([False] + [True] * 8 + [False])
    assert position_classes(scan, standard=True, bins=3).tolist() == [-1, 0, 0, 0, 1, 1, 1, 2, 2, -1]
    # own grid: relative position among the scored slices 2..8 in 16 levels (0, 2, 5, 8, 10, 13, 15), 4 bins
    scan = _scan([False, False] + [True] * 7 + [False] * 3)
    assert position_classes(scan, standard=False, bins=4).tolist() == [-1, -1, 0, 0, 1, 2, 2, 3, 3, -1, -1, -1]


def test_an_unconditional_model_starts_every_class_prior(tmp_path):
    general = _trained_looking_glow(CONFIG)
    save_file(general.state_dict(), str(tmp_path / "general.safetensors"))
    conditional = Glow(GlowConfig(**{**CONFIG.to_dict(), "num_classes": 3}))
    with pytest.raises(ModelFolderError, match="wrong shape"):
        load_weights(conditional, tmp_path / "general.safetensors")
    load_weights(conditional, tmp_path / "general.safetensors", classes_from_unconditional=True)
    conditional.eval()
    x = torch.rand(4, 1, 16, 16) - 0.5
    with torch.no_grad():
        per_class, unconditional = conditional(x).log_prob, general(x).log_prob
    for c in range(3):
        assert torch.allclose(per_class[:, c], unconditional, atol=1e-4)


def test_likelihood_under_a_known_class_matches_a_hand_computation():
    """log p(x | c) = sum of log-dets + log N(z_i; mu_i[c], sigma_i[c]), with torch.distributions, per scale."""
    model = _trained_looking_glow(GlowConfig(**{**CONFIG.to_dict(), "num_classes": 3}))
    images = torch.randint(0, 256, (5, 1, 16, 16), dtype=torch.uint8)
    labels = torch.tensor([2, 0, 1, 2, 0])
    result = likelihoods(model, images, batch_size=2, keep_maps=True, labels=labels)
    with torch.no_grad():
        out = model(to_model_input(images))
        for n, c in enumerate(labels.tolist()):
            per_scale = []
            for i, (z, logdet) in enumerate(zip(out.latents, out.logdet_maps, strict=True)):
                prior = model.priors[i]
                normal = torch.distributions.Normal(prior.mean[c], prior.log_std[c].exp())
                per_scale.append(float(logdet[n].sum() + normal.log_prob(z[n]).sum()))
                location = logdet[n] + normal.log_prob(z[n]).sum(dim=0)
                assert np.allclose(result.maps[i][n], location.numpy(), atol=1e-4)
            assert np.allclose(result.contributions[n], per_scale, atol=1e-3)
            assert math.isclose(result.log_prob[n], sum(per_scale), abs_tol=1e-3)
    with pytest.raises(ValueError, match=r"one label in 0\.\.2"):
        likelihoods(model, images, labels=torch.tensor([0, 1, 2, 3, 0]))


def test_masked_class_objective_reaches_only_the_own_class_at_kept_locations():
    config = tiny_config("unused.npz", model={**CONFIG.to_dict(), "num_classes": 2}, supervised=True)
    model = _trained_looking_glow(GlowConfig(**{**CONFIG.to_dict(), "num_classes": 2}))
    x = torch.rand(2, 1, 16, 16) - 0.5
    mask = torch.ones(2, 1, 16, 16)
    mask[:, 0, :4, :4] = 0  # the top-left 4x4 pixels: one location of scale 2, four of scale 1
    loss, _ = _Objective(model, None, config)(x, torch.tensor([1, 1]), None, mask)
    loss.backward()
    for i, prior in enumerate(model.priors):
        assert torch.all(prior.mean.grad[0] == 0), i  # class 0 is no image's class
        cells = 4 // 2 ** (i + 1)
        assert torch.all(prior.mean.grad[1, :, :cells, :cells] == 0), i  # masked locations
        assert prior.mean.grad[1, :, cells:, cells:].abs().sum() > 0, i


@pytest.mark.parametrize("change", [{"position_bins": 1}, {"position_bins": -2},
                                    {"position_bins": 4, "outlier": {"enabled": True}},
                                    {"model": {**TINY_MRI["model"], "num_classes": 2}}])
def test_position_settings_are_checked(change):
    with pytest.raises(ConfigError):
        mri_config_from_dict({**TINY_MRI, **change})


def test_position_aware_model_trains_and_scores_each_slice_under_its_class(tmp_path):
    root = tmp_path
    affine = oblique_lps_affine()
    healthy = [save_nifti(root / f"healthy_{i}.nii.gz", brain_like(seed=i), affine) for i in range(3)]
    pool_dir = root / "pool_src"
    pool_dir.mkdir()
    save_nifti(pool_dir / "other.nii.gz", brain_like(shape=(40, 40, 10), seed=10), np.eye(4))
    from medflowad.mri.pool import build_pool
    from medflowad.prep import prepare

    config = mri_config_from_dict({**TINY_MRI, "position_bins": 3})
    build_pool([pool_dir], root / "pool", config.preprocessing)
    train_mri_model(config, healthy, root / "model", pool=root / "pool", show_progress=False, echo=lambda m: None)
    in_config = yaml.safe_load((root / "model" / "in" / "config.yaml").read_text())
    assert in_config["model"]["num_classes"] == 3 and in_config["supervised"] is True
    general_config = yaml.safe_load((root / "model" / "general" / "config.yaml").read_text())
    assert general_config["model"]["num_classes"] == 0

    model = load_mri_model(root / "model")
    train_set = load_slice_tensors(root / "model" / "data" / "healthy_train")
    assert set(train_set["labels"].tolist()) == {0, 1, 2}
    prepared = prepare(healthy[0], config.preprocessing)
    from medflowad.mri.model import analyse

    analysis = analyse(model, prepared)
    kept = np.nonzero(prepared.keep)[0]
    classes = position_classes(prepared, standard=False, bins=3)[kept]
    with torch.no_grad():
        x = to_model_input(prepared.slices[kept])
        per_class = model.in_model(x).log_prob.numpy()  # (N, 3): every class, by the unlabelled path
        general = model.general_model(x).log_prob.numpy()
    expected = general - per_class[np.arange(len(kept)), classes]
    assert np.allclose(analysis.slice_scores["llr"][kept], expected, rtol=1e-4, atol=1e-2)
