"""Cache the VAE latents ``z0`` of the stimuli, keyed by NSD image id, shared by all subjects.

Preprocessing is Brain-Diffuser's ``regularize_image``: the 425x425 NSD image is resized with
PIL's bicubic filter, no crop, to the model's size (uint8, as PIL returns it), mapped to
[-1, 1], encoded, and the posterior **mean** is multiplied by the VAE's ``scaling_factor``
(0.13025 for the SDXL VAE) — the deterministic regression target, already in the scale that
img2img expects as its ``image`` argument.

The VAE runs in ``model.dtype``: float32 or bfloat16. float16 is refused for a VAE whose config
sets ``force_upcast`` (the SDXL VAE overflows in float16); a VAE made for float16 (e.g.
madebyollin/sdxl-vae-fp16-fix, ``force_upcast: false``) runs in it.

The cache (:func:`update_cache`) is append-only and incremental: a subject's job encodes only
the ids not yet cached, commits every :data:`CHUNK` images, and resumes after a kill. Its
identity (model, revision, VAE, image size, dtype, preprocessing) is stored and checked, and
the workflow puts each identity in its own store, so latents of two settings never mix.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from .common import BraidError, atomic_output, file_lock
from .figures import save_figure
from .integrity import new_array, new_group, open_append_store, open_store

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
    """Encode uint8 images to scaled latent means, float32 (n, 4, size/8, size/8), in memory."""
    out = [z for _, z in encode_batches(iter([images]), vae, size, batch_size)]
    return np.concatenate(out) if out else np.zeros((0, vae.config.latent_channels, size // 8, size // 8), np.float32)


def posterior_mean(vae, compile: bool = False):
    """``x -> vae.encode(x).latent_dist.mean``, compiled with ``torch.compile`` when asked (falling
    back to eager, with one warning, where compilation fails: :class:`braid.device.compile_or_eager`)."""
    from .device import compile_or_eager

    def mean(x):
        return vae.encode(x).latent_dist.mean

    return compile_or_eager(mean, enabled=compile)


def encode_batches(chunks, vae, size: int, batch_size: int = 16, progress=None, encoder=None):
    """Encode an iterable of image chunks batch by batch; yield ``(first_index, latents)``.

    A chunk is uint8 images (n, H, W, 3), resized and mapped to [-1, 1] here
    (:func:`preprocess`), or a float tensor that :func:`preprocess` already made (the cache
    prepares them in a background thread). Each batch is moved to the VAE's device and dtype in
    ``channels_last`` layout, encoded by ``encoder`` (default: :func:`posterior_mean`, eager) and
    checked: a batch with NaN/inf latents raises a :class:`BraidError` naming the fix, before
    anything is written. A compiled ``encoder`` gets every batch at ``batch_size`` (the last is
    padded with copies of its last image, which are dropped), so that it compiles once.
    ``progress`` (a tqdm bar) is advanced by the number of images encoded.
    """
    import torch

    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    encoder = encoder or posterior_mean(vae)
    done = 0
    for chunk in chunks:
        for start in range(0, len(chunk), batch_size):
            part = chunk[start : start + batch_size]
            x = part if isinstance(part, torch.Tensor) else preprocess(part, size)
            n = len(x)
            if getattr(encoder, "active", False) and n < batch_size:
                x = torch.cat([x, x[-1:].expand(batch_size - n, *x.shape[1:])])
            x = x.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                z = (encoder(x)[:n] * vae.config.scaling_factor).float().cpu().numpy()
            if not np.isfinite(z).all():
                raise BraidError(
                    f"the VAE produced NaN/inf latents in {dtype} (images {done}..{done + n - 1} of this "
                    "job); run it in float32 or bfloat16 (config model.dtype)"
                )
            yield done, z
            done += n
            if progress is not None:
                progress.update(n)


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


RANDOM = "random (not a result)"  # = braid.models.RANDOM_WEIGHTS


def model_weights(model_dir) -> str:
    """What the model folder's manifest says of its weights (:data:`RANDOM`, or e.g. the tiny model
    trained on the synthetic stimuli, ``synthetic-trained (not a result)``); ``pretrained`` otherwise."""
    from .models import MANIFEST

    manifest = Path(model_dir) / MANIFEST
    if manifest.is_file():
        return str(json.loads(manifest.read_text()).get("weights") or "pretrained")
    return "pretrained"


PREPROCESSING = "pil-bicubic-uint8-nocrop"  # Brain-Diffuser's regularize_image; part of a cache's identity
FORMAT = "braid-latent-cache-1"
CHUNK = 64  # images per chunk of the latents array, and per commit


def _prefetch(read, groups):
    """Yield ``read(g)`` for each group, reading the next group in a background thread meanwhile."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="braid-stimuli") as pool:
        pending = None
        for g in groups:
            nxt = pool.submit(read, g)
            if pending is not None:
                yield pending.result()
            pending = nxt
        if pending is not None:
            yield pending.result()


def _open_for_append(store: Path, identity: dict, latent_shape: tuple):
    """Open (or create) the append-only cache ``store`` after checking that it holds ``identity``'s latents."""
    return open_append_store(store, FORMAT, identity, {"latents": (latent_shape, CHUNK, "float32"),
                                                       "nsd_id": ((), 4096, "int64")}, {
        "description": "VAE posterior mean x scaling_factor; row k holds NSD id nsd_id[k] (0-based) for "
                       "k < n_committed; rows past it are an interrupted append and are ignored",
    }, what="latents")


def update_cache(
    stimuli_path: str | os.PathLike,
    model_dir: str | os.PathLike,
    nsd_ids,
    store: str | os.PathLike,
    identity: dict | None = None,
    image_size: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int = 16,
    variant: str | None = None,
    compile: bool = False,
) -> dict:
    """Add the latents of the ``nsd_ids`` not yet in ``store``; return what was done.

    The cache is shared by every subject and encoder and keyed by NSD id: only ids it does not
    hold are encoded. It grows by appends of :data:`CHUNK` images, each committed (the
    ``n_committed`` attribute) only after its latents are written, so a killed job loses at
    most the batch in flight and a rerun resumes. ``identity`` (model, revision, VAE, image
    size, dtype, preprocessing) is stored and checked: a store never mixes latents of two
    settings. Jobs of several subjects take turns through a lock on ``<store>.lock``.

    ``compile``: ``torch.compile`` the VAE's encoding (on any device; it pays only on a GPU over
    many images: ``make gpu-check`` measures it). Every batch then has ``batch_size`` images, so
    it compiles once; where compilation fails it runs eagerly, with one warning.
    """
    import torch
    from .progress import progress

    from .models import load_vae, vae_force_upcast, vae_image_size

    store = Path(store)
    vae = load_vae(model_dir, device=device, dtype=dtype, variant=variant)
    if dtype == "float16" and vae_force_upcast(vae.config):
        raise BraidError(
            f"model.dtype float16: the VAE in {model_dir} overflows in float16 (its config sets force_upcast), "
            "so its latents would be NaN or silently computed in float32. Use model.dtype bfloat16 or float32, or "
            "a VAE made for float16 (force_upcast false, e.g. madebyollin/sdxl-vae-fp16-fix)."
        )
    size = vae_image_size(vae, image_size)
    identity = {**(identity or {}), "image_size": size, "dtype": dtype, "preprocessing": PREPROCESSING,
                "scaling_factor": float(vae.config.scaling_factor), "weights": model_weights(model_dir)}
    identity = dict(sorted(identity.items()))
    latent_shape = (vae.config.latent_channels, size // 8, size // 8)
    vae = vae.to(memory_format=torch.channels_last)
    encoder = posterior_mean(vae, compile=compile)
    if compile and CHUNK % batch_size:
        log.warning("model.compile with model.latent_batch_size %d: each group of %d images ends in a padded batch; "
                    "a batch size that divides %d wastes nothing", batch_size, CHUNK, CHUNK)
    ids = np.unique(np.asarray(nsd_ids, dtype=np.int64))
    with file_lock(store.with_name(store.name + ".lock"), wait=True):  # subjects append in turn
        root = _open_for_append(store, identity, latent_shape)
        n = int(root.attrs["n_committed"])
        cached = root["nsd_id"][:n] if n else np.zeros(0, np.int64)
        todo = ids[~np.isin(ids, cached)]
        log.info("%s: %d of %d requested ids cached; encoding %d at %dpx, %s on %s", store, ids.size - todo.size,
                 ids.size, todo.size, size, dtype, device)
        lat, idx = root["latents"], root["nsd_id"]
        if lat.shape[0] < n + todo.size:
            lat.resize((n + todo.size, *latent_shape))
            idx.resize((n + todo.size,))
        groups = [todo[i : i + CHUNK] for i in range(0, todo.size, CHUNK)]
        with progress(total=int(todo.size), desc="latents", unit="img", mininterval=2) as bar:
            def prepared(g):  # in the prefetch thread: read, resize, map to [-1, 1]
                return preprocess(read_stimuli(stimuli_path, g), size)

            for group, x in zip(groups, _prefetch(prepared, groups)):
                z = np.concatenate([b for _, b in encode_batches([x], vae, size, batch_size, bar, encoder)])
                lat[n : n + group.size] = z
                idx[n : n + group.size] = group
                n += group.size
                root.attrs["n_committed"] = n  # the commit: written last, atomically
    return {"store": str(store), "identity": identity, "requested": int(ids.size), "encoded": int(todo.size),
            "reused": int(ids.size - todo.size), "n_cached": n}


cache_latents = update_cache  # the older name, kept for callers


def write_manifest(path: str | os.PathLike, result: dict, nsd_ids) -> None:
    """A subject's view of the shared cache: the store, its identity, and the ids the subject needs."""
    ids = np.unique(np.asarray(nsd_ids, dtype=np.int64))
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps({**result, "nsd_ids": ids.tolist()}, indent=1))


def read_manifest(path: str | os.PathLike, what: str, rule: str) -> tuple[Path, np.ndarray | None]:
    """The store a subject's manifest (``.json``, :func:`write_manifest`) names and the subject's ids;
    a store path itself gives (the path, None). ``what`` and ``rule`` name the cache in the message."""
    path = Path(path)
    if path.suffix != ".json":
        return path, None
    try:
        manifest = json.loads(path.read_text())
        return Path(manifest["store"]), np.asarray(manifest["nsd_ids"], np.int64)
    except (OSError, ValueError, KeyError) as err:
        raise BraidError(f"{path}: not a BRAID {what} manifest ({err}); rerun the {rule} rule") from err


def rows_by_id(ids: np.ndarray, order: np.ndarray, nsd_ids, store, what: str, rule: str) -> np.ndarray:
    """Rows of a cache holding ``nsd_ids``, from its sorted ``ids`` and ``order`` (sorted position ->
    row); an id the cache lacks is an error naming the first few and the rule that adds them."""
    nsd_ids = np.asarray(nsd_ids, dtype=np.int64)
    pos = np.clip(np.searchsorted(ids, nsd_ids), 0, max(ids.size - 1, 0))
    missing = nsd_ids[ids[pos] != nsd_ids] if ids.size else nsd_ids
    if missing.size:
        raise BraidError(f"{store}: no {what} for NSD ids {missing[:5].tolist()}...; rerun the {rule} rule")
    return order[pos]


class LatentCache:
    """Read access to a latent cache by NSD id: the store, or a subject's manifest (``.json``) of it."""

    def __init__(self, path: str | os.PathLike):
        store, self.wanted = read_manifest(path, "latent", "latents_encode")
        self.path = store
        try:
            root = open_store(store, rule="latents_encode")
            n = int(root.attrs.get("n_committed", root["nsd_id"].shape[0]))
            ids = np.asarray(root["nsd_id"][:n])
            self._latents = root["latents"]
        except BraidError:
            raise
        except Exception as err:
            raise BraidError(f"{store}: not a BRAID latent cache ({err}); rerun the latents_encode rule") from err
        self.attrs = dict(root.attrs)
        self.shape = tuple(self._latents.shape[1:])
        identity = self.attrs.get("identity") or {}
        self.weights = identity.get("weights", "pretrained")
        self._order = np.argsort(ids, kind="stable")
        self.ids = ids[self._order]  # sorted; self._order maps back to rows

    def get(self, nsd_ids) -> np.ndarray:
        rows = rows_by_id(self.ids, self._order, nsd_ids, self.path, "latents", "latents_encode")
        uniq, inverse = np.unique(rows, return_inverse=True)
        return np.asarray(self._latents.get_orthogonal_selection((uniq,)))[inverse]


def latent_statistics(latents_path, trials_path, out_zarr, out_png=None) -> dict:
    """Mean and standard deviation of the training images' latents, for target normalisation.

    Over the distinct images of the ``train`` split (each image once, however often it was
    shown), per latent element (C, h, w) and per channel (C,); population statistics (ddof 0).
    Validation and test images never enter. Written to ``out_zarr`` (arrays ``mean``, ``std``,
    ``channel_mean``, ``channel_std``; attrs ``n_images`` and the cache's identity) and, when
    ``out_png`` is given, drawn as per-channel maps.
    """
    import pandas as pd

    trials = pd.read_parquet(trials_path)
    ids = np.unique(trials.loc[trials["split"] == "train", "nsd_id"].to_numpy())
    if ids.size == 0:
        raise BraidError(f"{trials_path}: no training trials, so no latent statistics; check the split config")
    cache = LatentCache(latents_path)
    z = cache.get(ids).astype(np.float64)
    stats = {"mean": z.mean(0), "std": z.std(0), "channel_mean": z.mean((0, 2, 3)), "channel_std": z.std((0, 2, 3))}
    with atomic_output(out_zarr) as tmp:
        root = new_group(tmp)
        for name, value in stats.items():
            new_array(root, name, data=value.astype(np.float32))
        root.attrs.update({"n_images": int(ids.size), "split": "train", "identity": cache.attrs.get("identity"),
                           "description": "over distinct training images; population std (ddof 0)"})
    if out_png:
        _plot_statistics(stats, ids.size, out_png)
    log.info("latent statistics over %d training images: channel means %s, stds %s", ids.size,
             np.round(stats["channel_mean"], 3).tolist(), np.round(stats["channel_std"], 3).tolist())
    return stats


def _plot_statistics(stats: dict, n: int, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = stats["mean"].shape[0]
    fig, axes = plt.subplots(2, c, figsize=(2.3 * c, 4.6), squeeze=False)
    for k in range(c):
        for row, name in enumerate(("mean", "std")):
            ax = axes[row, k]
            if name == "mean":  # diverging, centred on 0
                lim = float(np.abs(stats["mean"][k]).max()) or 1.0
                im = ax.imshow(stats[name][k], cmap="RdBu_r", vmin=-lim, vmax=lim)
            else:
                im = ax.imshow(stats[name][k], cmap="viridis")
            ax.set_title(f"channel {k} {name}\n(all: {stats['channel_' + name][k]:.3f})", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    fig.suptitle(f"latent z0 over {n} training images", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
