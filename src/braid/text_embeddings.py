"""The model's own text conditioning of each NSD image's captions: the semantic targets, cached by NSD id.

For a caption, SDXL's ``encode_prompt`` (SSD-1B keeps SDXL's two text encoders) gives
``prompt_embeds`` (77 x 2048: CLIP ViT-L's and OpenCLIP bigG's penultimate hidden states,
concatenated) and ``pooled_prompt_embeds`` (1,280: bigG's projected pooled output); the pipeline
takes both in place of a prompt. Per image the cache holds their **mean over the image's
captions** (Takagi & Nishimoto 2023 decode the mean of the captions' text embeddings, ``c``) and
**each caption's pooled embedding** (for caption retrieval and the retrieval bank).

Only the tokenizers and the text encoders are loaded (``from_pretrained`` of the model folder
with the UNet and VAE left out), offline, in ``semantic.text_dtype`` (SDXL runs them in float16).
Captions are encoded in batches of ``batch_size`` captions, every one padded to 77 tokens as the
pipeline does.

The cache (:func:`update_cache`) is append-only, incremental and shared by every subject, like
the latent cache (:mod:`braid.latents`): a subject's job encodes only the images the store lacks,
commits every :data:`CHUNK` images, and resumes after a kill. Its identity (model, revision,
variant, dtype, the captions' source) is stored and checked; the workflow puts each identity in
its own store.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .common import BraidError, file_lock, torch_dtype
from .integrity import open_append_store, open_store

log = logging.getLogger(__name__)

FORMAT = "braid-text-cache-1"
CHUNK = 64  # images per commit and per chunk of the per-image arrays
TOKENS = 77  # CLIP's context: every prompt is padded to it


def load_text_encoders(model_dir: str | os.PathLike, device: str = "cpu", dtype: str = "float16",
                       variant: str | None = None):
    """An SDXL text-to-image pipeline of ``model_dir`` holding only its tokenizers and text encoders."""
    from diffusers import StableDiffusionXLPipeline

    from .models import check_model

    check_model(model_dir)
    kwargs = {"variant": variant} if variant else {}
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(str(model_dir), unet=None, vae=None, local_files_only=True,
                                                         torch_dtype=torch_dtype(dtype), **kwargs)
    except (OSError, ValueError) as err:
        raise BraidError(f"{model_dir}: cannot load the text encoders ({err}); rerun the model rule") from err
    if pipe.text_encoder_2 is None or pipe.tokenizer_2 is None:
        raise BraidError(f"{model_dir}: no text_encoder_2/tokenizer_2; BRAID needs an SDXL-family model (SSD-1B)")
    return pipe.to(device)


def text_shapes(pipe) -> tuple[tuple[int, int], int]:
    """(tokens, width) of ``prompt_embeds`` and the width of ``pooled_prompt_embeds``."""
    width = (pipe.text_encoder.config.hidden_size if pipe.text_encoder is not None else 0)
    width += pipe.text_encoder_2.config.hidden_size
    return (TOKENS, width), int(pipe.text_encoder_2.config.projection_dim)


def encode_captions(pipe, captions: list[str], batch_size: int = 64, progress=None):
    """``(tokens, pooled)`` of each caption, float32 numpy (n, 77, width) and (n, pooled width),
    ``batch_size`` captions per call of ``encode_prompt``. A non-finite value is an error (the
    text encoders overflowed in their dtype)."""
    import torch

    device = pipe.text_encoder_2.device
    tokens, pooled = [], []
    for start in range(0, len(captions), batch_size):
        part = list(captions[start : start + batch_size])
        with torch.inference_mode():
            embeds, _, pooled_embeds, _ = pipe.encode_prompt(part, device=device, do_classifier_free_guidance=False)
        t, p = embeds.float().cpu().numpy(), pooled_embeds.float().cpu().numpy()
        if not (np.isfinite(t).all() and np.isfinite(p).all()):
            raise BraidError(f"the text encoders gave NaN/inf for captions {start}..{start + len(part) - 1} in "
                             f"{pipe.text_encoder_2.dtype}; use semantic.text_dtype float32 or bfloat16")
        tokens.append(t)
        pooled.append(p)
        if progress is not None:
            progress.update(len(part))
    if not tokens:
        (n_tok, width), n_pool = text_shapes(pipe)
        return np.zeros((0, n_tok, width), np.float32), np.zeros((0, n_pool), np.float32)
    return np.concatenate(tokens), np.concatenate(pooled)


def image_embeddings(pipe, captions: pd.DataFrame, batch_size: int = 64, progress=None):
    """Per NSD id of ``captions`` (a caption table: ``nsd_id``, ``caption_index``, ``caption``, sorted):
    the mean tokens and mean pooled embedding over its captions, and each caption's pooled one."""
    tokens, pooled = encode_captions(pipe, captions["caption"].tolist(), batch_size, progress)
    ids, first, counts = np.unique(captions["nsd_id"].to_numpy(), return_index=True, return_counts=True)
    order = np.argsort(first)
    ids, first, counts = ids[order], first[order], counts[order]
    mean_tokens = np.add.reduceat(tokens, first, axis=0) / counts[:, None, None]
    mean_pooled = np.add.reduceat(pooled, first, axis=0) / counts[:, None]
    return ids, mean_tokens.astype(np.float32), mean_pooled.astype(np.float32), pooled


def read_caption_table(path: str | os.PathLike) -> pd.DataFrame:
    """The caption table (``braid.captions``) sorted by NSD id and caption index."""
    try:
        table = pd.read_parquet(path, columns=["nsd_id", "caption_index", "caption"])
    except Exception as err:
        raise BraidError(f"{path}: not a caption table ({err}); rerun the captions_fetch rule") from err
    return table.sort_values(["nsd_id", "caption_index"], kind="stable").reset_index(drop=True)


def captions_of(table: pd.DataFrame, nsd_ids, source="the caption table") -> pd.DataFrame:
    """The rows of ``table`` for ``nsd_ids``; an id without a caption is an error naming it."""
    ids = np.asarray(nsd_ids, np.int64)
    rows = table[table["nsd_id"].isin(ids)]
    missing = np.setdiff1d(ids, rows["nsd_id"].unique())
    if missing.size:
        raise BraidError(f"{source}: no captions for {missing.size} NSD ids (first {missing[:5].tolist()}); "
                         "the table must cover every image the subjects saw: rerun the captions_fetch rule")
    return rows


def update_cache(captions_path, model_dir, nsd_ids, store, identity: dict | None = None, device: str = "cpu",
                 dtype: str = "float16", batch_size: int = 64, variant: str | None = None) -> dict:
    """Add the text embeddings of the ``nsd_ids`` not yet in ``store``; return what was done.

    Arrays: per image ``nsd_id``, ``tokens`` (mean over captions, stored in float16: 77 x 2048
    per image), ``pooled`` (mean, float32), ``n_captions``; per caption ``caption_pooled``,
    ``caption_nsd_id``, ``caption_index``. Images are committed :data:`CHUNK` at a time: the
    caption rows first (``m_committed``), then the image rows (``n_committed``), in one write of
    the attributes. Jobs of several subjects take turns through a lock on ``<store>.lock``.
    """
    from .latents import model_weights
    from .progress import progress

    store = Path(store)
    table = read_caption_table(captions_path)
    ids = np.unique(np.asarray(nsd_ids, np.int64))
    wanted = captions_of(table, ids, captions_path)
    pipe = load_text_encoders(model_dir, device, dtype, variant)
    (n_tok, width), n_pool = text_shapes(pipe)
    identity = dict(sorted({**(identity or {}), "dtype": dtype, "weights": model_weights(model_dir),
                            "tokens": "CLIP-L + bigG penultimate hidden states, mean over captions",
                            "pooled": "bigG projected pooled output"}.items()))
    arrays = {"nsd_id": ((), 4096, "int64"), "tokens": ((n_tok, width), CHUNK, "float16"),
              "pooled": ((n_pool,), CHUNK, "float32"), "n_captions": ((), 4096, "int16"),
              "caption_pooled": ((n_pool,), 4 * CHUNK, "float32"), "caption_nsd_id": ((), 4096, "int64"),
              "caption_index": ((), 4096, "int16")}
    with file_lock(store.with_name(store.name + ".lock"), wait=True):  # subjects append in turn
        root = open_append_store(store, FORMAT, identity, arrays, {
            "m_committed": 0,
            "description": "per image (rows < n_committed): mean over its captions of encode_prompt's prompt_embeds "
                           "(tokens) and pooled_prompt_embeds (pooled); per caption (rows < m_committed): its pooled "
                           "embedding. Rows past a counter are an interrupted append and are ignored."}, what="text embeddings")
        n, m = int(root.attrs["n_committed"]), int(root.attrs["m_committed"])
        cached = root["nsd_id"][:n] if n else np.zeros(0, np.int64)
        todo = ids[~np.isin(ids, cached)]
        todo_captions = wanted[wanted["nsd_id"].isin(todo)]
        log.info("%s: %d of %d requested images cached; encoding %d images (%d captions) in %s on %s", store,
                 ids.size - todo.size, ids.size, todo.size, len(todo_captions), dtype, device)
        for name, rows in (("nsd_id", n + todo.size), ("tokens", n + todo.size), ("pooled", n + todo.size),
                           ("n_captions", n + todo.size), ("caption_pooled", m + len(todo_captions)),
                           ("caption_nsd_id", m + len(todo_captions)), ("caption_index", m + len(todo_captions))):
            if root[name].shape[0] < rows:
                root[name].resize((rows, *root[name].shape[1:]))
        with progress(total=len(todo_captions), desc="captions", unit="caption", mininterval=2) as bar:
            for start in range(0, todo.size, CHUNK):
                group = todo_captions[todo_captions["nsd_id"].isin(todo[start : start + CHUNK])]
                got, tokens, pooled, each = image_embeddings(pipe, group, batch_size, bar)
                k, c = got.size, len(group)
                root["caption_pooled"][m : m + c] = each
                root["caption_nsd_id"][m : m + c] = group["nsd_id"].to_numpy()
                root["caption_index"][m : m + c] = group["caption_index"].to_numpy()
                root["tokens"][n : n + k] = tokens.astype(np.float16)
                root["pooled"][n : n + k] = pooled
                root["n_captions"][n : n + k] = np.bincount(np.searchsorted(got, group["nsd_id"]), minlength=k)
                root["nsd_id"][n : n + k] = got
                n, m = n + k, m + c
                root.attrs.update({"n_committed": n, "m_committed": m})  # the commit: one write, last
    return {"store": str(store), "identity": identity, "requested": int(ids.size), "encoded": int(todo.size),
            "reused": int(ids.size - todo.size), "n_cached": n}


class TextEmbeddingCache:
    """Read access to a text-embedding cache by NSD id: the store, or a subject's manifest (``.json``) of it."""

    def __init__(self, path: str | os.PathLike):
        from .latents import read_manifest

        store, self.wanted = read_manifest(path, "text-embedding", "semantic_encode")
        self.path = store
        root = open_store(store, rule="semantic_encode")
        try:
            self.attrs = dict(root.attrs)
            n, m = int(self.attrs["n_committed"]), int(self.attrs["m_committed"])
            ids = np.asarray(root["nsd_id"][:n])
            self._tokens, self._pooled = root["tokens"], root["pooled"]
            self._caption = {k: np.asarray(root[k][:m]) for k in ("caption_nsd_id", "caption_index")}
            self._caption_pooled = root["caption_pooled"]
        except KeyError as err:
            raise BraidError(f"{store}: not a BRAID text-embedding cache ({err}); rerun semantic_encode") from err
        self.weights = (self.attrs.get("identity") or {}).get("weights", "pretrained")
        self.token_shape = tuple(self._tokens.shape[1:])
        self.pooled_width = int(self._pooled.shape[1])
        self._order = np.argsort(ids, kind="stable")
        self.ids = ids[self._order]

    def _read(self, array, nsd_ids) -> np.ndarray:
        from .latents import rows_by_id

        rows = rows_by_id(self.ids, self._order, nsd_ids, self.path, "text embeddings", "semantic_encode")
        uniq, inverse = np.unique(rows, return_inverse=True)
        return np.asarray(array.get_orthogonal_selection((uniq,)), np.float32)[inverse]

    def pooled(self, nsd_ids) -> np.ndarray:
        """Mean pooled embedding over each image's captions, (n, pooled width)."""
        return self._read(self._pooled, nsd_ids)

    def tokens(self, nsd_ids) -> np.ndarray:
        """Mean ``prompt_embeds`` over each image's captions, (n, 77, width), float32."""
        return self._read(self._tokens, nsd_ids)

    def captions(self, nsd_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every caption of ``nsd_ids``: its pooled embedding, NSD id and caption index."""
        rows = np.flatnonzero(np.isin(self._caption["caption_nsd_id"], np.asarray(nsd_ids, np.int64)))
        missing = np.setdiff1d(nsd_ids, self._caption["caption_nsd_id"][rows])
        if missing.size:
            raise BraidError(f"{self.path}: no caption embeddings for NSD ids {missing[:5].tolist()}...; "
                             "rerun the semantic_encode rule")
        pooled = np.asarray(self._caption_pooled.get_orthogonal_selection((rows,)), np.float32)
        return pooled, self._caption["caption_nsd_id"][rows], self._caption["caption_index"][rows]
