"""Score reconstructions with the field's metrics, and the predicted latents themselves.

Image metrics follow the MindEye reference code (the "ME" preset: ``src/Reconstruction_Metrics.py``
of github.com/MedARC-AI/fMRI-reconstruction-NSD, the same in MindEyeV2's
``src/final_evaluations.ipynb``), which ran torchvision 0.15/0.16:

- resampling: reconstruction and stimulus are resized to 256², then to 425², with a *tensor*
  ``transforms.Resize`` (bilinear, half-pixel centres). In those torchvision versions a tensor
  resize does **not** antialias (the default changed in 0.17), so neither does BRAID: an
  antialiased downscale reads SSIM up to +0.14 high on noisy images. (MindEye stored its ground
  truth at 256²; BRAID brings the 425² stimulus there with the same resize.)
- PixCorr: Pearson r of the flattened RGB images (all three channels), per image, averaged.
- SSIM: 2-D SSIM of the ``rgb2gray`` images with Gaussian weights (σ 1.5), population
  covariance, data range 1 (scikit-image ≥ 0.20 semantics).

The six network metrics (:mod:`braid.metric_networks`): 2-way identification on AlexNet's
``features.4`` and ``features.11``, InceptionV3's pool and CLIP ViT-L/14's image embedding;
EfficientNet-B1's and SwAV-ResNet50's pool as mean correlation distances (lower is better), each
network on the 256² images with its own resize and normalisation. Features of the test stimuli are
computed once per subject (:func:`stimulus_features`), those of each run's reconstructions in its
job. 2-way is per image: reconstruction j against every other test image's stimulus; the mean
over images is MindEye's number.

Retrieval (:func:`retrieval`): top-1 between the image-averaged predicted latents and the true
latents (both z-scored with the training statistics), among min(300, n) test images, averaged
over 30 random pools as MindEye does; per image the fraction of pools in which it was retrieved.

Latent metrics per test row are :mod:`braid.scores`'. Every run writes a per-image table;
:func:`summarise` aggregates them over images and seeds (mean, s.e.m. over images, s.d. over
seeds) and prints them in the papers' columns beside the published rows (:mod:`braid.published`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .common import BraidError, atomic_output
from .figures import not_a_result, save_figure, stamped
from .integrity import check_folder, new_array, new_group, open_store
from .metric_networks import to_256
from .scores import (  # noqa: F401  (re-exported: the metrics' home for users of this module)
    TIE, latent_metrics, rowwise_pearson, standardiser, two_way_identification, two_way_scores)

log = logging.getLogger(__name__)


# --- images: the ME resampling, PixCorr and SSIM ---------------------------------------------


def me_425(x256):
    """The 256² images -> 425², where MindEye computes PixCorr and SSIM (bilinear, no antialias)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    return resize(x256, [425, 425], interpolation=InterpolationMode.BILINEAR, antialias=False)


def stimuli_as_float(stimuli: np.ndarray) -> np.ndarray:
    """uint8 (n, H, W, 3) -> float32 (n, 3, H, W) in [0, 1]."""
    return np.moveaxis(stimuli, -1, 1).astype(np.float32) / 255.0


def pixel_metrics(rec256, gt256) -> pd.DataFrame:
    """Per-image PixCorr and SSIM of two (n, 3, 256, 256) tensors, at 425² as MindEye computes them."""
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    rec = me_425(rec256).numpy()
    gt = me_425(gt256).numpy()
    ssim = [
        structural_similarity(
            rgb2gray(np.moveaxis(r, 0, -1)),
            rgb2gray(np.moveaxis(g, 0, -1)),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        for r, g in zip(rec, gt)
    ]
    return pd.DataFrame({"pixcorr": rowwise_pearson(rec, gt), "ssim": np.asarray(ssim, np.float64)})


def image_metrics(recons: np.ndarray, stimuli: np.ndarray) -> pd.DataFrame:
    """Per-image PixCorr and SSIM; ``recons`` float (n, 3, H, W) in [0, 1], ``stimuli`` uint8 (n, H, W, 3)."""
    if len(recons) != len(stimuli):
        raise BraidError(f"{len(recons)} reconstructions for {len(stimuli)} stimuli")
    return pixel_metrics(to_256(recons), to_256(stimuli_as_float(stimuli)))


# --- the network metrics ---------------------------------------------------------------------

IMAGE_METRICS = ["pixcorr", "ssim", "alexnet2", "alexnet5", "inception", "clip", "efficientnet", "swav", "category"]
RETRIEVAL = ["retrieval_image", "retrieval_brain"]
NO_NETWORKS = "none"  # the metric_weights stamp of a run scored without networks


def network_features(images256, weights: dict, device: str = "cpu", batch_size: int = 32) -> dict[str, np.ndarray]:
    """Features of (n, 3, 256, 256) images for every network in ``weights`` (network -> folder)."""
    from . import metric_networks as nets

    out = {}
    for network in sorted(weights):
        model = nets.load(network, weights[network], device=device)
        out |= nets.features(network, model, images256, batch_size=batch_size)
        del model
    return out


def weights_stamp(weights: dict) -> str:
    """``pretrained``, or the random stamp when any network's weights are random (``none`` without networks)."""
    from . import metric_networks as nets

    stamps = {nets.weights_of(folder) for folder in weights.values()}
    if not stamps:
        return NO_NETWORKS
    return nets.RANDOM if nets.RANDOM in stamps else "pretrained"


def network_scores(rec: dict[str, np.ndarray], gt: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per image: the 2-way score (AlexNet, Inception, CLIP) or the correlation distance (EfficientNet, SwAV)."""
    from .metric_networks import METRICS, correlation_distance

    out = {}
    for metric in rec:
        kind = METRICS[metric][2]
        out[metric] = two_way_scores(gt[metric], rec[metric]) if kind == "two_way" else correlation_distance(gt[metric], rec[metric])
    return out


def test_images(trials_path) -> np.ndarray:
    """The distinct test images of a subject, ascending (the order of every per-image table)."""
    table = pd.read_parquet(trials_path, columns=["nsd_id", "split"])
    return np.unique(table.loc[table["split"] == "test", "nsd_id"].to_numpy())


def stimulus_features(stimuli_path, trials_path, weights: dict, out_zarr, device: str = "cpu", batch_size: int = 32,
                      stim_info_path=None) -> None:
    """Network features of a subject's test stimuli, once for every run that is scored against them;
    with a stimulus info that has categories (the synthetic NSD), also the category readout's pool
    (:func:`category_pool`) and the test images' categories."""

    from .latents import read_stimuli

    ids = test_images(trials_path)
    gt256 = to_256(stimuli_as_float(read_stimuli(stimuli_path, ids)))
    feats = network_features(gt256, weights, device, batch_size)
    pool = category_pool(stimuli_path, trials_path, stim_info_path) if stim_info_path is not None else None
    with atomic_output(out_zarr) as tmp:
        root = new_group(tmp)
        new_array(root, "nsd_id", data=ids.astype(np.int64))
        for metric, f in feats.items():
            new_array(root, metric, data=f.astype(np.float32))
        root.attrs.update({"metric_weights": weights_stamp(weights), "networks": sorted(weights)})
        if pool is not None:
            descriptors, labels, by_id = pool
            new_array(root, "category_pool", data=descriptors.astype(np.float32))
            root.attrs.update({"category_pool_labels": [str(c) for c in labels],
                               "category_test": [str(c) for c in by_id.loc[ids]]})
    log.info("features of %d test stimuli: %s", ids.size, {k: v.shape[1] for k, v in feats.items()})


def read_category_pool(path) -> tuple[np.ndarray, np.ndarray, pd.Series] | None:
    """What :func:`stimulus_features` stored for the category readout (as :func:`category_pool`
    gives it, the categories of the test images only); None where the data have no categories."""
    root = open_store(path, rule="evaluate_stimuli")
    if "category_pool_labels" not in root.attrs:
        return None
    ids = np.asarray(root["nsd_id"][:])
    return (np.asarray(root["category_pool"][:], np.float64), np.asarray(root.attrs["category_pool_labels"]),
            pd.Series(root.attrs["category_test"], index=ids))


def read_stimulus_features(path, ids: np.ndarray, metrics) -> dict[str, np.ndarray]:
    try:
        root = open_store(path, rule="evaluate_stimuli")
        have = np.asarray(root["nsd_id"][:])
        out = {m: np.asarray(root[m][:]) for m in metrics}
    except (KeyError, FileNotFoundError) as err:
        raise BraidError(f"{path}: no features {err} here; rerun the evaluate_stimuli rule") from err
    if not np.array_equal(have, ids):
        raise BraidError(f"{path}: features of other test images than the reconstructions'; rerun the evaluate_stimuli rule")
    return out


# --- retrieval ------------------------------------------------------------------------------


def retrieval(pred: np.ndarray, true: np.ndarray, pool: int = 300, draws: int = 30, seed: int = 0) -> dict:
    """Top-1 retrieval between predicted and true embeddings (MindEye's: cosine similarity of
    L2-normalised flattened rows, among ``pool`` random test samples, averaged over ``draws``).

    Image retrieval: each prediction picks the most similar true row; brain retrieval: each true
    row picks the most similar prediction. A pick is right when its own row is more similar than
    every other in the pool by more than ``TIE`` (a tie is not a hit). With ``pool`` ≥ n every
    draw is the whole test set. Returns the means (``image``, ``brain``; chance 1/pool) and, per
    row, the fraction of the draws that held it in which it was retrieved.
    """
    p = np.asarray(pred, np.float64).reshape(len(pred), -1)
    t = np.asarray(true, np.float64).reshape(len(true), -1)
    n = len(p)
    if n < 2:
        raise BraidError("retrieval needs at least two test images")
    p = p / (np.linalg.norm(p, axis=1, keepdims=True) + 1e-12)
    t = t / (np.linalg.norm(t, axis=1, keepdims=True) + 1e-12)
    k = min(pool, n)
    rng = np.random.default_rng(seed)
    draws = 1 if k == n else draws
    hits = {"image": np.zeros(n), "brain": np.zeros(n)}
    seen = np.zeros(n)
    means = {"image": [], "brain": []}
    for _ in range(draws):
        idx = np.sort(rng.choice(n, k, replace=False)) if k < n else np.arange(n)
        sim = p[idx] @ t[idx].T  # rows: predictions, columns: true
        own = np.diag(sim)
        off = sim + np.diag(np.full(k, -np.inf))
        for name, best_other in (("image", off.max(1)), ("brain", off.max(0))):
            hit = own > best_other + TIE
            hits[name][idx] += hit
            means[name].append(hit.mean())
        seen[idx] += 1
    with np.errstate(invalid="ignore"):
        per_row = {name: np.where(seen > 0, hits[name] / np.maximum(seen, 1), np.nan) for name in hits}
    return {"image": float(np.mean(means["image"])), "brain": float(np.mean(means["brain"])), "pool": k,
            "per_image": per_row["image"], "per_brain": per_row["brain"]}


def latent_scores(predictions, latents, pool: int, draws: int) -> tuple[dict, pd.DataFrame, dict]:
    """Latent metrics per test row, and per test image retrieval of the image-averaged predictions
    (z-scored with the training statistics, as ``latent_r``). Returns (run-level metrics, per-image
    table, the predictions store's contents)."""
    from .encoder import load_predictions
    from .latents import LatentCache
    from .reconstruct import average_by_image

    preds = load_predictions(predictions)
    cache = LatentCache(latents)
    true = cache.get(preds["nsd_id"])
    row = latent_metrics(preds["pred"], true, preds["z_mean"], preds["z_std"], preds["nsd_id"])
    ids, mean_pred = average_by_image(preds["pred"], preds["nsd_id"])
    z = lambda a: (a - preds["z_mean"]) / preds["z_std"]  # noqa: E731
    ret = retrieval(z(mean_pred), z(cache.get(ids)), pool, draws)
    row |= {"retrieval_pool": ret["pool"], "weights": cache.weights}
    per_image = pd.DataFrame({"nsd_id": ids, "retrieval_image": ret["per_image"], "retrieval_brain": ret["per_brain"]})
    return row, per_image, preds


# --- one run: a source (encoder or reference), decode-only or img2img at one strength and seed ----


def load_images(directory: str | os.PathLike, nsd_ids) -> np.ndarray:
    """Reconstructions ``<nsd_id>.png`` from ``directory`` as float (n, 3, H, W) in [0, 1], after the
    folder is checked against its manifest (a missing, added or replaced image is named)."""
    from PIL import Image

    check_folder(directory, rule="reconstruct_decode" if Path(directory).parent.name == "decode" else "reconstruct_img2img")
    out = []
    for i in nsd_ids:
        p = Path(directory) / f"{int(i)}.png"
        if not p.is_file():
            raise BraidError(f"{p}: reconstruction missing; rerun the reconstruct rule")
        out.append(np.moveaxis(np.asarray(Image.open(p).convert("RGB"), np.float32) / 255.0, -1, 0))
    return np.stack(out)


def run_keys(run: str) -> dict:
    """``decode`` or ``<conditioning>/guidance-<g>/strength-<s>/seed-<k>`` (a run's folder) -> mode
    (decode, img2img), conditioning, semantic encoder, guidance scale, strength, seed."""
    from .conditioning import parse

    if run == "decode":
        return {"mode": "decode", "conditioning": "", "semantic_encoder": "", "guidance": np.nan,
                "strength": np.nan, "seed": -1}
    try:
        conditioning, guidance, strength, seed = run.split("/")
        _, semantic = parse(conditioning)
        return {"mode": "img2img", "conditioning": conditioning, "semantic_encoder": semantic or "",
                "guidance": float(guidance.removeprefix("guidance-")),
                "strength": float(strength.removeprefix("strength-")), "seed": int(seed.removeprefix("seed-"))}
    except (ValueError, BraidError):
        raise BraidError(f"run {run!r} is neither 'decode' nor '<conditioning>/guidance-<g>/strength-<s>/seed-<k>'") \
            from None


# --- the synthetic world's category readout --------------------------------------------------

CATEGORY_SIZE = 8  # blocks per side of the thumbnail the category descriptor compares


def category_descriptor(images256: np.ndarray) -> np.ndarray:
    """Unit vectors (n, d) describing which picture each image was cut from: each colour channel
    averaged into an 8 x 8 thumbnail and standardised per image and channel (so unchanged by a
    colour cast, brightness and contrast, which the synthetic stimuli vary per channel), the three
    channels concatenated, centred and scaled to unit length.

    ``images256``: float (n, 3, 256, 256) in [0, 1]. A stand-in for a classifier on the synthetic
    NSD, whose 14 categories are the photographs its stimuli are cropped from: a reconstruction
    is read as the category of the training stimulus whose coarse layout it shares
    (:func:`nearest_category`). Coarse on purpose: the tiny model's 64 px reconstructions keep
    an image's layout long before its texture. Real NSD has no categories to read out."""
    x = np.asarray(images256, np.float64)
    n, c, h, w = x.shape
    b = h // CATEGORY_SIZE
    g = x[:, :, : b * CATEGORY_SIZE, : b * CATEGORY_SIZE].reshape(n, c, CATEGORY_SIZE, b, CATEGORY_SIZE, b).mean((3, 5))
    g = (g - g.mean((2, 3), keepdims=True)) / (g.std((2, 3), keepdims=True) + 1e-6)
    v = g.reshape(n, -1)
    v = v - v.mean(1, keepdims=True)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def nearest_category(query: np.ndarray, pool: np.ndarray, pool_categories) -> np.ndarray:
    """The category of each ``query`` descriptor's nearest ``pool`` descriptor (cosine; the first on ties)."""
    return np.asarray(pool_categories)[np.argmax(query @ pool.T, axis=1)]


def category_pool(stimuli_path, trials_path, stim_info_path) -> tuple[np.ndarray, np.ndarray, pd.Series] | None:
    """Descriptors and categories of the subject's training stimuli (the pool the category readout
    matches against), and every image's category by NSD id; None where the stimulus info has no
    ``category`` column (NSD)."""
    from .latents import read_stimuli
    from .semantic import _categories

    categories = _categories(stim_info_path)
    if categories is None:
        return None
    trials = pd.read_parquet(trials_path)
    ids = np.unique(trials.loc[trials["split"] == "train", "nsd_id"].to_numpy())
    if not ids.size:
        log.warning("%s: no training images to read categories against; no category readout", trials_path)
        return None
    descriptors = np.concatenate([
        category_descriptor(to_256(stimuli_as_float(read_stimuli(stimuli_path, ids[i : i + 64]))))
        for i in range(0, len(ids), 64)])
    return descriptors, categories.loc[ids].to_numpy(), categories


def evaluate_images(images, predictions, latents, stimuli_path, features_path, weights: dict, out_parquet,
                    subject: str, source: str, run: str, pool: int = 300, draws: int = 30, device: str = "cpu",
                    batch_size: int = 32, conditioning_path=None, categories=None) -> pd.DataFrame:
    """Every metric of one run, per test image, into a Parquet table (run-level latent metrics repeated).

    ``conditioning_path``: the run's :mod:`braid.conditioning` store, whose semantic encoder's
    parameters add to the latent encoder's (``n_parameters``: the brain-side total).
    ``categories``: :func:`category_pool`'s: a reconstruction is read as the category of its
    nearest training stimulus, right or wrong (``category``, 1 or 0; the stimuli themselves
    score the readout's ceiling)."""
    from .latents import read_stimuli

    row, per_image, preds = latent_scores(predictions, latents, pool, draws)
    ids = per_image["nsd_id"].to_numpy()
    rec256 = to_256(load_images(images, ids))
    gt256 = to_256(stimuli_as_float(read_stimuli(stimuli_path, ids)))
    table = pd.concat([per_image, pixel_metrics(rec256, gt256)], axis=1)
    if weights:
        rec = network_features(rec256, weights, device, batch_size)
        gt = read_stimulus_features(features_path, ids, list(rec))
        for metric, values in network_scores(rec, gt).items():
            table[metric] = values
    if categories is not None:
        descriptors, pool_categories, by_id = categories
        guess = nearest_category(category_descriptor(rec256), descriptors, pool_categories)
        table["category"] = (guess == by_id.loc[ids].to_numpy()).astype(np.float64)
    semantic = 0
    if conditioning_path is not None:
        from .conditioning import semantic_parameters

        semantic = semantic_parameters(conditioning_path)  # its attributes, not its embeddings
    keys = {"subject": subject, "encoder": source, "kind": preds["spec"].get("kind", ""), **run_keys(run),
            "n_parameters": preds["n_parameters"] + semantic, "n_parameters_latent": preds["n_parameters"],
            "n_parameters_semantic": semantic}
    for k, v in reversed(keys.items()):
        table.insert(0, k, v)
    for k, v in row.items():
        table[k] = v
    table["metric_weights"] = weights_stamp(weights)
    with atomic_output(out_parquet) as tmp:
        table.to_parquet(tmp, index=False)
    means = {m: round(float(table[m].mean()), 4) for m in IMAGE_METRICS + RETRIEVAL if m in table}
    log.info("%s %s %s: %s", subject, source, run, means)
    return table


# --- per subject: the picture of every row at one strength ------------------------------------


def save_grid(stimuli: np.ndarray, rows: list[tuple[str, np.ndarray]], labels, path, title: str, n: int = 8,
              notes: list | None = None) -> None:
    """PNG: the stimuli on top, then one row of reconstructions per (label, images); ``notes``: per
    row None or one text per image, printed (wrapped) under it."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(min(n, len(stimuli)), 1)
    all_rows = [("seen", [im for im in stimuli[:n]])] + [
        (label, [np.moveaxis(np.clip(r, 0, 1), 0, -1) for r in recs[:n]]) for label, recs in rows]
    all_notes = [None] + list(notes or [None] * len(rows))
    heights = [1.0 + (0.45 if note else 0.0) for note in all_notes]
    fig, axes = plt.subplots(len(all_rows), n, figsize=(1.25 * n + 1.6, 1.3 * sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for i, (label, images) in enumerate(all_rows):
        for k in range(n):
            ax = axes[i, k]
            ax.axis("off")
            if k < len(images):
                ax.imshow(images[k])
            if all_notes[i] and k < len(all_notes[i]):
                ax.text(0.5, -0.04, textwrap.fill(all_notes[i][k], 24), transform=ax.transAxes, ha="center", va="top",
                        fontsize=5, color="#333")
        axes[i, 0].text(-0.08, 0.5, label, transform=axes[i, 0].transAxes, ha="right", va="center", fontsize=7)
    for k in range(min(n, len(labels))):
        axes[0, k].set_title(str(labels[k]), fontsize=7)
    fig.suptitle(title, fontsize=9)
    height = fig.get_size_inches()[1]
    fig.tight_layout(rect=(0.1, 0, 1, 1 - 0.18 * (title.count("\n") + 1) / height))  # room for the title's lines
    plain = [i for i, note in enumerate(all_notes) if not note]
    if plain and len(plain) < len(all_notes):  # a row with notes: its images as large as the others, notes below
        box = axes[plain[0], 0].get_position(original=True).height
        for i, note in enumerate(all_notes):
            for ax in axes[i] if note else ():
                p = ax.get_position(original=True)
                ax.set_position([p.x0, p.y1 - box, p.width, box])
    save_figure(fig, path, dpi=100)


REFERENCE_LABELS = {"true-latent": "true z0", "mean-latent": "mean z0"}


CONDITIONING_LABELS = {"none": "img2img", "true-caption": "true caption\n(semantic ceiling)"}


def conditioning_label(conditioning: str) -> str:
    """A grid row's name for an img2img conditioning."""
    from .conditioning import parse

    mode, encoder = parse(conditioning)
    return CONDITIONING_LABELS.get(mode) or f"{mode}\n({encoder})"


def grid_rows(sources: dict[str, list[str]], strength: str) -> list[tuple[str, str, str]]:
    """(label, source, run) of a subject's grid at one strength: the references, then each encoder
    decoded and through img2img in each of its conditionings (``sources``: source -> conditionings,
    ``none`` first); ``run`` is ``decode`` or the conditioning."""
    refs = [s for s in ("true-latent", "mean-latent") if s in sources]
    encoders = sorted(s for s in sources if s not in refs)
    rows = []

    def conditioned(source, name):
        return [(f"{name}, {conditioning_label(c)}", source, c) for c in sources[source] if c != "none"]

    if "true-latent" in refs:
        rows += [("true z0, decoded\n(VAE ceiling)", "true-latent", "decode"),
                 ("true z0, img2img\n(ceiling)", "true-latent", "none"), *conditioned("true-latent", "true z0")]
    for enc in encoders:
        rows += [(f"{enc}\ndecoded", enc, "decode"), (f"{enc}\nimg2img", enc, "none"), *conditioned(enc, enc)]
    if "mean-latent" in refs:
        rows += [("mean z0, img2img\n(chance)", "mean-latent", "none"), *conditioned("mean-latent", "mean z0")]
    return rows


def evaluate_grid(subject: str, strength: str, seed: int, image_dirs: dict, stimuli_path, trials_path, out_png,
                  weights: str = "pretrained", captions: dict | None = None, guidance: str = "1") -> None:
    """``image_dirs``: (source, "decode" | conditioning) -> folder of PNGs; ``captions``: conditioning
    -> its captions CSV (:mod:`braid.conditioning`), printed under the images of its rows."""
    from .latents import read_stimuli

    ids = test_images(trials_path)[:8]
    stimuli = read_stimuli(stimuli_path, ids)
    sources: dict[str, list[str]] = {}
    for source, run in image_dirs:
        if run != "decode":
            sources.setdefault(source, []).append(run)
    for source in sources:
        sources[source].sort(key=lambda c: c != "none")
    texts = {}
    for conditioning, path in (captions or {}).items():
        table = pd.read_csv(path, keep_default_na=False).set_index("nsd_id")["caption"]
        if table.astype(bool).any():  # retrieved (and true) captions; predicted embeddings have none
            texts[conditioning] = [str(table.get(int(i), "")) for i in ids]
    rows, notes = [], []
    for label, source, run in grid_rows(sources, strength):
        rows.append((label, load_images(image_dirs[(source, run)], ids)))
        notes.append(texts.get(run) if run.startswith("retrieved-") else None)
    title = (f"{subject}: test images and their reconstructions (img2img at strength {strength}, guidance {guidance}, "
             f"seed {seed})")
    save_grid(stimuli, rows, ids, out_png, stamped(title, [weights]), notes=notes)


# --- the synthetic data's oracle ------------------------------------------------------------

ORACLE_COLUMNS = {"latent_r": "oracle_latent_r", "latent_two_way": "oracle_latent_two_way",
                  "latent_mse": "oracle_latent_mse"}


def evaluate_oracle(oracle_path, session_files: dict, roi_files: dict, roi_labels: dict, expdesign_path, trials_path,
                    latents_path, out_metrics, subject: str) -> pd.DataFrame:
    """The synthetic data's oracle (``braid.synthetic``) scored like an encoder, on the same test rows."""
    from .common import subject_number
    from .latents import LatentCache
    from .oracle import oracle_predictions

    trials = pd.read_parquet(trials_path)
    pred = oracle_predictions(oracle_path, session_files, roi_files, roi_labels, expdesign_path, trials,
                              subject_number(subject))
    cache = LatentCache(latents_path)
    test = trials[trials["split"] == "test"]
    train_z = cache.get(trials.loc[trials["split"] == "train", "nsd_id"].to_numpy())
    mean, std = standardiser(train_z.reshape(len(train_z), -1))
    true = cache.get(test["nsd_id"].to_numpy()).reshape(len(test), -1)
    row = {"subject": subject} | latent_metrics(pred, true, mean, std, test["nsd_id"].to_numpy())
    table = pd.DataFrame([row])
    with atomic_output(out_metrics) as tmp:
        table.to_csv(tmp, index=False)
    log.info("oracle: %s", row)
    return table


# --- all runs: tables, figures, the literature's rows ---------------------------------------------

KEYS = ["subject", "encoder", "mode", "conditioning", "semantic_encoder", "guidance", "strength"]
RUN_LEVEL = ["kind", "n_parameters", "n_parameters_latent", "n_parameters_semantic", "latent_mse", "latent_r", "latent_two_way", "n_test_trials", "retrieval_pool",
             "weights", "metric_weights"]


def aggregate(per_image: pd.DataFrame) -> pd.DataFrame:
    """One row per subject × encoder × mode × conditioning × guidance × strength (a run without its
    seed): each per-image metric's mean over images
    and seeds, its s.e.m. over images (of the per-image means over seeds), and the standard
    deviation of the per-seed means across seeds (``_seed_sd``; NaN with one seed)."""
    metrics = [m for m in IMAGE_METRICS + RETRIEVAL if m in per_image]
    rows = []
    for key, g in per_image.groupby(KEYS, dropna=False, sort=True):
        row = dict(zip(KEYS, key)) | {c: g[c].iloc[0] for c in RUN_LEVEL if c in g}
        seeds = sorted(g["seed"].unique())
        by_image = g.groupby("nsd_id")[metrics].mean()
        by_seed = g.groupby("seed")[metrics].mean()
        row |= {"n_seeds": len(seeds), "n_test_images": len(by_image)}
        for m in metrics:
            values = by_image[m].dropna()
            row[m] = float(values.mean()) if len(values) else np.nan
            row[f"{m}_sem"] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else np.nan
            row[f"{m}_seed_sd"] = float(by_seed[m].std(ddof=1)) if len(seeds) > 1 else np.nan
        rows.append(row)
    out = pd.DataFrame(rows)
    order = {"decode": 0, "img2img": 1, "none": 0, "true-caption": 3}
    rank = lambda c: c.map(lambda v: order.get(v, 1 if str(v).startswith("predicted") else 2)) \
        if c.name in ("mode", "conditioning") else c  # noqa: E731
    return out.sort_values(["subject", "encoder", "mode", "conditioning", "semantic_encoder", "guidance", "strength"],
                           key=rank, na_position="first").reset_index(drop=True)


SEMANTIC_SUMMARY = {"target": "semantic_target", "test_pooled_r": "semantic_pooled_r",
                    "test_pooled_two_way": "semantic_pooled_two_way", "test_caption_top1": "caption_top1",
                    "test_caption_top5": "caption_top5", "test_caption_chance_top1": "caption_chance_top1",
                    "test_caption_chance_top5": "caption_chance_top5", "test_category_accuracy": "category_accuracy",
                    "test_category_chance": "category_chance", "token_variance_kept": "token_variance_kept"}


def semantic_rows(files) -> pd.DataFrame:
    """The semantic frontiers' encoders and oracle as ``summary.csv`` rows: mode ``semantic``, encoder
    ``semantic/<name>``, their test scores in embedding space (:data:`SEMANTIC_SUMMARY`)."""
    if not files:
        return pd.DataFrame()
    t = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    t = t[t["kind"] != "baseline"]
    out = t[["subject", "encoder", "kind", "n_parameters", "weights"]].copy()
    out["encoder"] = "semantic/" + out["encoder"]
    out["mode"] = "semantic"
    for src, dst in SEMANTIC_SUMMARY.items():
        out[dst] = t[src] if src in t else np.nan
    return out.reset_index(drop=True)


def summarise(per_image_files: list[str], out_csv, out_parquet, out_png, out_html, oracle_files=(), frontier_files=(),
              out_frontier=None, semantic_files=(), out_frontier_images=None, reference: str | None = None) -> pd.DataFrame:
    """The per-image tables of every run into one Parquet file; their aggregate (with the synthetic
    oracle's ``oracle_*`` where known) into ``summary.csv``, followed by the semantic encoders' rows
    (mode ``semantic``, from each subject's semantic frontier); the metric-vs-strength figure; the
    table in the papers' format beside their published rows (HTML); and each subject's frontier
    joined with the image metrics of the encoders that were reconstructed; the frontier of image
    quality against brain-side parameters (:func:`braid.frontier.plot_images`, ``reference``: the
    seed design's encoder)."""
    per_image = pd.concat([pd.read_parquet(f) for f in per_image_files], ignore_index=True)
    with atomic_output(out_parquet) as tmp:
        per_image.to_parquet(tmp, index=False)
    table = aggregate(per_image)
    if oracle_files:
        oracle = pd.concat([pd.read_csv(f) for f in oracle_files], ignore_index=True)
        oracle = oracle[["subject", *ORACLE_COLUMNS]].rename(columns=ORACLE_COLUMNS)
        table = table.merge(oracle, on="subject", how="left")
    semantic = semantic_rows(semantic_files)
    with atomic_output(out_csv) as tmp:
        pd.concat([table, semantic], ignore_index=True).to_csv(tmp, index=False)
    plot_metrics(table, out_png)
    from .published import html_table

    with atomic_output(out_html) as tmp:
        Path(tmp).write_text(html_table(table, semantic))
    if out_frontier is not None:
        frontier = pd.concat([pd.read_csv(f) for f in frontier_files], ignore_index=True) if frontier_files else pd.DataFrame()
        joined = join_frontier(frontier, table)
        with atomic_output(out_frontier) as tmp:
            joined.to_csv(tmp, index=False)
    if out_frontier_images is not None:
        from .frontier import plot_images

        plot_images(table, out_frontier_images, reference)
    return table


def join_frontier(frontier: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Each frontier row (every trained encoder) with the image metrics of each of its runs (decode-only
    and every img2img strength; none for the sweep's encoders, which are not reconstructed)."""
    if frontier.empty:
        return frontier
    metrics = [m for m in IMAGE_METRICS + RETRIEVAL if m in table]
    runs = table[["subject", "encoder", "mode", "conditioning", "semantic_encoder", "guidance", "strength",
                  "n_parameters_semantic", "metric_weights", *metrics]]
    return frontier.merge(runs, on=["subject", "encoder"], how="left").sort_values(
        ["subject", "n_parameters", "encoder", "mode", "strength"]).reset_index(drop=True)


METRIC_LABELS = {"latent_r": "latent r", "latent_two_way": "latent 2-way", "pixcorr": "PixCorr", "ssim": "SSIM",
                 "alexnet2": "AlexNet(2) 2-way", "alexnet5": "AlexNet(5) 2-way", "inception": "Inception 2-way",
                 "clip": "CLIP 2-way", "efficientnet": "EffNet-B1 distance ↓", "swav": "SwAV distance ↓",
                 "retrieval_image": "image retrieval (top-1)", "retrieval_brain": "brain retrieval (top-1)",
                 "category": "category readout"}


def plot_metrics(table: pd.DataFrame, out_png) -> None:
    """Each metric against img2img strength (decode-only at 0), one line per subject × encoder with
    the s.e.m. over images as bars, with the fixed prompt at the lowest guidance scale (the semantic
    conditionings are in the frontier of image quality and the table); reference rows dashed; the
    oracle's latent scores as ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img2img = table["mode"] == "img2img"
    first = table.loc[img2img, "guidance"].min()
    table = table[~img2img | ((table["conditioning"] == "none") & (table["guidance"] == first))]
    cols = [c for c in ["latent_r", "latent_two_way", *IMAGE_METRICS, *RETRIEVAL] if c in table and table[c].notna().any()]
    ncol = 4
    nrow = int(np.ceil(len(cols) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.9 * nrow + 0.8), squeeze=False)
    x_of = lambda t: np.where(t["mode"] == "decode", 0.0, t["strength"].astype(float))  # noqa: E731
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    encoders = [e for e in sorted(table["encoder"].unique()) if e not in REFERENCE_LABELS]
    styles = {e: dict(color=colours[i % len(colours)], ls="-", marker="o") for i, e in enumerate(encoders)}
    styles |= {"true-latent": dict(color="k", ls="--", marker="^"), "mean-latent": dict(color="grey", ls=":", marker="v")}
    subjects = sorted(table["subject"].unique())
    for ax, col in zip(axes.ravel(), cols):
        for (subject, encoder), g in table.groupby(["subject", "encoder"]):
            g = g.assign(x=x_of(g)).sort_values("x")
            label = REFERENCE_LABELS.get(encoder, encoder) + (f" {subject}" if len(subjects) > 1 else "")
            sem = g[f"{col}_sem"] if f"{col}_sem" in g else None
            ax.errorbar(g["x"], g[col], yerr=sem, label=label, ms=3, lw=1.2, capsize=2,
                        **styles.get(encoder, {}))
        oracle = ORACLE_COLUMNS.get(col)
        if oracle in table and table[oracle].notna().any():
            ax.axhline(table[oracle].iloc[0], color="tab:red", lw=0.8, ls="-.", label="oracle (best linear)")
        if col.endswith("two_way") or col in ("alexnet2", "alexnet5", "inception", "clip"):
            ax.axhline(0.5, color="grey", lw=0.6, ls=":")
        ax.set_title(METRIC_LABELS.get(col, col), fontsize=9)
        ax.set_xlabel("img2img strength (0 = decoded only)", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, lw=0.5)
    for ax in axes.ravel()[len(cols):]:
        ax.axis("off")
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=7, frameon=False)
    title = f"Every metric against img2img strength (fixed prompt, guidance {first:g}; bars: s.e.m. over test images)"
    stamps = not_a_result(table.get("weights", []), table.get("metric_weights", []))
    fig.suptitle("\n".join([*stamps, title]), fontsize=9, color="tab:red" if stamps else "k")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save_figure(fig, out_png, dpi=100)
