"""The tiny pipeline trained on the synthetic stimuli: latent rescaling, learning, loading, determinism."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from braid.common import BraidError
from braid.model_training import WEIGHTS, rescale_latents, train_tiny_sdxl
from braid.models import MANIFEST, TINY_VAE_CONFIG, load_img2img

SHORT = {"vae_steps": 150, "unet_steps": 150, "batch_size": 8}


def test_rescaling_multiplies_the_latent_distribution_and_keeps_the_decoded_image():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE_CONFIG).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        before = vae.encode(x).latent_dist
        image = vae.decode(before.mean).sample
        rescale_latents(vae, 3.7)
        after = vae.encode(x).latent_dist
        image_after = vae.decode(after.mean).sample
    torch.testing.assert_close(after.mean, 3.7 * before.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after.std, 3.7 * before.std, rtol=1e-4, atol=1e-6)  # the same distribution, scaled
    torch.testing.assert_close(image_after, image, rtol=1e-4, atol=1e-5)  # the decoder undoes it exactly


@pytest.fixture(scope="module")
def trained(mirror, tmp_path_factory):
    from braid import nsd

    root, _ = mirror
    out = tmp_path_factory.mktemp("trained") / "tiny-trained"
    info = train_tiny_sdxl(root / nsd.STIMULI, out, image_size=32, seed=0, recipe=SHORT)
    return out, info, root / nsd.STIMULI


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


def _vae_psnr(vae, images_uint8: np.ndarray) -> float:
    """Mean PSNR of the VAE's reconstructions, images resized with PIL (bicubic) as the latents stage does."""
    from PIL import Image

    small = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.Resampling.BICUBIC)) for im in images_uint8])
    x = torch.from_numpy(small).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        recon = vae.decode(vae.encode(x).latent_dist.mean).sample
    a, b = small / 255.0, ((recon.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return float(np.mean([_psnr(p, q) for p, q in zip(a, b)]))


def test_the_trained_pipeline_loads_like_ssd1b_and_has_learned_the_stimuli(trained):
    import h5py
    from diffusers import AutoencoderKL

    out, info, stimuli_path = trained
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["weights"] == WEIGHTS and manifest["recipe"]["vae_steps"] == 150 and manifest["n_images"] > 30
    pipe = load_img2img(out)  # the path that loads segmind/SSD-1B
    assert pipe.vae.config.scaling_factor == pytest.approx(0.13025)  # SDXL's, kept
    with h5py.File(stimuli_path) as f:
        images = f["imgBrick"][:]
    torch.manual_seed(0)
    untrained = AutoencoderKL(**TINY_VAE_CONFIG).eval()  # the same initial weights (seed 0)
    learned, chance = _vae_psnr(pipe.vae, images), _vae_psnr(untrained, images)
    # measured 14.4 vs 11.0 dB; untrained weights are the same initialisation, so no learning gives +0
    assert learned > chance + 1.5, (learned, chance)  # dB, after a short recipe
    assert manifest["vae_psnr_db"] == pytest.approx(learned, abs=0.3)  # the manifest reports what it measured
    # the scaled latent means have unit variance over the stimuli it was trained on (SDXL's scale,
    # rescaled VAE): the stimuli as training saw them, resized here with PIL (bicubic, 32 px)
    from PIL import Image

    small = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.Resampling.BICUBIC)) for im in images])
    x = torch.from_numpy(small).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
    assert float(z.std()) == pytest.approx(1.0, rel=1e-3)


def test_the_trained_unet_predicts_the_noise_better_than_untrained(trained):
    from diffusers import UNet2DConditionModel

    from braid.model_training import img2img_conditioning
    from braid.models import TINY_UNET_CONFIG

    out, _, stimuli_path = trained
    pipe = load_img2img(out)
    import h5py

    with h5py.File(stimuli_path) as f:
        images = f["imgBrick"][:16]
    from braid.latents import encode_images

    z0 = torch.from_numpy(encode_images(images, pipe.vae, 32))
    embeds, added = img2img_conditioning(pipe, 32)
    a = pipe.scheduler.alphas_cumprod.float()
    g = torch.Generator().manual_seed(1)
    t = torch.full((len(z0),), 500)
    noise = torch.randn(z0.shape, generator=g)
    xt = a[500].sqrt() * z0 + (1 - a[500]).sqrt() * noise
    torch.manual_seed(5)
    errors = {}
    for name, unet in (("trained", pipe.unet), ("untrained", UNet2DConditionModel(**TINY_UNET_CONFIG))):
        with torch.no_grad():
            pred = unet(xt, t, encoder_hidden_states=embeds.expand(len(z0), -1, -1),
                        added_cond_kwargs={k: v.expand(len(z0), -1) for k, v in added.items()}).sample
        errors[name] = float(((pred - noise) ** 2).mean())
    assert errors["trained"] < 0.5 * errors["untrained"] and errors["trained"] < 0.6, errors  # measured 0.18 vs 1.19


def test_the_same_seed_gives_the_same_model_and_bad_stimuli_are_named(trained, tmp_path):
    from safetensors.torch import load_file

    _, _, stimuli_path = trained
    recipe = {"vae_steps": 3, "unet_steps": 3, "batch_size": 4}
    a = train_tiny_sdxl(stimuli_path, tmp_path / "a", 32, seed=1, recipe=recipe)
    b = train_tiny_sdxl(stimuli_path, tmp_path / "b", 32, seed=1, recipe=recipe)
    assert math.isclose(a["final_loss"]["vae"], b["final_loss"]["vae"], rel_tol=1e-6)
    for part in ("vae", "unet"):
        wa = load_file(tmp_path / "a" / part / "diffusion_pytorch_model.safetensors")
        wb = load_file(tmp_path / "b" / part / "diffusion_pytorch_model.safetensors")
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)
    broken = tmp_path / "broken.hdf5"
    broken.write_bytes(stimuli_path.read_bytes()[:1000])
    with pytest.raises(BraidError, match="broken.hdf5.*nsd_synthetic_stimuli"):
        train_tiny_sdxl(broken, tmp_path / "c", 32, recipe=recipe)
    assert not (tmp_path / "c").exists()
