"""The text-embedding cache: each image's mean of the model's own encode_prompt over its captions, by
NSD id, incremental, never mixing settings, resuming after an interrupted append."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from braid import captions, nsd, synthetic
from braid.common import BraidError
from braid.text_embeddings import TextEmbeddingCache, update_cache


@pytest.fixture(scope="module")
def caption_table(mirror, tmp_path_factory):
    root, _ = mirror
    out = tmp_path_factory.mktemp("captions") / "nsd_captions.parquet"
    captions.build_caption_table(root / nsd.STIM_INFO, root / synthetic.CAPTION_FOLDER, out)
    return out


def direct_embeddings(model, texts):
    """diffusers' own pipeline, one caption per call: the reference the cache must equal."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(model), local_files_only=True)
    tokens, pooled = [], []
    with torch.inference_mode():
        for text in texts:
            t, _, p, _ = pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)
            tokens.append(t[0].numpy())
            pooled.append(p[0].numpy())
    return np.stack(tokens), np.stack(pooled)


def test_the_cache_holds_each_images_mean_of_encode_prompt_over_its_captions(tiny_model, caption_table, tmp_path):
    table = pd.read_parquet(caption_table)
    ids = np.array([3, 0, 7])
    store = tmp_path / "text.zarr"
    update_cache(caption_table, tiny_model, ids, store, {"model": "tiny"}, dtype="float32", batch_size=4)
    cache = TextEmbeddingCache(store)
    for i in ids:
        texts = table.loc[table["nsd_id"] == i].sort_values("caption_index")["caption"].tolist()
        assert len(texts) == 5
        tokens, pooled = direct_embeddings(tiny_model, texts)
        np.testing.assert_allclose(cache.pooled([i])[0], pooled.mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(cache.tokens([i])[0], tokens.mean(0), rtol=2e-3, atol=2e-3)  # stored float16
        each, got_ids, index = cache.captions([i])
        assert (got_ids == i).all() and sorted(index) == list(range(5))
        np.testing.assert_allclose(each[np.argsort(index)], pooled, rtol=1e-4, atol=1e-5)
    assert cache.token_shape == (77, 64) and cache.pooled_width == 32  # the tiny model: 32 + 32 hidden, 32 pooled


def test_the_cache_adds_only_missing_images_and_refuses_other_settings(tiny_model, caption_table, tmp_path):
    store = tmp_path / "text.zarr"
    first = update_cache(caption_table, tiny_model, [1, 2, 3], store, {"model": "tiny"}, dtype="float32")
    before = TextEmbeddingCache(store).pooled([1, 2, 3])
    second = update_cache(caption_table, tiny_model, [2, 3, 4, 5], store, {"model": "tiny"}, dtype="float32",
                          batch_size=3)
    assert (first["encoded"], second["encoded"], second["reused"], second["n_cached"]) == (3, 2, 2, 5)
    np.testing.assert_array_equal(TextEmbeddingCache(store).pooled([1, 2, 3]), before)  # appended, not rewritten
    with pytest.raises(BraidError, match="text embeddings of .* never mixed"):
        update_cache(caption_table, tiny_model, [1], store, {"model": "tiny"}, dtype="bfloat16")
    with pytest.raises(BraidError, match="no captions for 1 NSD ids"):
        update_cache(caption_table, tiny_model, [10**6], store, {"model": "tiny"}, dtype="float32")


def test_an_interrupted_append_is_ignored_and_redone(tiny_model, caption_table, tmp_path):
    """Rows past the committed counters (a job killed before its commit) are not read and are overwritten."""
    import zarr

    store = tmp_path / "text.zarr"
    update_cache(caption_table, tiny_model, [1, 2, 3, 4], store, {"model": "tiny"}, dtype="float32")
    expected = TextEmbeddingCache(store).pooled([1, 2, 3, 4])
    root = zarr.open_group(store, mode="r+")
    order = np.argsort(root["nsd_id"][:4])
    root["pooled"][int(order[-1])] = 99.0  # the last committed image turned to junk, then uncommitted
    n, m = root.attrs["n_committed"], root.attrs["m_committed"]
    assert root["nsd_id"][n - 1] == 4 and (root["caption_nsd_id"][m - 5 : m] == 4).all()
    root.attrs.update({"n_committed": n - 1, "m_committed": m - 5})
    with pytest.raises(BraidError, match="no text embeddings for NSD ids \\[4\\]"):
        TextEmbeddingCache(store).pooled([4])
    again = update_cache(caption_table, tiny_model, [1, 2, 3, 4], store, {"model": "tiny"}, dtype="float32")
    assert again["encoded"] == 1
    np.testing.assert_allclose(TextEmbeddingCache(store).pooled([1, 2, 3, 4]), expected, rtol=1e-5, atol=1e-6)
    assert json.loads((store / "zarr.json").read_text())["attributes"]["m_committed"] == m
