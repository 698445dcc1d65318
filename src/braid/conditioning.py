"""The text conditioning of img2img: what SSD-1B is told each test image shows.

One conditioning per (subject, mode), written once by the rule ``reconstruct_conditioning`` and
read by every img2img job of that mode (each guidance scale, strength, seed and latent source),
so that text embeddings are computed once per image and mode, never per step or per seed:

- ``none``: the fixed ``reconstruct.prompt`` (the baseline; encoded in the img2img job itself).
- ``predicted-<semantic encoder>``: the semantic encoder's prediction of the image's mean caption
  embeddings (``prompt_embeds`` and ``pooled_prompt_embeds``), its test trials (repeats) averaged.
  A ``tokens`` target is reassembled from its components (:func:`braid.semantic.predicted_conditioning`);
  a ``pooled`` target predicts only the pooled embedding, and its ``prompt_embeds`` are the
  training images' mean (from the text cache), so that only what the brain predicts varies.
- ``retrieved-<semantic encoder>``: the retrieval bank's caption nearest to the predicted pooled
  embedding (cosine around the training images' mean, as in the semantic scores), encoded by the
  pipeline's own text encoders; the caption is saved beside it for people to read.
- ``true-caption``: the image's own captions: their mean embeddings from the text cache, the very
  target the semantic encoders learn (Takagi & Nishimoto 2023 condition on the same mean over
  an image's COCO captions). The semantic ceiling, a reference row like ``true-latent``.

The negative branch of classifier-free guidance is the same for every mode: the pipeline's
encoding of ``reconstruct.negative_prompt`` (empty: zero embeddings, SDXL's
``force_zeros_for_empty_prompt``), computed in the img2img job.
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np
import pandas as pd

from .common import BraidError, atomic_output
from .integrity import new_array, new_group, open_store

log = logging.getLogger(__name__)

MODES = ("none", "predicted", "retrieved", "true-caption")
SEMANTIC_MODES = ("predicted", "retrieved")  # the modes that name a semantic encoder
FORMAT = "braid-conditioning-1"
_NAME = re.compile(r"^(none|true-caption|(predicted|retrieved)-([A-Za-z0-9_-]+))$")


def parse(name: str) -> tuple[str, str | None]:
    """``none``, ``true-caption``, ``predicted-<encoder>`` or ``retrieved-<encoder>`` -> (mode, encoder or None)."""
    m = _NAME.match(name)
    if not m:
        raise BraidError(f"conditioning {name!r} is none of none, true-caption, predicted-<semantic encoder>, "
                         "retrieved-<semantic encoder>")
    return (m.group(2), m.group(3)) if m.group(2) else (m.group(1), None)


def names(modes, semantic_encoders) -> list[str]:
    """The conditionings of ``modes``: ``predicted``/``retrieved`` once per semantic encoder."""
    out = []
    for mode in modes:
        out += [f"{mode}-{e}" for e in semantic_encoders] if mode in SEMANTIC_MODES else [mode]
    return out


def _ids(trials_path, split: str) -> np.ndarray:
    """The distinct images of one split, ascending."""
    trials = pd.read_parquet(trials_path, columns=["nsd_id", "split"])
    return np.unique(trials.loc[trials["split"] == split, "nsd_id"].to_numpy())


def mean_tokens(cache, nsd_ids, block: int = 256) -> np.ndarray:
    """The mean ``prompt_embeds`` of ``nsd_ids`` from the text cache, read ``block`` images at a time
    (9,000 training images' tokens are 5.7 GB in float32 at SSD-1B's width)."""
    total = np.zeros(cache.token_shape, np.float64)
    for start in range(0, len(nsd_ids), block):
        total += cache.tokens(nsd_ids[start : start + block]).sum(0, dtype=np.float64)
    return (total / max(len(nsd_ids), 1)).astype(np.float32)


def _predicted(predictions_path, cache, trials_path, test_ids):
    """Per test image: the predicted pooled embedding and tokens (the training mean for a pooled target)."""
    from .encoder import load_predictions
    from .reconstruct import average_by_image  # the images in the order img2img makes them
    from .semantic import predicted_conditioning

    p = load_predictions(predictions_path, "test")
    pooled, tokens = predicted_conditioning(p)
    ids, pooled = average_by_image(pooled, p["nsd_id"])
    if tokens is None:
        mean = mean_tokens(cache, _ids(trials_path, "train"))
        tokens = np.broadcast_to(mean, (len(ids), *mean.shape))
    else:
        tokens = average_by_image(tokens, p["nsd_id"])[1]
    missing = np.setdiff1d(test_ids, ids)
    if missing.size:
        raise BraidError(f"{predictions_path}: no predictions for test images {missing[:5].tolist()}; the semantic "
                         "route's split must hold the same test images (rerun semantic_train)")
    keep = np.searchsorted(ids, test_ids)
    return pooled[keep], np.ascontiguousarray(tokens[keep]), p


def conditioning_arrays(name: str, trials_path, cache_path, captions_path, predictions_path=None, bank_path=None,
                        model_dir=None, device: str = "cpu", dtype: str = "float32", variant: str | None = None,
                        batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame, dict]:
    """(nsd_ids, tokens, pooled, captions table, attrs) of conditioning ``name`` for the test images."""
    from .text_embeddings import TextEmbeddingCache, captions_of, read_caption_table

    mode, encoder = parse(name)
    if mode == "none":
        raise BraidError("the 'none' conditioning is the fixed prompt, encoded by the img2img job")
    cache = TextEmbeddingCache(cache_path)
    ids = _ids(trials_path, "test")
    attrs = {"format": FORMAT, "conditioning": name, "mode": mode, "semantic_encoder": encoder or "",
             "n_parameters_semantic": 0, "weights": cache.weights}
    if mode == "true-caption":
        tokens, pooled = cache.tokens(ids), cache.pooled(ids)
        table = captions_of(read_caption_table(captions_path), ids, str(captions_path))
        first = table.groupby("nsd_id", sort=True)["caption"].first()
        captions = pd.DataFrame({"nsd_id": ids, "caption": first.loc[ids].to_numpy(),
                                 "n_captions": table.groupby("nsd_id").size().loc[ids].to_numpy()})
        return ids, tokens, pooled, captions, attrs
    pooled, tokens, p = _predicted(predictions_path, cache, trials_path, ids)
    attrs |= {"n_parameters_semantic": int(p["n_parameters"]), "semantic_target": p["attrs"].get("target", "pooled")}
    if mode == "predicted":
        captions = pd.DataFrame({"nsd_id": ids, "caption": ""})
        return ids, tokens, pooled, captions, attrs
    from .semantic import Bank
    from .text_embeddings import encode_captions, load_text_encoders

    centre = cache.pooled(_ids(trials_path, "train")).mean(0)
    near = Bank(bank_path).nearest(pooled, centre, k=1)
    captions = pd.DataFrame({"nsd_id": ids, "caption": near["caption"].to_numpy(),
                             "bank_nsd_id": near["bank_nsd_id"].to_numpy(),
                             "caption_index": near["caption_index"].to_numpy(),
                             "similarity": near["similarity"].to_numpy()})
    pipe = load_text_encoders(model_dir, device=device, dtype=dtype, variant=variant)
    tokens, pooled = encode_captions(pipe, captions["caption"].tolist(), batch_size)
    for row in captions.head(5).itertuples():
        log.info("retrieved for %d: %r (similarity %.3f)", row.nsd_id, row.caption, row.similarity)
    return ids, tokens, pooled, captions, attrs


def write_conditioning(name: str, out_zarr, out_csv, **kwargs) -> pd.DataFrame:
    """Conditioning ``name`` of the subject's test images into ``out_zarr`` (``nsd_id``, ``tokens``
    in float16 as the text cache keeps them, ``pooled``) and its captions into ``out_csv``."""
    ids, tokens, pooled, captions, attrs = conditioning_arrays(name, **kwargs)
    if not (np.isfinite(tokens).all() and np.isfinite(pooled).all()):
        raise BraidError(f"conditioning {name}: NaN/inf embeddings; retrain the semantic encoder or check the text "
                         "encoders' dtype (semantic.text_dtype)")
    with atomic_output(out_zarr) as tmp:
        root = new_group(tmp)
        new_array(root, "nsd_id", data=ids.astype(np.int64))
        new_array(root, "tokens", data=np.asarray(tokens, np.float16), chunks=(min(64, len(ids)), *tokens.shape[1:]))
        new_array(root, "pooled", data=np.asarray(pooled, np.float32))
        root.attrs.update(attrs)
    with atomic_output(out_csv) as tmp:
        captions.to_csv(tmp, index=False)
    log.info("conditioning %s: %d test images, tokens %s, pooled %s", name, len(ids), tokens.shape[1:], pooled.shape[1:])
    return captions


def semantic_parameters(path) -> int:
    """The semantic encoder's parameter count a conditioning store records (0 for the true caption),
    from its attributes alone."""
    return int(open_store(path, rule="reconstruct_conditioning").attrs.get("n_parameters_semantic", 0))


class Conditioning:
    """A written conditioning read back whole (tokens stay float16: 0.3 GB for 1,000 test images at
    SSD-1B's width), so that an img2img job reads it once, not per batch: embeddings by NSD id."""

    def __init__(self, path: str | os.PathLike):
        root = open_store(path, rule="reconstruct_conditioning")
        try:
            self.attrs = dict(root.attrs)
            self.ids = np.asarray(root["nsd_id"][:])
            self._tokens, self._pooled = np.asarray(root["tokens"][:]), np.asarray(root["pooled"][:])
        except KeyError as err:
            raise BraidError(f"{path}: not a BRAID conditioning store ({err}); rerun reconstruct_conditioning") from err
        self.path = path

    def get(self, nsd_ids) -> tuple[np.ndarray, np.ndarray]:
        """(tokens float32 (n, 77, width), pooled (n, width)) of ``nsd_ids``."""
        nsd_ids = np.asarray(nsd_ids, np.int64)
        rows = np.searchsorted(self.ids, nsd_ids)
        bad = (rows >= len(self.ids)) | (self.ids[np.minimum(rows, len(self.ids) - 1)] != nsd_ids)
        if bad.any():
            raise BraidError(f"{self.path}: no conditioning for NSD ids {nsd_ids[bad][:5].tolist()}; the latent and "
                             "semantic routes must share their test images (rerun reconstruct_conditioning)")
        return self._tokens[rows].astype(np.float32), self._pooled[rows].astype(np.float32)
