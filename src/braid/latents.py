"""Cache the VAE latents ``z0`` of the stimuli, keyed by NSD image id.

Preprocessing is Brain-Diffuser's ``regularize_image``: the 425x425 NSD image is resized with
PIL's bicubic filter, no crop, to the model's size (uint8, as PIL returns it), mapped to
[-1, 1], encoded, and the posterior **mean** is multiplied by the VAE's ``scaling_factor``
(0.13025 for the SDXL VAE) — the deterministic regression target, already in the scale that
img2img expects as its ``image`` argument. The VAE runs in ``model.dtype``, except that the
SDXL VAE is kept in float32 where float16 would overflow (``braid.models.vae_dtype``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .common import BraidError, atomic_output

log = logging.getLogger(__name__)


def preprocess(images: np.ndarray, size: int):
    """uint8 (n, H, W, 3) -> float tensor (n, 3, size, size) in [-1, 1]: PIL bicubic resize, no crop."""
    import torch
    from PIL import Image

    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise BraidError(f"stimuli must be uint8 (n, H, W, 3); got {images.dtype} {images.shape}")
    if images.shape[1:3] != (size, size):
        images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC))
                           for im in images])
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return (x / 255.0 * 2 - 1).contiguous()


def encode_images(images: np.ndarray, vae, size: int, batch_size: int = 16) -> np.ndarray:
    """Encode uint8 images to scaled latent means, float32 (n, 4, size/8, size/8)."""
    import torch

    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    out = []
    for start in range(0, len(images), batch_size):
        x = preprocess(images[start : start + batch_size], size).to(device=device, dtype=dtype)
        with torch.inference_mode():
            z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        out.append(z.float().cpu().numpy())
    z = np.concatenate(out) if out else np.zeros((0, 4, size // 8, size // 8), np.float32)
    if not np.isfinite(z).all():
        raise BraidError("the VAE produced NaN/inf latents; run it in float32 or bfloat16 (config model.dtype)")
    return z


def read_stimuli(path: str | os.PathLike, nsd_ids: np.ndarray) -> np.ndarray:
    """Rows ``nsd_ids`` (0-based, any order) of ``imgBrick`` as uint8 (n, 425, 425, 3)."""
    import h5py

    nsd_ids = np.asarray(nsd_ids, dtype=np.int64)
    order = np.argsort(nsd_ids)
    try:
        with h5py.File(path, "r") as f:
            brick = f["imgBrick"]
            if nsd_ids.size and (nsd_ids.min() < 0 or nsd_ids.max() >= brick.shape[0]):
                raise BraidError(f"{path}: imgBrick has {brick.shape[0]} images; asked for ids up to {nsd_ids.max()}")
            sorted_rows = brick[nsd_ids[order]] if nsd_ids.size else np.zeros((0, *brick.shape[1:]), np.uint8)
    except OSError as err:
        raise BraidError(f"{path}: cannot read imgBrick ({err}); delete the file and fetch it again") from err
    out = np.empty_like(sorted_rows)
    out[order] = sorted_rows
    return out


def cache_latents(
    stimuli_path: str | os.PathLike,
    model_dir: str | os.PathLike,
    nsd_ids: np.ndarray,
    out_path: str | os.PathLike,
    image_size: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 16,
    variant: str | None = None,
) -> None:
    """Encode the stimuli ``nsd_ids`` and write ``latents.zarr`` (arrays ``latents`` and ``nsd_id``)."""
    import zarr
    from tqdm import tqdm

    from .models import load_vae, vae_image_size

    vae = load_vae(model_dir, device=device, dtype=dtype, variant=variant)
    size = vae_image_size(vae, image_size)
    ids = np.unique(np.asarray(nsd_ids, dtype=np.int64))
    log.info("encoding %d stimuli at %dpx with %s", ids.size, size, model_dir)
    shape = (ids.size, vae.config.latent_channels, size // 8, size // 8)
    with atomic_output(out_path) as tmp:
        root = zarr.open_group(tmp, mode="w")
        root.create_array("nsd_id", data=ids)
        lat = root.create_array("latents", shape=shape, chunks=(min(64, max(ids.size, 1)), *shape[1:]), dtype="float32")
        step = 64
        for start in tqdm(range(0, ids.size, step), desc="latents", unit="chunk", mininterval=2):
            chunk = ids[start : start + step]
            lat[start : start + chunk.size] = encode_images(read_stimuli(stimuli_path, chunk), vae, size, batch_size)
        root.attrs.update(
            {
                "model": str(model_dir),
                "image_size": size,
                "scaling_factor": float(vae.config.scaling_factor),
                "description": "VAE posterior mean x scaling_factor, keyed by 0-based NSD id",
            }
        )


class LatentCache:
    """Read access to ``latents.zarr`` by NSD id."""

    def __init__(self, path: str | os.PathLike):
        import zarr

        self.path = Path(path)
        try:
            root = zarr.open_group(self.path, mode="r")
            self.ids = np.asarray(root["nsd_id"][:])
            self._latents = root["latents"]
        except Exception as err:
            raise BraidError(f"{path}: not a BRAID latent cache ({err}); rerun the latents rule") from err
        self.attrs = dict(root.attrs)
        self.shape = tuple(self._latents.shape[1:])

    def get(self, nsd_ids) -> np.ndarray:
        nsd_ids = np.asarray(nsd_ids, dtype=np.int64)
        pos = np.searchsorted(self.ids, nsd_ids)
        pos = np.clip(pos, 0, max(self.ids.size - 1, 0))
        missing = nsd_ids[self.ids[pos] != nsd_ids] if self.ids.size else nsd_ids
        if missing.size:
            raise BraidError(f"{self.path}: no latents for NSD ids {missing[:5].tolist()}...; rerun the latents rule")
        uniq, inverse = np.unique(pos, return_inverse=True)
        return np.asarray(self._latents.get_orthogonal_selection((uniq,)))[inverse]
