"""Latent cache: preprocessing (pinned to PIL's bicubic resize, as Brain-Diffuser's), scale, every
VAE dtype, and lookup by NSD id."""

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


def test_preprocess_refuses_what_is_not_uint8_rgb():
    for bad in (np.zeros((1, 8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8), np.zeros((1, 8, 8, 4), np.uint8)):
        with pytest.raises(BraidError, match=r"stimuli must be uint8 \(n, H, W, 3\)"):
            preprocess(bad, 8)


def test_preprocess_is_brain_diffusers_pil_bicubic_without_crop():
    """Brain-Diffuser: PIL resize(BICUBIC) -> to_tensor -> 2x - 1, on noise (where filters differ most)
    and on an image whose right and bottom edges are marked (a crop or a flip would move them)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    marked = np.full((425, 425, 3), 128, np.uint8)
    marked[:, -60:, 0] = 255  # red band at the right edge
    marked[-60:, :, 2] = 0  # no blue at the bottom
    images = np.stack([rng.integers(0, 256, (425, 425, 3), dtype=np.uint8), marked])
    x = preprocess(images, 64).numpy()
    for img, got in zip(images, x):
        ref = np.asarray(Image.fromarray(img).resize((64, 64), Image.Resampling.BICUBIC), np.float32) / 255 * 2 - 1
        np.testing.assert_allclose(np.moveaxis(got, 0, -1), ref, atol=1e-6)
    assert (x[1, 0, :, -5:] > 0.9).all() and (x[1, 0, :, :40] < 0.1).all()
    assert (x[1, 2, -5:, :] < -0.9).all() and (x[1, 2, :40, :] > -0.1).all()
    same = preprocess(images[:, :64, :64], 64).numpy()  # already the model's size: no resampling
    np.testing.assert_array_equal(np.moveaxis(same, 1, -1), images[:, :64, :64] / np.float32(255) * 2 - 1)


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
    assert cache.attrs["scaling_factor"] == 0.13025 and cache.attrs["image_size"] == 64
    np.testing.assert_array_equal(cache.get([9, 2, 9]), cache.get([9, 2, 9])[[0, 1, 0]])
    np.testing.assert_array_equal(cache.get([9, 2, 9])[1], cache.get([2])[0])
    with pytest.raises(BraidError, match=r"no latents for NSD ids \[1000000\]"):
        cache.get([10**6])  # beyond the largest id
    with pytest.raises(BraidError, match="not a BRAID latent cache"):
        LatentCache(tmp_path / "nothing.zarr")


def test_no_images_give_no_latents(tiny_model):
    from braid.latents import encode_images

    z = encode_images(np.zeros((0, 425, 425, 3), np.uint8), load_vae(tiny_model), 64)
    assert z.shape == (0, 4, 8, 8) and z.dtype == np.float32


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_vae_dtype_caches_finite_latents_close_to_float32(mirror, tiny_model, tmp_path, dtype):
    """float16 keeps the SDXL-like VAE (force_upcast) in float32; bfloat16 runs in bfloat16."""
    root, _ = mirror
    ids = np.array([1, 2, 3])
    cache_latents(root / nsd.STIMULI, tiny_model, ids, tmp_path / "f32.zarr", image_size=64)
    cache_latents(root / nsd.STIMULI, tiny_model, ids, tmp_path / f"{dtype}.zarr", image_size=64, dtype=dtype)
    ref, got = LatentCache(tmp_path / "f32.zarr").get(ids), LatentCache(tmp_path / f"{dtype}.zarr").get(ids)
    assert np.isfinite(got).all()
    tol = 0 if dtype == "float16" else 0.05 * np.abs(ref).max()  # float16 -> the float32 VAE: identical
    np.testing.assert_allclose(got, ref, atol=tol)
    assert dtype == "float16" or not np.array_equal(got, ref)  # bfloat16 really ran in bfloat16
    assert load_vae(tiny_model, dtype=dtype).dtype == (torch.float32 if dtype == "float16" else torch.bfloat16)


def test_read_stimuli_any_order(mirror, tmp_path):
    root, _ = mirror
    a = read_stimuli(root / nsd.STIMULI, np.array([4, 1]))
    b = read_stimuli(root / nsd.STIMULI, np.array([1, 4]))
    np.testing.assert_array_equal(a[::-1], b)
    with pytest.raises(BraidError, match="imgBrick has"):
        read_stimuli(root / nsd.STIMULI, np.array([10_000]))
    with pytest.raises(BraidError, match="imgBrick has"):
        read_stimuli(root / nsd.STIMULI, np.array([-1]))
    import h5py

    with h5py.File(root / nsd.STIMULI, "r") as f:
        n, first, last = f["imgBrick"].shape[0], f["imgBrick"][0], f["imgBrick"][-1]
    np.testing.assert_array_equal(read_stimuli(root / nsd.STIMULI, np.array([n - 1, 0])), np.stack([last, first]))
    with pytest.raises(BraidError, match="imgBrick has"):
        read_stimuli(root / nsd.STIMULI, np.array([n]))
    assert read_stimuli(root / nsd.STIMULI, np.array([], np.int64)).shape == (0, 425, 425, 3)
    bad = tmp_path / "corrupt.hdf5"
    bad.write_bytes((root / nsd.STIMULI).read_bytes()[:3000])
    with pytest.raises(BraidError, match="corrupt.hdf5: cannot read imgBrick"):
        read_stimuli(bad, np.array([1]))
