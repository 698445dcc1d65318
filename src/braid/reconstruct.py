"""img2img reconstruction with SSD-1B (or the tiny stand-in) from predicted latents.

The predicted ``z0`` is passed as the pipeline's ``image``: a 4-channel tensor bypasses the VAE
encoder, so it must already be in the scaled latent space (× 0.13025), which is how the encoder
predicts it. ``strength`` s runs the last ``int(steps · s)`` of ``steps`` denoising steps after
noising ``z0`` to that level; when that product is 0 the pipeline silently returns nothing, so
it is refused here with a message. The denoised latents are decoded by
:func:`braid.models.decode_latents`, with the VAE in float32 when the model runs in float16 and
the VAE's config says it overflows there (``force_upcast``, the SDXL VAE).

One reconstruction per test image: the encoder's predictions for the image's test trials
(its repeats) are averaged first. Each image's generator is seeded by ``seed + nsd_id``, for
every seed of ``reconstruct.seeds``. :func:`decode` writes the decode-only images (no diffusion).

What is reproducible. On a CPU: the same inputs, settings, batch size and software give
bit-identical PNGs, and a different ``batch_size`` changes a pixel value by at most 2 of 255
(tested). On a GPU, bit-identical PNGs are promised only for a repeat on the same GPU model,
driver, CUDA/cuDNN and torch versions and batch size (``make gpu-check`` checks that a repeat
run gives the same PNG hashes); cuBLAS/cuDNN pick algorithms by GPU model and SM count and TF32
may be used, so another GPU or library version gives images that differ slightly, not bit for
bit. Seeds make the noise the same everywhere (a CPU generator would too); they do not make
the arithmetic the same.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .common import BraidError, atomic_output
from .integrity import write_folder_manifest

log = logging.getLogger(__name__)


def check_strength(strength: float, steps: int) -> None:
    if not 0.0 < strength <= 1.0:
        raise BraidError(f"strength {strength} is outside (0, 1] (config reconstruct.strengths)")
    if int(steps * strength) == 0:
        raise BraidError(
            f"strength {strength} with {steps} steps runs int({steps}*{strength}) = 0 denoising steps and "
            f"would return no image; raise reconstruct.steps to at least {int(np.ceil(1 / strength))} or raise the strength"
        )


def check_denoised(denoised, ids, unet_dtype, strength: float, steps: int, guidance_scale: float) -> None:
    """The UNet's denoised latents are finite, before the VAE sees them: a NaN here is the UNet's
    (float16 overflows in attention or a broken checkpoint), not the VAE's, and is named so."""
    import torch

    bad = ~torch.isfinite(denoised.reshape(len(denoised), -1)).all(dim=1)
    if bool(bad.any()):
        which = [int(i) for i in np.asarray(ids)[bad.cpu().numpy()]][:5]
        fix = ("run the UNet in bfloat16 or float32 (config reconstruct.dtype)" if unet_dtype == torch.float16
               else "check the model's weights (model_fetch) and the predicted latents")
        raise BraidError(
            f"the UNet ({unet_dtype}) produced NaN/inf latents for NSD ids {which} at strength {strength}, "
            f"{steps} steps ({int(steps * strength)} run), guidance_scale {guidance_scale}; {fix}. The VAE was not "
            "reached."
        )


def average_by_image(pred: np.ndarray, nsd_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean predicted latent per distinct image, images in ascending id order."""
    ids, inverse = np.unique(nsd_ids, return_inverse=True)
    sums = np.zeros((ids.size, *pred.shape[1:]), np.float64)
    np.add.at(sums, inverse, pred)
    counts = np.bincount(inverse, minlength=ids.size).reshape(-1, *([1] * (pred.ndim - 1)))
    return ids, (sums / counts).astype(np.float32)


def _load_averaged(predictions_path) -> tuple[np.ndarray, np.ndarray]:
    from .encoder import load_predictions

    preds = load_predictions(predictions_path)
    ids, latents = average_by_image(preds["pred"], preds["nsd_id"])
    if not np.isfinite(latents).all():
        raise BraidError(f"{predictions_path}: predicted latents hold NaN/inf; retrain the encoder")
    return ids, latents


def _write_pngs(out_dir, ids: np.ndarray, batch: int, images_of, desc: str) -> None:
    """``<nsd_id>.png`` for every id, ``batch`` at a time: ``images_of(start, chunk)`` -> float (n, 3, H, W) in [0, 1].

    The folder's manifest (names, sizes, SHA-256: :mod:`braid.integrity`) is written last; its readers check it."""
    from PIL import Image
    from .progress import progress

    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        for start in progress(range(0, ids.size, batch), desc=desc, unit="batch", mininterval=2):
            chunk = ids[start : start + batch]
            images = images_of(start, chunk).permute(0, 2, 3, 1).cpu().numpy()
            for i, img in zip(chunk, images):
                Image.fromarray((img * 255).round().astype(np.uint8)).save(Path(tmp) / f"{int(i)}.png")
        write_folder_manifest(tmp)


def decode(predictions_path, model_dir, out_dir, params: dict, device: str = "cpu", batch_size: int = 8) -> None:
    """Decode-only reconstructions: each test image's (averaged) predicted latent through the VAE
    decoder, no diffusion. From the true latents this is the autoencoder's ceiling.

    ``params``: dtype (the VAE runs in :func:`braid.models.vae_dtype` of it) and variant.
    """
    import torch

    from .models import decode_latents, load_vae

    ids, latents = _load_averaged(predictions_path)
    vae = load_vae(model_dir, device=device, dtype=params["dtype"], variant=params.get("variant"))
    log.info("decoding %d images with the VAE in %s on %s", ids.size, next(vae.parameters()).dtype, device)

    def images_of(start, chunk):
        return decode_latents(vae, torch.from_numpy(latents[start : start + chunk.size]).to(device))

    _write_pngs(out_dir, ids, int(batch_size), images_of, "decode")


def reconstruct(
    predictions_path,
    model_dir,
    out_dir,
    strength: float,
    seed: int,
    params: dict,
    device: str = "cpu",
    batch_size: int = 8,
    guidance_scale: float = 1.0,
    conditioning_path=None,
) -> None:
    """Write ``<nsd_id>.png`` for every test image into ``out_dir``.

    ``params``: steps, prompt, negative_prompt, dtype (and variant), the settings that decide
    the images with ``strength``, ``guidance_scale`` and ``seed`` (image i's generator is seeded
    with ``seed + i``); ``batch_size`` only decides how many go through at once.
    ``conditioning_path``: a :mod:`braid.conditioning` store whose per-image embeddings replace
    the prompt's (the semantic modes); classifier-free guidance (``guidance_scale`` > 1) takes its
    negative branch from ``negative_prompt`` in every mode.
    """
    import torch

    from .models import decode_latents, load_img2img

    steps = int(params["steps"])
    check_strength(strength, steps)
    if guidance_scale < 0:
        raise BraidError(f"guidance scale {guidance_scale} is negative (config reconstruct.guidance_scales)")
    ids, latents = _load_averaged(predictions_path)
    pipe = load_img2img(model_dir, device=device, dtype=params["dtype"], variant=params.get("variant"))
    dtype = pipe.unet.dtype
    guided = guidance_scale > 1
    embeds = pipe.encode_prompt(
        prompt=params["prompt"], device=device, num_images_per_prompt=1,
        do_classifier_free_guidance=guided, negative_prompt=params.get("negative_prompt") or None,
    )
    prompt_embeds, negative_embeds, pooled, negative_pooled = embeds
    conditioning = None
    if conditioning_path is not None:
        from .conditioning import Conditioning

        conditioning = Conditioning(conditioning_path)
        conditioning.get(ids)  # every test image has its conditioning, before any image is made
    what = conditioning.attrs["conditioning"] if conditioning else f"prompt {params['prompt']!r}"
    log.info("reconstructing %d images at strength %s, guidance %s, seed %d, %d steps, %s, on %s, conditioned on %s",
             ids.size, strength, guidance_scale, seed, steps, dtype, device, what)

    def text_of(chunk):
        """The positive branch's embeddings of the images ``chunk``: the prompt's, or their own."""
        if conditioning is None:
            return prompt_embeds.repeat(chunk.size, 1, 1), pooled.repeat(chunk.size, 1)
        tokens, pooled_own = conditioning.get(chunk)
        return (torch.from_numpy(tokens).to(device=device, dtype=prompt_embeds.dtype),
                torch.from_numpy(pooled_own).to(device=device, dtype=pooled.dtype))

    def images_of(start, chunk):
        n = chunk.size
        z = torch.from_numpy(latents[start : start + n]).to(device=device, dtype=dtype)
        gens = [torch.Generator(device).manual_seed(int(seed) + int(i)) for i in chunk]
        kwargs = {}
        if negative_embeds is not None:
            kwargs = dict(negative_prompt_embeds=negative_embeds.repeat(n, 1, 1),
                          negative_pooled_prompt_embeds=negative_pooled.repeat(n, 1))
        text, text_pooled = text_of(chunk)
        with torch.inference_mode():
            denoised = pipe(
                prompt_embeds=text,
                pooled_prompt_embeds=text_pooled,
                image=z,
                strength=strength,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=gens,
                output_type="latent",
                **kwargs,
            ).images
        if len(denoised) != n:
            raise BraidError(f"the pipeline returned {len(denoised)} latents for {n} inputs")
        check_denoised(denoised, chunk, dtype, strength, steps, guidance_scale)
        return decode_latents(pipe.vae, denoised)

    _write_pngs(out_dir, ids, int(batch_size), images_of, f"img2img s={strength} g={guidance_scale} seed={seed}")
