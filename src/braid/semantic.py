"""The semantic route: what a semantic encoder predicts, how it is scored, and the retrieval bank.

**Targets** (:class:`SemanticTargets`, ``target`` of a semantic encoder):

- ``pooled``: the mean over an image's captions of SDXL's ``pooled_prompt_embeds`` (1,280 for
  SSD-1B; :mod:`braid.text_embeddings`).
- ``tokens``: the pooled embedding and the mean ``prompt_embeds`` (77 x 2048 = 157,696 numbers),
  reduced to their first ``token_components`` principal components, fitted on the training
  images' embeddings only (never a validation or test image). The encoder predicts
  ``[pooled, token coefficients]`` (1,280 + k outputs): everything SSD-1B's conditioning needs,
  with ``tokens ≈ mean + coefficients @ basis`` (:func:`predicted_conditioning`). The basis is
  part of the target, like the latents' standardiser, not of the encoder: it is fitted on images,
  not on fMRI, and is not counted in the encoder's parameters. The share of the validation
  images' token variance the components keep is recorded with the predictions
  (``token_variance_kept``).

**Scores** (:func:`semantic_scores`; all on the pooled embedding, centred by the training images'
mean): Pearson r between predicted and true embedding per test row, 2-way identification,
caption retrieval among the test images (each test image scored by its best-matching caption's
cosine similarity to the prediction; top-1 and top-5, chance 1/N and 5/N for N test images),
and, where the stimulus info has a ``category`` column (the synthetic NSD), category accuracy:
the nearest training-category centroid (chance 1 / number of categories).

**Retrieval bank** (:func:`build_bank`, :func:`nearest_captions`): captions whose images are
never in the subject's test split (its training images, or every captioned NSD image but the
test images), with each caption's pooled embedding; the nearest caption to a predicted pooled
embedding is the "retrieved" conditioning of the next stage.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd

from .common import BraidError, atomic_output
from .integrity import new_array, new_group, open_store
from .scores import rowwise_pearson, two_way_identification

log = logging.getLogger(__name__)

TARGETS = ("pooled", "tokens")
BANKS = ("train", "all-but-test")


class SemanticTargets:
    """A semantic encoder's targets by NSD id, read from a text-embedding cache (or its manifest).

    ``fit_ids``: the training images, on which the token components are fitted (``tokens``);
    ``check_ids``: images on which the kept share of token variance is measured (validation).
    Has what :func:`braid.encoder.train` needs of a target: ``get``, ``shape``, ``weights``.
    """

    def __init__(self, cache_path, target: str = "pooled", components: int = 64, fit_ids=None, check_ids=None):
        from .text_embeddings import TextEmbeddingCache

        if target not in TARGETS:
            raise BraidError(f"semantic target {target!r} is not one of {', '.join(TARGETS)}")
        self.cache = TextEmbeddingCache(cache_path)
        self.target, self.weights = target, self.cache.weights
        self.pooled_width = self.cache.pooled_width
        self.predictions_arrays: dict = {}  # written beside an encoder's predictions
        self.predictions_attrs: dict = {"target": target, "pooled_width": self.pooled_width}
        if target == "pooled":
            self.shape = (self.pooled_width,)
            return
        if fit_ids is None or len(fit_ids) < 2:
            raise BraidError("the tokens target needs the training images to fit its components on")
        fit_ids = np.unique(np.asarray(fit_ids, np.int64))
        k = min(int(components), fit_ids.size - 1)
        if k < components:
            log.warning("token_components %d > %d training images - 1: keeping %d components", components,
                        fit_ids.size, k)
        self.token_mean, self.token_basis, kept_train = fit_components(self.cache.tokens(fit_ids), k)
        self.shape = (self.pooled_width + k,)
        self.predictions_arrays = {"token_mean": self.token_mean.reshape(self.cache.token_shape),
                      "token_basis": self.token_basis.reshape(k, *self.cache.token_shape)}
        self.predictions_attrs |= {"token_components": k, "token_variance_kept_train": kept_train}
        if check_ids is not None and len(check_ids):
            self.predictions_attrs["token_variance_kept"] = variance_kept(self.cache.tokens(check_ids), self.token_mean,
                                                              self.token_basis)
        log.info("token target: %d components keep %.3f of the training images' token variance (%s of the "
                 "validation images')", k, kept_train, f"{self.predictions_attrs.get('token_variance_kept', float('nan')):.3f}")

    def get(self, nsd_ids) -> np.ndarray:
        pooled = self.cache.pooled(nsd_ids)
        if self.target == "pooled":
            return pooled
        tokens = self.cache.tokens(nsd_ids).reshape(len(pooled), -1)
        return np.concatenate([pooled, (tokens - self.token_mean) @ self.token_basis.T], axis=1).astype(np.float32)


def fit_components(tokens: np.ndarray, k: int, block: int = 8192) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, top-``k`` principal axes (k, d; orthonormal rows) and the kept share of variance of
    ``tokens`` (n, ...), from the eigendecomposition of the n x n Gram matrix, accumulated in
    float64 over blocks of ``block`` columns (so that only one block is held in float64: the
    token embeddings of 9,000 images are 5.7 GB in float32)."""
    x = np.asarray(tokens, np.float32).reshape(len(tokens), -1)
    mean = x.mean(0, dtype=np.float64)
    gram = np.zeros((len(x), len(x)))
    for c in range(0, x.shape[1], block):
        xc = x[:, c : c + block] - mean[c : c + block]
        gram += xc @ xc.T
    lam, u = np.linalg.eigh(gram)
    top = np.argsort(lam)[::-1][:k]
    lam_k = np.clip(lam[top], 1e-30, None)
    coef = u[:, top].T / np.sqrt(lam_k)[:, None]  # k x n
    basis = np.empty((len(top), x.shape[1]), np.float32)
    for c in range(0, x.shape[1], block):
        basis[:, c : c + block] = coef @ (x[:, c : c + block] - mean[c : c + block])
    total = float(np.trace(gram))
    return mean.astype(np.float32), basis, float(lam_k.sum() / total) if total > 0 else 1.0


def variance_kept(tokens: np.ndarray, mean: np.ndarray, basis: np.ndarray) -> float:
    """The share of ``tokens``' variance (around the fitted ``mean``) that the ``basis`` rows span."""
    xc = np.asarray(tokens, np.float64).reshape(len(tokens), -1) - mean
    total = float((xc * xc).sum())
    return float(((xc @ basis.T.astype(np.float64)) ** 2).sum() / total) if total > 0 else 1.0


def predicted_conditioning(predictions: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """(pooled, tokens or None) of a semantic predictions store read by :func:`braid.encoder.load_predictions`."""
    pred = predictions["pred"]
    width = int(predictions["attrs"].get("pooled_width", pred.shape[1]))  # [pooled, token coefficients]
    pooled = pred[:, :width]
    if "token_basis" not in predictions:
        return pooled, None
    basis = predictions["token_basis"]
    coeffs = pred[:, width:]
    tokens = predictions["token_mean"][None] + np.tensordot(coeffs, basis, axes=(1, 0))
    return pooled, tokens.astype(np.float32)


# --- scores ---------------------------------------------------------------------------------------


def _unit(x: np.ndarray, centre: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64) - centre
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


def caption_retrieval(pred: np.ndarray, row_ids: np.ndarray, caption_emb: np.ndarray, caption_ids: np.ndarray,
                      centre: np.ndarray) -> dict:
    """Top-1 and top-5 caption retrieval among the images of ``caption_ids`` (the test images).

    Each image's score for a prediction is the highest cosine similarity (after subtracting
    ``centre``) between the prediction and one of its captions; a row is a hit at k when its own
    image is among the k best. Ties count against the row (its image must beat every other)."""
    images = np.unique(caption_ids)
    if images.size < 2:
        raise BraidError("caption retrieval needs the captions of at least two test images")
    sims = _unit(pred, centre) @ _unit(caption_emb, centre).T  # rows x captions
    col = np.searchsorted(images, caption_ids)
    best = np.full((len(pred), images.size), -np.inf)
    np.maximum.at(best.T, col, sims.T)  # per image, its best caption
    own = best[np.arange(len(pred)), np.searchsorted(images, row_ids)]
    rank = (best >= own[:, None]).sum(1)  # 1 = own image strictly best
    return {"caption_top1": float(np.mean(rank <= 1)), "caption_top5": float(np.mean(rank <= 5)),
            "caption_chance_top1": 1.0 / images.size, "caption_chance_top5": min(5, images.size) / images.size,
            "n_retrieval_images": int(images.size)}


def category_accuracy(pred: np.ndarray, row_categories: np.ndarray, train_emb: np.ndarray,
                      train_categories: np.ndarray, centre: np.ndarray) -> dict:
    """Share of rows whose prediction is nearest (cosine, centred) to its own category's centroid
    of training embeddings; chance = 1 / number of categories."""
    cats = np.unique(train_categories)
    centroids = np.stack([np.asarray(train_emb, np.float64)[train_categories == c].mean(0) for c in cats])
    guess = cats[np.argmax(_unit(pred, centre) @ _unit(centroids, centre).T, axis=1)]
    return {"category_accuracy": float(np.mean(guess == row_categories)), "category_chance": 1.0 / cats.size}


def semantic_scores(pred_pooled: np.ndarray, row_ids: np.ndarray, cache, train_ids: np.ndarray,
                    train_pooled: np.ndarray, categories: pd.Series | None = None) -> dict:
    """Every semantic score of pooled predictions for rows showing NSD ids ``row_ids``, centred on the
    mean of ``train_pooled`` (the pooled embeddings of the distinct training images ``train_ids``,
    read once by the caller for every encoder it scores)."""
    centre = train_pooled.mean(0)
    true = cache.pooled(row_ids)
    out = {"pooled_r": float(np.mean(rowwise_pearson(pred_pooled - centre, true - centre))),
           "pooled_two_way": two_way_identification(true - centre, pred_pooled - centre, row_ids),
           "n_rows": int(len(row_ids))}
    emb, ids, _ = cache.captions(np.unique(row_ids))
    out |= caption_retrieval(pred_pooled, row_ids, emb, ids, centre)
    if categories is not None:
        out |= category_accuracy(pred_pooled, categories.loc[row_ids].to_numpy(), train_pooled,
                                 categories.loc[train_ids].to_numpy(), centre)
    return out


# --- the retrieval bank ---------------------------------------------------------------------------


def bank_ids(mode: str, trials: pd.DataFrame, all_ids) -> np.ndarray:
    """The images whose captions a subject's bank holds: never one of its test images."""
    if mode not in BANKS:
        raise BraidError(f"semantic.bank {mode!r} is not one of {', '.join(BANKS)}")
    test = np.unique(trials.loc[trials["split"] == "test", "nsd_id"])
    if mode == "train":
        ids = np.unique(trials.loc[trials["split"] == "train", "nsd_id"])
    else:
        ids = np.unique(np.asarray(all_ids, np.int64))
    return np.setdiff1d(ids, test)


def build_bank(cache_path, captions_path, trials_path, mode: str, out_zarr) -> pd.DataFrame:
    """The subject's retrieval bank: each caption's pooled embedding, NSD id, caption index and text."""
    from .text_embeddings import TextEmbeddingCache, captions_of, read_caption_table

    trials = pd.read_parquet(trials_path)
    table = read_caption_table(captions_path)
    ids = bank_ids(mode, trials, table["nsd_id"].unique())
    cache = TextEmbeddingCache(cache_path)
    emb, nsd_ids, index = cache.captions(ids)
    text = captions_of(table, ids, captions_path).set_index(["nsd_id", "caption_index"])["caption"]
    captions = text.reindex(pd.MultiIndex.from_arrays([nsd_ids, index])).to_numpy()
    if pd.isna(captions).any():
        raise BraidError(f"{captions_path} and {cache.path} disagree on the captions of the bank's images; "
                         "rerun the captions and semantic_encode rules")
    with atomic_output(out_zarr) as tmp:
        root = new_group(tmp)
        new_array(root, "pooled", data=emb.astype(np.float32))
        new_array(root, "nsd_id", data=nsd_ids.astype(np.int64))
        new_array(root, "caption_index", data=index.astype(np.int16))
        root.attrs.update({"mode": mode, "n_images": int(np.unique(nsd_ids).size), "n_captions": int(len(nsd_ids)),
                           "captions": [str(c) for c in captions],
                           "excluded": "every image of the subject's test split"})
    log.info("retrieval bank (%s): %d captions of %d images", mode, len(nsd_ids), np.unique(nsd_ids).size)
    return pd.DataFrame({"nsd_id": nsd_ids, "caption_index": index, "caption": captions})


class Bank:
    """A retrieval bank read back: nearest captions to predicted pooled embeddings."""

    def __init__(self, path: str | os.PathLike):
        root = open_store(path, rule="semantic_bank")
        self.pooled = np.asarray(root["pooled"][:], np.float64)
        self.nsd_id = np.asarray(root["nsd_id"][:])
        self.caption_index = np.asarray(root["caption_index"][:])
        self.captions = np.asarray(root.attrs["captions"], dtype=object)
        self.mode = root.attrs["mode"]

    def nearest(self, pred: np.ndarray, centre: np.ndarray, k: int = 1) -> pd.DataFrame:
        """The ``k`` nearest bank captions (cosine after subtracting ``centre``) of each prediction row."""
        sims = _unit(pred, centre) @ _unit(self.pooled, centre).T
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        rows = np.repeat(np.arange(len(pred)), top.shape[1])
        flat = top.ravel()
        return pd.DataFrame({"row": rows, "rank": np.tile(np.arange(1, top.shape[1] + 1), len(pred)),
                             "bank_nsd_id": self.nsd_id[flat], "caption_index": self.caption_index[flat],
                             "caption": self.captions[flat], "similarity": sims[rows, flat]})


def write_oracle_predictions(oracle_path, session_files: dict, roi_files: dict, roi_labels: dict, expdesign_path,
                             trials_path, subject: int, out_zarr) -> None:
    """Synthetic data only: the semantic oracle's pooled predictions for the test rows, stored like an
    encoder's (test split only), from the ventral voxels of the fetched betas
    (:func:`braid.oracle.oracle_predictions` with the semantic ingredients)."""
    from .oracle import oracle_predictions

    trials = pd.read_parquet(trials_path)
    test = trials[trials["split"] == "test"]
    pred = oracle_predictions(oracle_path, session_files, roi_files, roi_labels, expdesign_path, trials, subject)
    with np.load(oracle_path) as f:
        mean, std, n_vox = f["z_mean"], f["z_std"], int(len(f["voxel_ijk"]))
    with atomic_output(out_zarr) as tmp:
        root = new_group(tmp)
        new_array(root, "pred", data=pred.astype(np.float32))
        new_array(root, "nsd_id", data=test["nsd_id"].to_numpy().astype(np.int64))
        new_array(root, "global_trial", data=test["global_trial"].to_numpy().astype(np.int64))
        new_array(root, "z_mean", data=np.asarray(mean, np.float32))
        new_array(root, "z_std", data=np.asarray(std, np.float32))
        root.attrs.update({"n_parameters": 0, "n_voxels": n_vox, "spec": {"kind": "oracle"}, "target": "pooled",
                           "pooled_width": int(pred.shape[1])})


# --- the semantic frontier --------------------------------------------------------------------------

QUALITY = "test_pooled_two_way"
SCORE_COLUMNS = ("pooled_r", "pooled_two_way", "caption_top1", "caption_top5", "category_accuracy")


def _categories(stim_info_path) -> pd.Series | None:
    """The stimulus info's ``category`` column by NSD id (the synthetic NSD has one; NSD does not)."""
    from .nsd import load_stim_info

    info = load_stim_info(stim_info_path)
    return info["category"] if "category" in info else None


def frontier_table(subject: str, predictions: dict, cache_path, trials_path, stim_info_path,
                   oracle=None, reference: str | None = None) -> pd.DataFrame:
    """One row per semantic encoder (val and test scores, parameters, target), the mean predictor
    (0 parameters) and, for the synthetic data, the semantic oracle (test only); sorted by parameters."""
    from .encoder import load_predictions
    from .frontier import pareto_front
    from .text_embeddings import TextEmbeddingCache

    cache = TextEmbeddingCache(cache_path)
    trials = pd.read_parquet(trials_path)
    train_ids = np.unique(trials.loc[trials["split"] == "train", "nsd_id"])
    train_pooled = cache.pooled(train_ids)
    categories = _categories(stim_info_path)
    rows = []
    sources = {name: (path, "encoder") for name, path in predictions.items()}
    if oracle:
        sources["oracle (best linear)"] = (oracle, "oracle")
    for name, (path, role) in sorted(sources.items()):
        row = {"subject": subject, "encoder": name}
        for split in ("val", "test") if role == "encoder" else ("test",):
            p = load_predictions(path, split)
            pooled, _ = predicted_conditioning(p)
            scores = semantic_scores(pooled, p["nsd_id"], cache, train_ids, train_pooled, categories)
            row |= {f"{split}_{k}": v for k, v in scores.items()}
        attrs = p["attrs"]
        row |= {"kind": p["spec"].get("kind", role) if role == "encoder" else "oracle",
                "target": attrs.get("target", "pooled"), "n_parameters": p["n_parameters"] if role == "encoder" else np.nan,
                "n_voxels": p["n_voxels"], "token_components": attrs.get("token_components"),
                "token_variance_kept": attrs.get("token_variance_kept")}
        rows.append(row)
    # the mean predictor: every prediction the training mean; a constant's r is 0, its 2-way and
    # retrieval are at chance (every image ties)
    test = trials[trials["split"] == "test"]
    base = {"subject": subject, "encoder": "mean embedding (baseline)", "kind": "baseline", "target": "pooled",
            "n_parameters": 0, "n_voxels": 0, "test_pooled_r": 0.0, "test_pooled_two_way": 0.5,
            "val_pooled_r": 0.0, "val_pooled_two_way": 0.5}
    n_images = test["nsd_id"].nunique()
    base |= {"test_caption_top1": 1.0 / n_images, "test_caption_top5": min(5, n_images) / n_images,
             "test_caption_chance_top1": 1.0 / n_images, "test_caption_chance_top5": min(5, n_images) / n_images}
    rows.append(base)
    out = pd.DataFrame(rows)
    out["weights"] = cache.weights
    encoders = out["kind"] != "oracle"  # the oracle is a ceiling, not a point on the front
    out["pareto"] = False
    out.loc[encoders, "pareto"] = pareto_front(out.loc[encoders, "n_parameters"], out.loc[encoders, QUALITY])
    out["is_reference"] = out["encoder"] == reference
    first = ["subject", "encoder", "kind", "target", "n_parameters", "n_voxels", "pareto", "is_reference"]
    out = out[first + [c for c in out.columns if c not in first]]
    return out.sort_values(["n_parameters", "encoder"], na_position="last").reset_index(drop=True)


def retrieved_captions(predictions: dict, bank_path, centre: np.ndarray) -> pd.DataFrame:
    """Each semantic encoder's nearest bank caption for every test row (the "retrieved" conditioning),
    by cosine similarity around ``centre`` (the training images' mean pooled embedding)."""
    from .encoder import load_predictions

    bank = Bank(bank_path)
    parts = []
    for name in sorted(predictions):
        p = load_predictions(predictions[name], "test")
        pooled, _ = predicted_conditioning(p)
        near = bank.nearest(pooled, centre, k=1)
        near.insert(0, "global_trial", p["global_trial"][near["row"]])
        near.insert(0, "nsd_id", p["nsd_id"][near["row"]])
        near.insert(0, "encoder", name)
        parts.append(near.drop(columns="row"))
    return pd.concat(parts, ignore_index=True)


def write_frontier(subject: str, predictions: dict, cache_path, trials_path, stim_info_path, bank_path, out_csv,
                   out_png, out_retrieved, oracle=None, reference: str | None = None) -> pd.DataFrame:
    table = frontier_table(subject, predictions, cache_path, trials_path, stim_info_path, oracle, reference)
    with atomic_output(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    from .text_embeddings import TextEmbeddingCache

    trials = pd.read_parquet(trials_path)
    centre = TextEmbeddingCache(cache_path).pooled(np.unique(trials.loc[trials["split"] == "train", "nsd_id"])).mean(0)
    retrieved = retrieved_captions(predictions, bank_path, centre)
    test_ids = set(trials.loc[trials["split"] == "test", "nsd_id"])
    if set(retrieved["bank_nsd_id"]) & test_ids:  # the bank is built to exclude them: a guard, not a filter
        raise BraidError(f"{bank_path}: holds captions of test images; rerun the semantic_bank rule")
    with atomic_output(out_retrieved) as tmp:
        retrieved.to_parquet(tmp, index=False)
    plot_frontier(table, out_png, subject)
    for r in table[table["pareto"] & (table["kind"] != "baseline")].itertuples():
        log.info("semantic front: %s (%s) %s parameters, test pooled 2-way %.3f, caption top-1 %.3f", r.encoder,
                 r.target, f"{int(r.n_parameters):,}", r.test_pooled_two_way, r.test_caption_top1)
    return table


def plot_frontier(t: pd.DataFrame, path, subject: str) -> None:
    """Semantic quality against encoder parameters: pooled 2-way, caption retrieval, category accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .figures import save_figure, stamped
    from .frontier import KIND_COLOURS, pareto_front

    panels = [("test_pooled_two_way", "pooled-embedding 2-way", 0.5), ("test_caption_top1", "caption retrieval top-1", None),
              ("test_caption_top5", "caption retrieval top-5", None)]
    if "test_category_accuracy" in t and t["test_category_accuracy"].notna().any():
        panels.append(("test_category_accuracy", "category accuracy", None))
    enc = t[~t["kind"].isin(["baseline", "oracle"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.9), squeeze=False)
    for ax, (col, label, chance) in zip(axes[0], panels):
        for (kind, target), g in enc.groupby(["kind", "target"]):
            ax.scatter(g["n_parameters"], g[col], s=28, color=KIND_COLOURS.get(kind, "gray"),
                       marker="o" if target == "pooled" else "s", label=f"{kind} ({target})", zorder=3)
        front = enc[pareto_front(enc["n_parameters"], enc[col])].sort_values("n_parameters")
        ax.step(front["n_parameters"], front[col], where="post", color="k", lw=1, alpha=0.6, label="Pareto front")
        ref = enc[enc["is_reference"]]
        if len(ref):
            ax.scatter(ref["n_parameters"], ref[col], marker="*", s=220, facecolor="none", edgecolor="red", lw=1.5,
                       zorder=4, label=f"reference ({ref['encoder'].iloc[0]})")
        if chance is None:
            chance_col = {"test_caption_top1": "test_caption_chance_top1", "test_caption_top5": "test_caption_chance_top5",
                          "test_category_accuracy": "test_category_chance"}[col]
            chance = float(enc[chance_col].iloc[0]) if chance_col in enc and len(enc) else None
        if chance is not None:
            ax.axhline(chance, color="gray", ls=":", lw=1, label=f"chance ({chance:.2g})")
        oracle = t[t["kind"] == "oracle"]
        if len(oracle) and np.isfinite(oracle[col]).any():
            ax.axhline(float(oracle[col].iloc[0]), color="tab:red", ls="-.", lw=1, label="oracle (best linear)")
        ax.set_xscale("log")
        ax.set_xlabel("encoder parameters")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3, which="both", lw=0.5)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(stamped(f"{subject}: semantic quality (test) against encoder size ({len(enc)} encoders)",
                         [t["weights"].iloc[0]]), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
