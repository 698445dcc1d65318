"""A tiny SSD-1B-shaped pipeline that has learned the synthetic world (``model.source: tiny-trained``).

The demo cannot download SSD-1B, and a pipeline with random weights turns every latent into
coloured noise: nobody can tell a working reconstruction from a broken one. This module
trains the tiny pipeline of :mod:`braid.models` offline, on a CPU, in minutes, on the synthetic
stimuli (all of them: it plays the pretrained model, which has seen COCO, NSD's images
included), then saves it in the Hugging Face layout, so that every stage loads it through the
same ``from_pretrained`` path as the real model.

Recipe (``model.train`` in the config; the same recipe, seed and stimuli give the same weights
on the same machine and software):

1. **VAE**: the SSD-1B-shaped tiny ``AutoencoderKL`` learns to reconstruct the stimuli at
   ``model.image_size`` (preprocessed exactly as the latents stage does) from a *sample* of its
   posterior, with mean squared error plus ``kl_weight`` times the KL term per pixel (the LDM
   recipe without the perceptual and adversarial losses). Adam with a one-cycle learning rate.
2. **Latent scale**: the VAE's latent scale is arbitrary; BRAID keeps SDXL's ``scaling_factor``
   (0.13025) and instead rescales the trained VAE so that its latent means have the standard
   deviation 1 / 0.13025 over the stimuli, as SDXL's have over its data: the encoder's mean
   output is multiplied by ``c`` (its log-variance shifted by 2 ln c) and the decoder's input
   divided by ``c``. Both are 1x1 convolutions, so the decoder of the rescaled latents is
   exactly the trained one. Scaled latents then have unit variance, which the noise schedule
   assumes, and a lost ``scaling_factor`` changes images by a factor of 7.7, not unnoticed.
3. **Text encoders** (with captions): SDXL's text encoders come pretrained (OpenAI's CLIP
   ViT-L and OpenCLIP's bigG, trained to match captions with images); the tiny ones start from
   random weights and a byte-level tokenizer, and the UNet cannot learn the meaning of a caption
   through them in the minutes it has (measured: wrong captions cost it 1 % of noise-prediction
   error). So they are first taught what CLIP's were, on the stimuli: from each caption, its
   pooled embedding and its mean token embedding each predict (through a linear head, discarded
   afterwards) its image's features, standardised over the stimuli: the scaled latent and a
   texture descriptor of the grey image (:func:`texture_descriptor`), with mean squared error.
   Captions of one photograph's crops then share an embedding (measured on the demo: mean cosine
   of pooled embeddings 0.72 within a category and -0.01 between; 0.06 and 0.00 when the encoders
   trained with the UNet instead). They are frozen afterwards, as SDXL's are while its UNet trains.
4. **UNet**: a denoiser of the scaled latents with the epsilon objective and the pipeline's
   own noise schedule (``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``, ``a_t`` the scheduler's
   ``alphas_cumprod``, t uniform over its 1,000 steps), conditioned as img2img conditions it:
   text embeddings through both frozen text encoders and the time ids (size, crop, target
   size). With the stimuli's captions (the synthetic NSD's COCO-format ones) each training
   image is conditioned on one of its captions or on the mean embeddings of all of them (what
   BRAID's ``true-caption`` and ``predicted`` conditioning pass), and with probability
   ``caption_dropout`` on no caption: half of those on zero embeddings (the negative branch of
   classifier-free guidance: SDXL's ``force_zeros_for_empty_prompt``), half on the empty prompt
   (the ``none`` conditioning's). This is the recipe that lets classifier-free guidance work
   (Ho & Salimans 2022, arXiv:2207.12598). Without captions the text encoders keep their random
   weights and every image is conditioned on the empty prompt.

The manifest records the recipe, the training time and the VAE's reconstruction PSNR/SSIM on
the stimuli (skimage), and stamps the weights ``synthetic-trained (not a result)``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from .common import BraidError

log = logging.getLogger(__name__)

WEIGHTS = "synthetic-trained (not a result)"  # the manifest's stamp: every number from it is a demo's
RECIPE_DEFAULTS = dict(vae_steps=700, text_steps=300, unet_steps=1000, batch_size=16, text_batch_size=32, vae_lr=3e-3,
                       text_lr=3e-3, unet_lr=2e-3, kl_weight=1e-3, caption_dropout=0.2)


def read_training_images(stimuli_path) -> np.ndarray:
    """Every stimulus of an NSD-format stimuli HDF5 (``imgBrick``), uint8 (n, H, W, 3)."""
    import h5py

    try:
        with h5py.File(stimuli_path, "r") as f:
            return f["imgBrick"][:]
    except (OSError, KeyError) as err:
        raise BraidError(f"{stimuli_path}: cannot read the stimuli to train the tiny model on ({err}); rerun the "
                         "rule nsd_synthetic_stimuli") from err


def read_training_captions(stimuli_path, stim_info_path) -> list[list[str]]:
    """The captions of every stimulus of a synthetic NSD mirror (the COCO-format files beside its
    stimulus info), in the stimuli's order."""
    import h5py

    from .nsd import STIM_INFO
    from .synthetic import stimulus_captions

    path = Path(stim_info_path).resolve()
    if path.parts[-len(Path(STIM_INFO).parts):] != Path(STIM_INFO).parts:
        raise BraidError(f"{stim_info_path}: not a mirror's {STIM_INFO}")
    with h5py.File(stimuli_path, "r") as f:
        n = len(f["imgBrick"])
    try:
        return stimulus_captions(path.parents[len(Path(STIM_INFO).parts) - 1], n)
    except (OSError, KeyError, ValueError) as err:
        raise BraidError(f"{stim_info_path}: cannot read the captions beside it ({err}); rerun the rule "
                         "nsd_synthetic_stimuli") from err


def rescale_latents(vae, factor: float) -> None:
    """Multiply ``vae``'s latent means by ``factor`` in place, leaving its decoder's images unchanged.

    The encoder's ``quant_conv`` gives the posterior's mean and log-variance channels: the mean
    rows are scaled by ``factor`` and the log-variance shifted by ``2 ln factor`` (the same
    distribution, rescaled); the decoder's ``post_quant_conv`` divides its input by ``factor``.
    """
    import torch

    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[:c] *= factor
        vae.quant_conv.bias[:c] *= factor
        vae.quant_conv.bias[c:] += 2 * math.log(factor)
        vae.post_quant_conv.weight /= factor


def _fit(module, lr: float, steps: int, step_loss, progress=None) -> float:
    """``steps`` Adam steps on ``step_loss()`` with a one-cycle learning rate peaking at ``lr``;
    ``module`` in train mode meanwhile. Returns the last step's loss."""
    import torch

    module.train()
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = step_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress.update(1)
    module.eval()
    return float(loss.detach())


def train_vae(vae, x, steps: int, batch_size: int, lr: float, kl_weight: float, generator, progress=None) -> float:
    """Fit ``vae`` to images ``x`` ((n, 3, H, W) in [-1, 1]); return the last step's loss."""
    import torch
    import torch.nn.functional as F

    def step_loss():
        xb = x[torch.randint(0, len(x), (batch_size,), generator=generator)]
        posterior = vae.encode(xb).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        return F.mse_loss(recon, xb) + kl_weight * posterior.kl().mean() / xb[0].numel()

    return _fit(vae, lr, steps, step_loss, progress)


def encode_means(vae, x, batch_size: int = 64):
    """The posterior means of images ``x`` (unscaled)."""
    import torch

    with torch.no_grad():
        return torch.cat([vae.encode(x[i : i + batch_size]).latent_dist.mean for i in range(0, len(x), batch_size)])


def texture_descriptor(images: np.ndarray, blocks: int = 16) -> np.ndarray:
    """Unit vectors (n, d) of what texture and tone each image has, not where things are in it: the
    grey image averaged into ``blocks`` x ``blocks`` blocks and standardised, then (1) its
    log-amplitude spectrum without the mean, symmetrised over u -> -u (so unchanged by
    translation and by flips) and (2) the histogram of its standardised grey levels (unchanged by
    brightness and contrast), each centred and scaled to unit length, concatenated and scaled again.

    ``images``: float (n, 3, H, W) in [0, 1], H and W at least ``blocks``."""
    x = np.asarray(images, np.float64).mean(1)
    n, h, w = x.shape
    if min(h, w) < blocks:
        raise BraidError(f"images of {h} x {w} px are too small for a {blocks} x {blocks} texture descriptor")
    bh, bw = h // blocks, w // blocks
    g = x[:, : bh * blocks, : bw * blocks].reshape(n, blocks, bh, blocks, bw).mean((2, 4))
    g = (g - g.mean((1, 2), keepdims=True)) / (g.std((1, 2), keepdims=True) + 1e-6)
    amp = np.abs(np.fft.fft2(g))
    amp = amp + np.roll(np.flip(amp, axis=-1), 1, axis=-1)
    amp[:, 0, 0] = 0.0
    hist = np.stack([np.histogram(gi, bins=16, range=(-3, 3))[0] for gi in g]).astype(np.float64)

    def unit(v):
        v = v.reshape(n, -1)
        v = v - v.mean(1, keepdims=True)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    return unit(np.concatenate([unit(np.log1p(amp)), unit(hist)], axis=1))


def caption_targets(x, latents):
    """What a caption teaches the text encoders about its image (the stand-in for CLIP's image
    tower): the scaled latent and the :func:`texture_descriptor` of images ``x`` ((n, 3, H, W) in
    [-1, 1]; 16 x 16 blocks, fewer below 16 px), each feature standardised over the images;
    float32 (n, d)."""
    import torch

    blocks = min(16, *x.shape[-2:])  # model.image_size may be as small as 8
    texture = torch.from_numpy(texture_descriptor(((x.float() + 1) / 2).clamp(0, 1).numpy(), blocks)).float()
    feats = torch.cat([latents.float().flatten(1), texture], 1)
    return (feats - feats.mean(0)) / feats.std(0).clamp_min(1e-6)


def _flat_captions(captions: list[list[str]], head: list[str] = ()) -> tuple[list[str], list[list[int]]]:
    """``head`` then every caption in one list, and per image the positions of its own."""
    texts, rows = list(head), []
    for caps in captions:
        rows.append(list(range(len(texts), len(texts) + len(caps))))
        texts += caps
    return texts, rows


def encode_texts(pipe, texts: list[str]):
    """``prompt_embeds`` and ``pooled_prompt_embeds`` of ``texts`` through the pipeline's text
    encoders (differentiable in them)."""
    embeds, _, pooled, _ = pipe.encode_prompt(texts, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return embeds, pooled


def train_text_encoders(pipe, captions: list[list[str]], targets, steps: int, batch_size: int, lr: float, generator,
                        progress=None) -> float:
    """Teach ``pipe``'s text encoders to predict each image's ``targets`` (n, d) from any one of its
    ``captions``, through its pooled and its mean token embedding (a linear head each, then
    discarded); return the last loss. The encoders are left frozen (``requires_grad`` off)."""
    import torch
    import torch.nn.functional as F

    encoders = [m for m in (pipe.text_encoder, pipe.text_encoder_2) if m is not None]
    with torch.no_grad():
        tokens, pooled = encode_texts(pipe, [captions[0][0]])
    head_pooled = torch.nn.Linear(pooled.shape[-1], targets.shape[1])
    head_tokens = torch.nn.Linear(tokens.shape[-1], targets.shape[1])

    def step_loss():
        index = torch.randint(0, len(captions), (batch_size,), generator=generator).tolist()
        texts = [captions[k][int(torch.randint(len(captions[k]), (1,), generator=generator))] for k in index]
        tokens, pooled = encode_texts(pipe, texts)
        y = targets[index]
        return F.mse_loss(head_pooled(pooled), y) + F.mse_loss(head_tokens(tokens.mean(1)), y)

    loss = _fit(torch.nn.ModuleList([*encoders, head_pooled, head_tokens]), lr, steps, step_loss, progress)
    for m in encoders:
        m.requires_grad_(False)
    return loss


def time_ids(size: int):
    """SDXL's time ids without aesthetic score: original size, crop top-left, target size."""
    import torch

    return torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)


class CaptionConditioning:
    """The training conditions of the UNet, through the pipeline's (frozen) text encoders, each
    caption encoded once: per image one of its captions or the mean embeddings of all of them
    and, with probability ``dropout``, none (half zeros, half the empty prompt). Without captions
    every image gets the empty prompt."""

    def __init__(self, pipe, size: int, captions: list[list[str]] | None = None, dropout: float = 0.2,
                 chunk: int = 256):
        import torch

        if captions and not all(len(cs) for cs in captions):
            raise BraidError("every stimulus needs at least one caption to train the tiny model on captions")
        self.captions = captions
        self.dropout = float(dropout) if captions else 1.0
        self.time_ids = time_ids(size)
        texts, self.rows = _flat_captions(captions or [], head=[""])  # row 0: the empty prompt
        with torch.no_grad():
            parts = [encode_texts(pipe, texts[i : i + chunk]) for i in range(0, len(texts), chunk)]
        self.tokens = torch.cat([p[0] for p in parts])
        self.pooled = torch.cat([p[1] for p in parts])

    def sample(self, index, generator):
        """Tokens and ``added_cond_kwargs`` (pooled embeddings, time ids) for the images ``index``."""
        import torch

        n = len(index)
        u = torch.rand(n, generator=generator).tolist()
        tokens, pooled = [], []
        for i, k in enumerate(index.tolist()):
            if not self.captions or u[i] < self.dropout:
                if self.captions and u[i] < self.dropout / 2:
                    tokens.append(torch.zeros_like(self.tokens[0]))
                    pooled.append(torch.zeros_like(self.pooled[0]))
                else:
                    tokens.append(self.tokens[0])
                    pooled.append(self.pooled[0])
                continue
            rows = self.rows[k]
            if u[i] >= self.dropout + (1 - self.dropout) / 2:
                rows = [rows[int(torch.randint(len(rows), (1,), generator=generator))]]
            tokens.append(self.tokens[rows].mean(0))
            pooled.append(self.pooled[rows].mean(0))
        tokens, pooled = torch.stack(tokens), torch.stack(pooled)
        return tokens, {"text_embeds": pooled, "time_ids": self.time_ids.to(tokens.dtype).expand(n, -1)}


def train_unet(unet, latents, conditioning: CaptionConditioning, alphas_cumprod, steps: int, batch_size: int,
               lr: float, generator, progress=None) -> float:
    """Fit ``unet`` to predict the noise added to scaled ``latents`` at uniform timesteps, under
    ``conditioning``'s captions; return the last loss."""
    import torch
    import torch.nn.functional as F

    a = alphas_cumprod.float()

    def step_loss():
        index = torch.randint(0, len(latents), (batch_size,), generator=generator)
        x0 = latents[index]
        t = torch.randint(0, len(a), (batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        cond, added = conditioning.sample(index, generator)
        at = a[t].view(-1, 1, 1, 1)
        xt = at.sqrt() * x0 + (1 - at).sqrt() * noise
        return F.mse_loss(unet(xt, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample, noise)

    return _fit(unet, lr, steps, step_loss, progress)


def reconstruction_quality(vae, x) -> dict:
    """Mean PSNR (dB) and SSIM (skimage, images in [0, 1]) of ``vae``'s reconstructions of ``x`` from latent means."""
    import torch
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    with torch.no_grad():
        recon = torch.cat([vae.decode(vae.encode(x[i : i + 64]).latent_dist.mean).sample for i in range(0, len(x), 64)])
    a = ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    b = ((recon + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    psnr = [peak_signal_noise_ratio(p, q, data_range=1.0) for p, q in zip(a, b)]
    ssim = [structural_similarity(p, q, channel_axis=-1, data_range=1.0) for p, q in zip(a, b)]
    return {"vae_psnr_db": round(float(np.mean(psnr)), 3), "vae_ssim": round(float(np.mean(ssim)), 4)}


def train_tiny_sdxl(stimuli_path, out_dir: str | os.PathLike, image_size: int, seed: int = 0,
                    recipe: dict | None = None, captions: list[list[str]] | None = None) -> dict:
    """Train the tiny SSD-1B-shaped pipeline on every image of ``stimuli_path`` (and, given, each
    image's ``captions``, in the stimuli's order); save it to ``out_dir``.

    Returns the manifest (recipe, seconds, VAE PSNR/SSIM on the stimuli). The folder appears whole
    or not at all.
    """
    import torch

    from .latents import preprocess
    from .models import (TINY_TE_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG, assemble_sdxl, save_sdxl,
                         sdxl_components)
    from .progress import progress

    recipe = {**RECIPE_DEFAULTS, **(recipe or {})}
    if image_size % 8:
        raise BraidError(f"model.image_size {image_size} is not a multiple of 8 (the VAE downsamples 8x)")
    start = time.perf_counter()
    images = read_training_images(stimuli_path)
    if len(images) < 2:
        raise BraidError(f"{stimuli_path}: {len(images)} stimuli; the tiny model needs at least 2 to learn from")
    if captions is not None and len(captions) != len(images):
        raise BraidError(f"{stimuli_path}: {len(images)} stimuli but captions for {len(captions)}; rerun the rule "
                         "nsd_synthetic_stimuli")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    components = sdxl_components(TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TE_CONFIG, TINY_TE_CONFIG)
    vae, unet = components["vae"], components["unet"]
    x = preprocess(images, image_size).contiguous(memory_format=torch.channels_last)
    vae.to(memory_format=torch.channels_last)
    text_steps = recipe["text_steps"] if captions else 0
    steps = recipe["vae_steps"] + text_steps + recipe["unet_steps"]
    log.info("training the tiny pipeline on %d stimuli at %d px: %d VAE, %d text-encoder and %d UNet steps", len(x),
             image_size, recipe["vae_steps"], text_steps, recipe["unet_steps"])
    with progress(total=steps, desc="tiny model", unit="step", mininterval=5) as bar:
        vae_loss = train_vae(vae, x, recipe["vae_steps"], recipe["batch_size"], recipe["vae_lr"],
                             recipe["kl_weight"], generator, bar)
        means = encode_means(vae, x)
        rescale_latents(vae, 1.0 / (vae.config.scaling_factor * float(means.std())))
        latents = encode_means(vae, x) * vae.config.scaling_factor  # unit variance, as img2img receives them
        pipe = assemble_sdxl(components)
        text_loss = None
        if captions and text_steps:
            text_loss = train_text_encoders(pipe, captions, caption_targets(x, latents), text_steps,
                                            recipe["text_batch_size"], recipe["text_lr"], generator, bar)
        conditioning = CaptionConditioning(pipe, image_size, captions, recipe["caption_dropout"])
        unet_loss = train_unet(unet, latents, conditioning, pipe.scheduler.alphas_cumprod, recipe["unet_steps"],
                               recipe["batch_size"], recipe["unet_lr"], generator, bar)
    vae.to(memory_format=torch.contiguous_format)
    quality = reconstruction_quality(vae, x.contiguous())
    seconds = round(time.perf_counter() - start, 1)
    for name, loss in (("VAE", vae_loss), ("text encoders", text_loss), ("UNet", unet_loss)):
        if loss is not None and not math.isfinite(loss):
            raise BraidError(f"training the tiny model's {name} diverged (loss {loss}); lower model.train's learning rate")
    info = {"source": "tiny-trained", "seed": seed, "image_size": image_size, "recipe": recipe,
            "n_images": int(len(x)), "seconds": seconds, "final_loss": {"vae": vae_loss, "text": text_loss, "unet": unet_loss},
            "latent_std": float(latents.std()), "captions": sum(map(len, captions or [])), **quality}
    save_sdxl(pipe, out_dir, info, weights=WEIGHTS)
    log.info("tiny pipeline trained in %.0f s: VAE reconstruction PSNR %.2f dB, SSIM %.3f on the %d stimuli", seconds,
             quality["vae_psnr_db"], quality["vae_ssim"], len(x))
    return info
