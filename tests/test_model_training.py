"""The tiny pipeline trained on the synthetic stimuli: latent rescaling, learning, loading, determinism."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from braid.common import BraidError
from braid.model_training import CaptionConditioning, WEIGHTS, read_training_captions, rescale_latents, train_tiny_sdxl
from braid.models import MANIFEST, TINY_VAE_CONFIG, load_img2img

SHORT = {"vae_steps": 150, "text_steps": 150, "unet_steps": 150, "batch_size": 8}


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
    captions = read_training_captions(root / nsd.STIMULI, root / nsd.STIM_INFO)
    info = train_tiny_sdxl(root / nsd.STIMULI, out, image_size=32, seed=0, recipe=SHORT, captions=captions)
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

    from braid.models import TINY_UNET_CONFIG

    out, _, stimuli_path = trained
    pipe = load_img2img(out)
    import h5py

    with h5py.File(stimuli_path) as f:
        images = f["imgBrick"][:16]
    from braid.latents import encode_images

    z0 = torch.from_numpy(encode_images(images, pipe.vae, 32))
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt("", device="cpu", do_classifier_free_guidance=False)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
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


def test_each_training_image_is_conditioned_on_its_own_captions_or_none(tiny_model):
    """Without dropout every sample's embeddings are diffusers' encoding of one of its image's captions
    or the mean of all of them (both occur); with dropout 1 half are zeros and half the empty prompt."""
    pipe = load_img2img(tiny_model)
    captions = [["a red bus.", "a bus on a road."], ["a cat.", "a small cat.", "a tabby cat."]]
    with torch.no_grad():
        def enc(texts):
            t, _, p, _ = pipe.encode_prompt(texts, device="cpu", do_classifier_free_guidance=False)
            return t, p

        own = {i: enc(c) for i, c in enumerate(captions)}
        empty = enc([""])
        conditioning = CaptionConditioning(pipe, 32, captions, dropout=0.0)
        index = torch.tensor([0, 1] * 12)
        tokens, added = conditioning.sample(index, torch.Generator().manual_seed(0))
    assert tokens.shape == (24, 77, 64) and added["text_embeds"].shape == (24, 32)
    assert added["time_ids"].tolist()[0] == [32, 32, 0, 0, 32, 32]
    kinds = set()
    for row, i in enumerate(index.tolist()):
        t, p = own[i]
        choices = {**{f"caption {k}": (t[k], p[k]) for k in range(len(t))}, "mean": (t.mean(0), p.mean(0))}
        hit = [name for name, (ct, cp) in choices.items()
               if torch.allclose(tokens[row], ct, atol=1e-5) and torch.allclose(added["text_embeds"][row], cp, atol=1e-5)]
        assert hit, row  # its own image's text, never the other image's
        kinds.add("mean" if "mean" in hit else "caption")
    assert kinds == {"mean", "caption"}
    with torch.no_grad():
        tokens, added = CaptionConditioning(pipe, 32, captions, dropout=1.0).sample(index, torch.Generator().manual_seed(1))
    zeros = (tokens.abs().sum((1, 2)) == 0) & (added["text_embeds"].abs().sum(1) == 0)
    empties = torch.tensor([torch.allclose(t, empty[0][0], atol=1e-6) for t in tokens])
    assert (zeros | empties).all() and 0 < int(zeros.sum()) < 24
    with torch.no_grad():  # no captions: the empty prompt for every image
        tokens, _ = CaptionConditioning(pipe, 32, None).sample(index, torch.Generator().manual_seed(1))
    assert all(torch.allclose(t, empty[0][0], atol=1e-6) for t in tokens)


def _category_margin(model_dir, mirror_root) -> float:
    """Mean cosine (centred over captions) between the pooled embeddings of captions of one category
    minus that between captions of different categories, with numpy on diffusers' encodings."""
    from braid import nsd

    pipe = load_img2img(model_dir)
    captions = read_training_captions(mirror_root / nsd.STIMULI, mirror_root / nsd.STIM_INFO)
    categories = nsd.load_stim_info(mirror_root / nsd.STIM_INFO)["category"].to_numpy()[: len(captions)]
    texts = [c for caps in captions for c in caps]
    labels = np.repeat(categories, [len(caps) for caps in captions])
    with torch.no_grad():
        _, _, pooled, _ = pipe.encode_prompt(texts, device="cpu", do_classifier_free_guidance=False)
    v = pooled.numpy().astype(np.float64)
    v -= v.mean(0)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    cos = v @ v.T
    same = labels[:, None] == labels[None]
    off_diagonal = ~np.eye(len(v), dtype=bool)
    return float(cos[same & off_diagonal].mean() - cos[~same].mean())


def test_the_text_encoders_learn_what_captions_mean_before_the_unet_and_only_with_captions(trained, mirror, tmp_path):
    """Trained on captions, the text encoders give the captions of one category (one photograph's
    crops, worded differently) nearby pooled embeddings, which their initial weights do not and
    which learning the wrong images' features does less; trained without captions, they keep
    their initial weights."""
    from safetensors.torch import load_file

    out, info, stimuli_path = trained
    root, _ = mirror
    assert info["captions"] > 0 and info["final_loss"]["text"] is not None
    without = train_tiny_sdxl(stimuli_path, tmp_path / "plain", 32, seed=0, recipe={"vae_steps": 2, "unet_steps": 2,
                                                                                      "batch_size": 4})
    assert without["captions"] == 0 and without["final_loss"]["text"] is None
    for part in ("text_encoder", "text_encoder_2"):
        plain = load_file(tmp_path / "plain" / part / "model.safetensors")
        learned = load_file(out / part / "model.safetensors")
        weights = [k for k in plain if k.endswith("layers.0.self_attn.q_proj.weight")]  # (SDXL reads TE1's penultimate layer)
        assert len(weights) == 1 and set(plain) == set(learned)
        assert not torch.allclose(plain[weights[0]], learned[weights[0]]), part  # the same start (seed 0), then trained
    learned, initial = _category_margin(out, root), _category_margin(tmp_path / "plain", root)
    # measured 0.73 against 0.10 initially, and 0.50 when each image's captions learn another image's features
    assert learned > 0.6 and learned > initial + 0.4, (learned, initial)


def test_the_texture_descriptor_ignores_position_flips_and_contrast():
    """Unchanged by a circular shift, a mirror or upside-down flip and an affine change of grey
    levels; its histogram half equals numpy's histogram of the standardised 16 x 16 grey image."""
    from braid.model_training import texture_descriptor

    rng = np.random.default_rng(4)
    x = rng.random((1, 3, 64, 64))
    base = texture_descriptor(x)
    assert base.shape == (1, 16 * 16 + 16)
    np.testing.assert_allclose(np.linalg.norm(base), 1)
    for changed in (np.roll(x, (4, 12), axis=(2, 3)), x[..., ::-1], x[:, :, ::-1], 0.5 * x + 0.2):
        np.testing.assert_allclose(texture_descriptor(changed), base, atol=2e-5)  # (std + 1e-6)
    grey = x[0].mean(0).reshape(16, 4, 16, 4).mean((1, 3))
    grey = (grey - grey.mean()) / (grey.std() + 1e-6)
    hist = np.histogram(grey, bins=16, range=(-3, 3))[0].astype(float)
    hist = (hist - hist.mean()) / np.linalg.norm(hist - hist.mean())
    half = base[0, -16:]
    np.testing.assert_allclose(half / np.linalg.norm(half), hist, atol=1e-9)
    with pytest.raises(BraidError, match="8 x 8 px are too small"):
        texture_descriptor(x[:, :, :8, :8])
    from braid.model_training import caption_targets

    small = torch.rand(5, 3, 8, 8) * 2 - 1  # model.image_size 8: 8 x 8 blocks, every feature standardised
    targets = caption_targets(small, torch.randn(5, 4, 1, 1))
    assert targets.shape == (5, 4 + 8 * 8 + 16)
    torch.testing.assert_close(targets.mean(0), torch.zeros(targets.shape[1]), atol=1e-5, rtol=0)
