"""The semantic route: scores on fixed arrays, the token target's components against scikit-learn,
the retrieval bank's exclusion of test images, the synthetic captions, and the planted semantic
signal recovered from the ventral ROI (and not from a broken signal path)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from braid import captions, nsd, synthetic
from braid.common import BraidError
from braid.semantic import (Bank, SemanticTargets, bank_ids, build_bank, caption_retrieval, category_accuracy,
                            fit_components, semantic_scores, variance_kept)

# --- scores on fixed arrays ----------------------------------------------------------------------------


def test_caption_retrieval_ranks_images_by_their_best_caption():
    # three images, two captions each, in 2-d; no centring
    emb = np.array([[1, 0], [0.6, 0.8], [0, 1], [-0.6, 0.8], [-1, 0], [0, -1]], float)
    ids = np.array([10, 10, 20, 20, 30, 30])
    pred = np.array([[0.9, 0.1],    # nearest caption: image 10's first -> top-1 hit for 10
                     [0.7, 0.7],    # best captions: 10 (cos .99) then 20 (.71): a miss for 20 at top-1
                     [0, -1]])      # image 30's second caption exactly -> hit
    out = caption_retrieval(pred, np.array([10, 20, 30]), emb, ids, centre=np.zeros(2))
    assert out["caption_top1"] == pytest.approx(2 / 3) and out["caption_top5"] == 1.0
    assert out["caption_chance_top1"] == pytest.approx(1 / 3) and out["caption_chance_top5"] == 1.0
    tie = caption_retrieval(np.array([[1.0, 1.0]]), np.array([10]), np.array([[1.0, 0], [0, 1.0]]), np.array([10, 20]),
                            np.zeros(2))
    assert tie["caption_top1"] == 0.0  # a tie is not a hit


def test_category_accuracy_takes_the_nearest_training_centroid():
    train = np.array([[1, 0], [1, 0.2], [0, 1], [0.2, 1]], float)
    cats = np.array(["cat", "cat", "dog", "dog"])
    pred = np.array([[2, 0.1], [0.1, 3], [1, 0.9]])
    out = category_accuracy(pred, np.array(["cat", "dog", "dog"]), train, cats, np.zeros(2))
    # centroids (1, .1) and (.1, 1): the third prediction (1, .9) is nearer "cat" by cosine
    assert out["category_accuracy"] == pytest.approx(2 / 3) and out["category_chance"] == 0.5


def test_token_components_match_scikit_learns_pca():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 6, 5)) @ np.diag([3, 2, 1, 0.5, 0.1]) + 0.3
    mean, basis, kept = fit_components(x, 3, block=7)  # blocks that do not divide the 30 columns
    pca = PCA(n_components=3).fit(x.reshape(40, -1))
    np.testing.assert_allclose(mean, pca.mean_, atol=1e-5)
    assert kept == pytest.approx(pca.explained_variance_ratio_.sum(), rel=1e-5)
    np.testing.assert_allclose(basis @ basis.T, np.eye(3), atol=1e-5)
    np.testing.assert_allclose(basis.T @ basis, pca.components_.T @ pca.components_, atol=1e-5)  # same subspace
    assert variance_kept(x, mean, basis) == pytest.approx(kept, rel=1e-5)
    other = rng.standard_normal((10, 6, 5))
    assert variance_kept(other, mean, basis) < kept  # held-out data of another structure keeps less


# --- the synthetic captions --------------------------------------------------------------------------------


def test_synthetic_captions_are_coco_format_and_describe_each_stimulus(mirror):
    root, _ = mirror
    info = pd.read_csv(root / nsd.STIM_INFO, index_col=0)
    docs = {split: json.loads((root / key).read_text()) for split, key in synthetic.CAPTION_KEYS.items()}
    by_coco = {}
    for split, doc in docs.items():
        assert {im["id"] for im in doc["images"]} == set(info.loc[info["cocoSplit"] == split, "cocoId"])
        for ann in doc["annotations"]:
            by_coco.setdefault(ann["image_id"], []).append(ann["caption"])
    ids = [a["id"] for doc in docs.values() for a in doc["annotations"]]
    assert len(ids) == len(set(ids)) == 5 * len(info)  # five per image, ids unique across both files
    for nsd_id, row in info.iterrows():
        texts = by_coco[row["cocoId"]]
        assert len(set(texts)) >= 2 and all(len(t) <= synthetic.MAX_CAPTION for t in texts)
        nouns = synthetic._NOUNS[row["category"]]
        assert all(any(noun in t.lower() for noun in nouns) for t in texts), (nsd_id, texts)
    # the category is the stimulus's source photograph: the generator's own draws say so
    cfg = dict(mirror[1]["config"])
    rng = np.random.default_rng(cfg["seed"])
    design = synthetic.make_design(cfg, rng)
    _, made = synthetic.make_stimuli(design["n_images"], rng, attributes=True)
    assert [synthetic.CATEGORIES[m["category"]] for m in made] == info["category"].tolist()


# --- the signal path, end to end on a synthetic NSD ---------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model):
    """A synthetic NSD with enough test images for retrieval, its caption table and text cache, and the
    masked betas of the ventral ROI and of nsdgeneral."""
    from braid import betas
    from braid.latents import write_manifest
    from braid.text_embeddings import update_cache

    cfg = {"seed": 5, "subjects": [1], "sessions": 3, "trials_per_session": 150, "images_per_subject": 150,
           "shared_images": 20, "extra_images": 5, "volume": [16, 18, 14], "roi_fraction": 0.15,
           "semantic_fraction": 0.08, "gain": 2.0, "noise_sd": 1.0, "nonlinearity": "none", "prior_images": 300}
    root = tmp_path_factory.mktemp("semantic_nsd")
    synthetic.generate(cfg, tiny_model, root, image_size=64)
    work = tmp_path_factory.mktemp("semantic_work")
    table = work / "captions.parquet"
    captions.build_caption_table(root / nsd.STIM_INFO, root / synthetic.CAPTION_FOLDER, table)
    split = {"rule": "seed", "train": 0.7, "val": 0.1, "test": 0.2, "seed": 0}
    sessions = {n: root / nsd.betas_key(1, n) for n in (1, 2, 3)}
    stores = {}
    for name, rois in (("ventral", {"streams": [5]}), ("nsdgeneral", {"nsdgeneral": [1]})):
        files = {f: root / nsd.roi_key(1, f) for f in rois}
        betas.build(1, sessions, files, rois, root / nsd.EXPDESIGN, work / f"{name}.zarr", work / f"{name}.parquet",
                    split, trials="average_test")
        stores[name] = work / f"{name}.zarr"
    ids = pd.read_parquet(work / "ventral.parquet")["nsd_id"].unique()
    result = update_cache(table, tiny_model, ids, work / "text.zarr", {"model": "tiny"}, dtype="float32")
    write_manifest(work / "text.json", result, ids)
    return {"root": root, "work": work, "table": table, "stores": stores, "trials": work / "ventral.parquet",
            "model": tiny_model}


def fit_and_score(world, roi="ventral", manifest=None, kind="ridge", target="pooled"):
    """Train a semantic encoder as the rule does and score its test predictions."""
    from braid.encoder import load_predictions, train
    from braid.text_embeddings import TextEmbeddingCache

    work, trials = world["work"], pd.read_parquet(world["trials"])
    manifest = manifest or work / "text.json"
    train_ids = trials.loc[trials["split"] == "train", "nsd_id"].unique()
    targets = SemanticTargets(manifest, target, 8, fit_ids=train_ids)
    out = work / f"{roi}-{kind}-{target}-{abs(hash(str(manifest)))}"
    out.mkdir(exist_ok=True)
    train(world["stores"][roi], world["trials"], targets, {"kind": kind, "rank": 4} if kind == "lowrank" else
          {"kind": kind}, out / "e.safetensors", out / "h.csv", out / "l.png", out / "p.zarr")
    p = load_predictions(out / "p.zarr")
    cache = TextEmbeddingCache(work / "text.json")
    info = nsd.load_stim_info(world["root"] / nsd.STIM_INFO)
    train_ids = np.unique(train_ids)
    return semantic_scores(p["pred"][:, : cache.pooled_width], p["nsd_id"], cache, train_ids, cache.pooled(train_ids),
                           info["category"])


def test_the_planted_semantic_signal_is_recovered_from_the_ventral_roi(world):
    scores = fit_and_score(world)
    chance1, chance5 = scores["caption_chance_top1"], scores["caption_chance_top5"]
    assert scores["n_retrieval_images"] >= 25
    assert scores["pooled_r"] > 0.7 and scores["pooled_two_way"] > 0.95
    assert scores["caption_top1"] > 5 * chance1 and scores["caption_top5"] > 2.5 * chance5
    assert scores["category_accuracy"] > 2 * scores["category_chance"]
    tokens = fit_and_score(world, target="tokens")  # pooled + 8 token components: the pooled part as good
    assert tokens["caption_top5"] > 2.5 * chance5


def test_a_broken_signal_path_scores_near_chance(world, tmp_path):
    """The recovery above fails when captions are attached to the wrong images (an id mapping shifted
    by one, or captions shuffled among images) or the encoder reads the wrong ROI: each broken path
    trains on its own targets and is scored against the true ones."""
    from braid.latents import write_manifest
    from braid.text_embeddings import update_cache

    good = fit_and_score(world)
    wrong_roi = fit_and_score(world, roi="nsdgeneral")
    assert wrong_roi["caption_top1"] < good["caption_top1"] / 2 and wrong_roi["pooled_r"] < good["pooled_r"] - 0.3
    table = pd.read_parquet(world["table"])
    ids = np.sort(table["nsd_id"].unique())
    wanted = pd.read_parquet(world["trials"])["nsd_id"].unique()
    mappings = {"shifted": dict(zip(ids, np.roll(ids, 1))),
                "shuffled": dict(zip(ids, np.random.default_rng(0).permutation(ids)))}
    for name, mapping in mappings.items():
        path = tmp_path / f"{name}.parquet"
        table.assign(nsd_id=table["nsd_id"].map(mapping)).to_parquet(path)
        result = update_cache(path, world["model"], wanted, tmp_path / f"{name}.zarr", {"model": name},
                              dtype="float32")
        write_manifest(tmp_path / f"{name}.json", result, wanted)
        broken = fit_and_score(world, manifest=tmp_path / f"{name}.json")
        assert broken["caption_top1"] < 2 * broken["caption_chance_top1"] < good["caption_top1"] / 2, (name, broken)
        assert broken["caption_top5"] < 2 * broken["caption_chance_top5"], (name, broken)
        assert abs(broken["pooled_r"]) < 0.35, (name, broken)


# --- the retrieval bank --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "all-but-test"])
def test_the_bank_never_holds_a_test_images_caption(world, mode, tmp_path):
    from braid.text_embeddings import TextEmbeddingCache, update_cache

    trials = pd.read_parquet(world["trials"])
    test = set(trials.loc[trials["split"] == "test", "nsd_id"])
    manifest = world["work"] / "text.json"
    if mode == "all-but-test":  # every captioned image embedded, as semantic_encode does for this bank
        every = pd.read_parquet(world["table"])["nsd_id"].unique()
        update_cache(world["table"], world["model"], every, world["work"] / "text.zarr", {"model": "tiny"},
                     dtype="float32")
    bank = build_bank(manifest, world["table"], world["trials"], mode, tmp_path / "bank.zarr")
    assert test and not set(bank["nsd_id"]) & test
    expected = set(trials.loc[trials["split"] == "train", "nsd_id"]) if mode == "train" else \
        set(pd.read_parquet(world["table"])["nsd_id"]) - test
    assert set(bank["nsd_id"]) == expected
    assert (bank.groupby("nsd_id").size() == 5).all()
    table = pd.read_parquet(world["table"]).set_index(["nsd_id", "caption_index"])["caption"]
    assert bank["caption"].tolist() == table.loc[list(zip(bank["nsd_id"], bank["caption_index"]))].tolist()
    # even the exact embedding of a test image's caption retrieves a caption of another image
    cache = TextEmbeddingCache(manifest)
    emb, ids, _ = cache.captions(sorted(test))
    near = Bank(tmp_path / "bank.zarr").nearest(emb, centre=emb.mean(0), k=3)
    assert len(near) == 3 * len(emb) and not set(near["bank_nsd_id"]) & test
    assert near["similarity"].le(1 + 1e-6).all()
    with pytest.raises(BraidError, match="semantic.bank 'all' is not one of"):
        bank_ids("all", trials, [])


# --- img2img's semantic conditionings (braid.conditioning) ----------------------------------------------------


def trained_predictions(world, target="pooled"):
    """A ridge semantic encoder of the ventral ROI trained as the rule does; its predictions store."""
    from braid.encoder import train

    work, trials = world["work"], pd.read_parquet(world["trials"])
    train_ids = trials.loc[trials["split"] == "train", "nsd_id"].unique()
    out = work / f"conditioning-{target}"
    if not (out / "p.zarr").exists():
        out.mkdir(exist_ok=True)
        targets = SemanticTargets(work / "text.json", target, 8, fit_ids=train_ids)
        train(world["stores"]["ventral"], world["trials"], targets, {"kind": "ridge"}, out / "e.safetensors",
              out / "h.csv", out / "l.png", out / "p.zarr")
    return out / "p.zarr"


def by_hand(pipe, captions_list):
    """Each caption's prompt_embeds and pooled embedding, straight from diffusers' encode_prompt."""
    import torch

    with torch.no_grad():
        tokens, _, pooled, _ = pipe.encode_prompt(captions_list, device="cpu", do_classifier_free_guidance=False)
    return tokens.numpy(), pooled.numpy()


def test_each_conditioning_holds_what_its_mode_promises(world, tmp_path):
    """true-caption: the mean of diffusers' embeddings of the image's own captions; predicted: the
    encoder's predictions averaged over each image's test trials (pooled) beside the training images'
    mean tokens, or its token components reassembled; retrieved: the bank caption nearest (cosine
    around the training mean) to the averaged prediction, encoded by the pipeline."""
    from braid.conditioning import Conditioning, conditioning_arrays, names, parse, write_conditioning
    from braid.encoder import load_predictions
    from braid.text_embeddings import load_text_encoders

    assert parse("predicted-ridge-tokens") == ("predicted", "ridge-tokens") and parse("true-caption") == ("true-caption", None)
    assert names(["predicted", "true-caption"], ["a", "b"]) == ["predicted-a", "predicted-b", "true-caption"]
    with pytest.raises(BraidError, match="none of"):
        parse("predicted")
    work, trials = world["work"], pd.read_parquet(world["trials"])
    test_ids = np.unique(trials.loc[trials["split"] == "test", "nsd_id"])
    train_ids = np.unique(trials.loc[trials["split"] == "train", "nsd_id"])
    table = pd.read_parquet(world["table"]).sort_values(["nsd_id", "caption_index"])
    pipe = load_text_encoders(world["model"], dtype="float32")
    common = {"trials_path": world["trials"], "cache_path": work / "text.json", "captions_path": world["table"]}

    out = write_conditioning("true-caption", tmp_path / "true.zarr", tmp_path / "true.csv", **common)
    stored = Conditioning(tmp_path / "true.zarr")
    for i in test_ids[:3]:
        t, p = by_hand(pipe, table.loc[table["nsd_id"] == i, "caption"].tolist())
        tokens, pooled = stored.get([i])
        np.testing.assert_allclose(tokens[0], t.mean(0), atol=2e-2)  # stored in float16
        np.testing.assert_allclose(pooled[0], p.mean(0), rtol=1e-4, atol=1e-5)
    assert out["caption"].tolist()[:1] == table.loc[table["nsd_id"] == test_ids[0], "caption"].tolist()[:1]

    path = trained_predictions(world)
    p = load_predictions(path)
    ids, tokens, pooled, _, attrs = conditioning_arrays("predicted-x", predictions_path=path, **common)
    assert ids.tolist() == test_ids.tolist() and attrs["n_parameters_semantic"] == p["n_parameters"] > 0
    for k, i in enumerate(ids[:4]):
        np.testing.assert_allclose(pooled[k], p["pred"][p["nsd_id"] == i].mean(0), rtol=1e-5, atol=1e-6)
    mean_tokens = np.mean([by_hand(pipe, table.loc[table["nsd_id"] == i, "caption"].tolist())[0].mean(0)
                           for i in train_ids], axis=0)
    np.testing.assert_allclose(tokens[0], mean_tokens, atol=2e-2)
    np.testing.assert_array_equal(tokens[0], tokens[-1])  # a pooled target: the same tokens for every image

    token_path = trained_predictions(world, "tokens")
    q = load_predictions(token_path)
    _, tokens_t, pooled_t, _, _ = conditioning_arrays("predicted-y", predictions_path=token_path, **common)
    rows = q["nsd_id"] == ids[0]
    width = pooled_t.shape[1]
    by_components = q["token_mean"] + np.tensordot(q["pred"][rows, width:].mean(0), q["token_basis"], axes=(0, 0))
    np.testing.assert_allclose(tokens_t[0], by_components, rtol=1e-4, atol=1e-4)
    assert np.abs(tokens_t[0] - tokens_t[1]).max() > 1e-3  # the brain's tokens differ per image

    bank_path = tmp_path / "bank.zarr"
    build_bank(work / "text.json", world["table"], world["trials"], "train", bank_path)
    bank = Bank(bank_path)
    _, tokens_r, pooled_r, caps, _ = conditioning_arrays("retrieved-x", predictions_path=path, bank_path=bank_path,
                                                          model_dir=world["model"], **common)
    from braid.text_embeddings import TextEmbeddingCache

    centre = TextEmbeddingCache(work / "text.json").pooled(train_ids).mean(0)
    unit = lambda x: (x - centre) / np.linalg.norm(x - centre, axis=1, keepdims=True)  # noqa: E731
    nearest = np.argmax(unit(pooled) @ unit(bank.pooled).T, axis=1)
    assert caps["caption"].tolist() == bank.captions[nearest].tolist()
    assert not set(caps["bank_nsd_id"]) & set(test_ids)
    t, pp = by_hand(pipe, caps["caption"].tolist()[:2])
    np.testing.assert_allclose(tokens_r[:2], t, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pooled_r[:2], pp, rtol=1e-4, atol=1e-5)


def test_a_conditioning_without_an_image_is_named(world, tmp_path):
    from braid.conditioning import Conditioning, write_conditioning

    write_conditioning("true-caption", tmp_path / "c.zarr", tmp_path / "c.csv", trials_path=world["trials"],
                       cache_path=world["work"] / "text.json", captions_path=world["table"])
    with pytest.raises(BraidError, match=r"no conditioning for NSD ids \[999999\]"):
        Conditioning(tmp_path / "c.zarr").get([999999])
