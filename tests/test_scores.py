"""medflowad.scores against independent computations: the class mixture by hand, batch-size invariance, PNG
sizes from files written and read back, and the bin-centre input formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from medflowad.flows import GlowConfig
from medflowad.scores import likelihoods, png_bits_per_dim
from medflowad.units import to_model_input
from tests.flows.test_glow import _trained_looking_glow

CONFIG = GlowConfig(in_channels=1, image_size=(8, 8), levels=2, steps=2, hidden=8)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_class_mixture_and_contributions_of_the_most_likely_class_by_hand():
    """log p(x) = log((1/K) sum_c exp(log p(x|c))) in float64 Python, contributions under argmax_c log p(x|c)."""
    model = _trained_looking_glow(GlowConfig(**{**CONFIG.to_dict(), "num_classes": 3}), seed=7)
    images = _images(4)
    result = likelihoods(model, images, keep_maps=True)
    for n in range(4):
        per_class, per_scale = [], []
        for c in range(3):
            with torch.no_grad():
                out = model(to_model_input(images[n : n + 1]), torch.tensor([c]))
            per_scale.append(out.contributions[0].double().tolist())
            per_class.append(sum(per_scale[-1]))
        top = max(per_class)
        mixture = top + math.log(sum(math.exp(v - top) for v in per_class) / 3)
        assert result.log_prob[n] == pytest.approx(mixture, abs=1e-3)
        best = per_class.index(top)
        assert result.contributions[n] == pytest.approx(per_scale[best], abs=1e-3)
        assert result.maps[-1][n].sum() == pytest.approx(per_scale[best][-1], abs=1e-3)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_likelihoods_do_not_depend_on_the_batch_size(num_classes):
    model = _trained_looking_glow(GlowConfig(**{**CONFIG.to_dict(), "num_classes": num_classes}), seed=8)
    images = _images(7, seed=1)
    whole = likelihoods(model, images, batch_size=7, keep_maps=True)
    for batch_size in (1, 3):
        split = likelihoods(model, images, batch_size=batch_size, keep_maps=True)
        np.testing.assert_allclose(split.log_prob, whole.log_prob, rtol=0, atol=1e-3)
        np.testing.assert_allclose(split.contributions, whole.contributions, rtol=0, atol=1e-3)
        for a, b in zip(split.maps, whole.maps, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


def test_png_bits_per_dim_is_the_size_of_a_lossless_png_file(tmp_path):
    """8 x (size of the PNG file written to disk at zlib level 9) / dims, and the file decodes to the image."""
    grey = _images(2, seed=3)
    rgb = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    for images in (grey, rgb):
        bits = png_bits_per_dim(images)
        for n, image in enumerate(images):
            array = image.permute(1, 2, 0).numpy()
            array = array[..., 0] if array.shape[-1] == 1 else array
            path = tmp_path / f"{n}.png"
            Image.fromarray(array).save(path, compress_level=9)
            assert bits[n] == pytest.approx(8 * path.stat().st_size / image.numel())
            assert np.array_equal(np.asarray(Image.open(path)), array)
    flat = torch.zeros(1, 1, 64, 64, dtype=torch.uint8)
    assert png_bits_per_dim(flat)[0] < png_bits_per_dim(_images(1).repeat(1, 1, 8, 8))[0]


def test_model_input_is_the_bin_centre():
    """Pixel k maps to (k + 1/2) / 256 - 1/2: the centre of its bin of [-1/2, 1/2)."""
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    expected = torch.tensor([(k + 0.5) / 256 - 0.5 for k in range(256)]).reshape(1, 1, 16, 16)
    assert torch.equal(to_model_input(pixels), expected)
    noise = torch.full_like(pixels, 0.25, dtype=torch.float32)
    assert torch.equal(to_model_input(pixels, noise),
                       torch.tensor([(k + 0.25) / 256 - 0.5 for k in range(256)]).reshape(1, 1, 16, 16))
