"""Latent cache: preprocessing, scale and lookup by NSD id."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from braid import nsd
from braid.common import BraidError
from braid.latents import LatentCache, cache_latents, preprocess, read_stimuli
from braid.models import load_vae


def test_preprocess_range_and_size():
    img = np.zeros((2, 425, 425, 3), np.uint8)
    img[1] = 255
    x = preprocess(img, 64)
    assert x.shape == (2, 3, 64, 64)
    assert torch.allclose(x[0], torch.tensor(-1.0)) and torch.allclose(x[1], torch.tensor(1.0))


def test_cache_is_scaled_posterior_mean_keyed_by_id(mirror, tiny_model, tmp_path):
    root, _ = mirror
    ids = np.array([5, 2, 9, 2])
    cache_latents(root / nsd.STIMULI, tiny_model, ids, tmp_path / "latents.zarr", image_size=64)
    cache = LatentCache(tmp_path / "latents.zarr")
    assert cache.ids.tolist() == [2, 5, 9] and cache.shape == (4, 8, 8)
    vae = load_vae(tiny_model)
    with torch.no_grad():
        x = preprocess(read_stimuli(root / nsd.STIMULI, np.array([9, 5])), 64)
        expected = (vae.encode(x).latent_dist.mean * 0.13025).numpy()
    assert vae.config.scaling_factor == 0.13025
    np.testing.assert_allclose(cache.get([9, 5]), expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(BraidError, match=r"no latents for NSD ids \[3\]"):
        cache.get([3])


def test_read_stimuli_any_order(mirror):
    root, _ = mirror
    a = read_stimuli(root / nsd.STIMULI, np.array([4, 1]))
    b = read_stimuli(root / nsd.STIMULI, np.array([1, 4]))
    np.testing.assert_array_equal(a[::-1], b)
    with pytest.raises(BraidError, match="imgBrick has"):
        read_stimuli(root / nsd.STIMULI, np.array([10_000]))
