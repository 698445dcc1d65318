"""Score reconstructions with the field's metrics, and the predicted latents themselves.

Image metrics follow the MindEye reference code (``shared/reference/metrics.md`` §2, the "ME"
preset), which ran torchvision 0.15/0.16:

- resampling: reconstruction and stimulus are resized to 256², then to 425², with a *tensor*
  ``transforms.Resize`` (bilinear, half-pixel centres). In those torchvision versions a tensor
  resize does **not** antialias (the default changed in 0.17), so neither does BRAID: an
  antialiased downscale reads SSIM up to +0.14 high on noisy images. (MindEye stored its ground
  truth at 256²; BRAID brings the 425² stimulus there with the same resize.)
- PixCorr: Pearson r of the flattened RGB images (all three channels), per image, averaged.
- SSIM: 2-D SSIM of the ``rgb2gray`` images with Gaussian weights (σ 1.5), population
  covariance, data range 1 (scikit-image ≥ 0.20 semantics).

Latent metrics are computed per test row (a trial, or a repeat average with
``betas.trials: average*``):

- ``latent_mse``: mean squared error in the scaled latent space img2img consumes;
- ``latent_r``: Pearson r across latent elements between prediction and truth, both first
  standardised per latent element with the *training* split's mean and std (the encoder's own
  target statistics), averaged over test rows. Standardising makes predicting the average
  latent score 0, not the spurious ~0.9 that raw latents share through their mean image;
- ``latent_two_way``: 2-way identification (chance 0.5) on the same standardised latents,
  where a row is compared only with rows of *other* images (repeats share a ground truth).
  A comparison counts as a win only if the other image's correlation is lower by more than
  1e-10: exact ties (identical targets, a constant prediction) are not wins.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .common import BraidError, atomic_output

log = logging.getLogger(__name__)


def rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r between matching rows of ``a`` and ``b`` (flattened per row)."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    denom = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(1) / denom
    return np.where(denom > 0, r, 0.0)


TIE = 1e-10  # correlations closer than this are a tie in 2-way identification


def two_way_identification(real: np.ndarray, pred: np.ndarray, groups: np.ndarray | None = None) -> float:
    """Fraction of pairs in which a prediction correlates more with its own target than with another's.

    As in the MindEye/Brain-Diffuser code: ``r[i, j]`` = corr(real_i, pred_j); for each j count
    the i with ``r[i, j] < r[j, j]``, over the i that may be compared (``groups[i] != groups[j]``
    when ``groups`` is given, else all i ≠ j), and average. Chance is 0.5. Differences within
    ``TIE`` are ties and not wins, so that rounding in the matrix product cannot turn an exact
    tie into a win.
    """
    real = np.asarray(real, np.float64).reshape(len(real), -1)
    pred = np.asarray(pred, np.float64).reshape(len(pred), -1)
    n = len(real)
    if n < 2:
        raise BraidError("2-way identification needs at least two test samples")
    rz = real - real.mean(1, keepdims=True)
    pz = pred - pred.mean(1, keepdims=True)
    rz /= np.linalg.norm(rz, axis=1, keepdims=True) + 1e-12
    pz /= np.linalg.norm(pz, axis=1, keepdims=True) + 1e-12
    r = rz @ pz.T  # rows: ground truth, columns: predictions
    own = np.diag(r)
    groups = np.arange(n) if groups is None else np.asarray(groups)
    comparable = groups[:, None] != groups[None, :]
    wins = ((r < own[None, :] - TIE) & comparable).sum(0)
    counts = comparable.sum(0)
    valid = counts > 0
    if not valid.any():
        raise BraidError("2-way identification needs test samples from at least two different images")
    return float(np.mean(wins[valid] / counts[valid]))


def standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std (float32; a constant column gets std 1): the training statistics
    that z-score the encoders' inputs and targets, and that ``latent_r`` standardises with."""
    mean = x.mean(0)
    std = x.std(0)
    return mean.astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)


def latent_metrics(pred: np.ndarray, true: np.ndarray, mean: np.ndarray, std: np.ndarray, groups) -> dict:
    """MSE (latent scale), Pearson r and 2-way identification (standardised) over test trials."""
    ps = (pred - mean) / std
    ts = (true - mean) / std
    return {
        "latent_mse": float(np.mean((pred - true) ** 2)),
        "latent_r": float(np.mean(rowwise_pearson(ps, ts))),
        "latent_two_way": two_way_identification(ts, ps, groups),
        "n_test_trials": int(len(pred)),
    }


def _me_resize(images, size_hi: int = 425):
    """MindEye's path: to 256², then to 425², bilinear without antialiasing (torchvision 0.15/0.16 tensors)."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    x = torch.as_tensor(images, dtype=torch.float32)
    x = resize(x, [256, 256], interpolation=InterpolationMode.BILINEAR, antialias=False)
    return resize(x, [size_hi, size_hi], interpolation=InterpolationMode.BILINEAR, antialias=False)


def image_metrics(recons: np.ndarray, stimuli: np.ndarray) -> pd.DataFrame:
    """Per-image PixCorr and SSIM; ``recons`` float (n, 3, H, W) in [0, 1], ``stimuli`` uint8 (n, H, W, 3)."""
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    if len(recons) != len(stimuli):
        raise BraidError(f"{len(recons)} reconstructions for {len(stimuli)} stimuli")
    rec = _me_resize(recons).numpy()
    gt = _me_resize(np.moveaxis(stimuli, -1, 1).astype(np.float32) / 255.0).numpy()
    pixcorr = rowwise_pearson(rec, gt)
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
    return pd.DataFrame({"pixcorr": pixcorr, "ssim": np.asarray(ssim)})


def save_grid(stimuli: np.ndarray, recons: np.ndarray, labels, path: str | os.PathLike, title: str, n: int = 8) -> None:
    """PNG: stimuli on the top row, reconstructions below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(stimuli))
    fig, axes = plt.subplots(2, max(n, 1), figsize=(1.6 * max(n, 1), 3.6), squeeze=False)
    for k in range(n):
        axes[0, k].imshow(stimuli[k])
        axes[1, k].imshow(np.moveaxis(np.clip(recons[k], 0, 1), 0, -1))
        axes[0, k].set_title(str(labels[k]), fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].text(-0.1, 0.5, "seen", transform=axes[0, 0].transAxes, ha="right", va="center", rotation=90)
    axes[1, 0].text(-0.1, 0.5, "reconstructed", transform=axes[1, 0].transAxes, ha="right", va="center", rotation=90)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


ORACLE_COLUMNS = {"latent_r": "oracle_latent_r", "latent_two_way": "oracle_latent_two_way",
                  "latent_mse": "oracle_latent_mse"}


def evaluate_oracle(oracle_path, session_files: dict, roi_files: dict, roi_labels: dict, expdesign_path, trials_path,
                    latents_path, out_metrics, subject: str) -> pd.DataFrame:
    """The synthetic data's oracle (``braid.synthetic``) scored like an encoder, on the same test rows."""
    from .common import subject_number
    from .latents import LatentCache
    from .synthetic import oracle_predictions

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


def summarise(metric_files: list[str], out_csv: str | os.PathLike, out_png: str | os.PathLike,
              oracle_files: list[str] = ()) -> pd.DataFrame:
    """Concatenate per-run metrics, add the synthetic oracle's (``oracle_*``) where known, and plot them."""
    table = pd.concat([pd.read_csv(f) for f in metric_files], ignore_index=True)
    if oracle_files:
        oracle = pd.concat([pd.read_csv(f) for f in oracle_files], ignore_index=True)
        oracle = oracle[["subject", *ORACLE_COLUMNS]].rename(columns=ORACLE_COLUMNS)
        table = table.merge(oracle, on="subject", how="left")
    table = table.sort_values(["subject", "encoder", "strength"]).reset_index(drop=True)
    with atomic_output(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    _plot_summary(table, out_png)
    return table


def _plot_summary(table: pd.DataFrame, out_png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["latent_r", "latent_two_way", "pixcorr", "ssim"]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.2))
    labels = [f"{r.subject}\n{r.encoder}\ns={r.strength:g}" for r in table.itertuples()]
    for ax, col in zip(axes, cols):
        ax.bar(range(len(table)), table[col], color="tab:blue")
        if ORACLE_COLUMNS.get(col) in table:
            ax.scatter(range(len(table)), table[ORACLE_COLUMNS[col]], marker="_", s=400, color="k",
                       label="oracle (best linear)")
            ax.legend(fontsize=7, loc="lower right")
        if col == "latent_two_way":
            ax.axhline(0.5, ls=":", color="grey")
        ax.set_title(col)
        ax.set_xticks(range(len(table)), labels, fontsize=6)
    if "weights" in table and (table["weights"] != "pretrained").any():
        fig.suptitle("NOT A RESULT: runs with random model weights (a check of the workflow, not of reconstruction)",
                     fontsize=9, color="tab:red")
    fig.tight_layout()
    with atomic_output(out_png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def load_images(directory: str | os.PathLike, nsd_ids) -> np.ndarray:
    """Reconstructions ``<nsd_id>.png`` from ``directory`` as float (n, 3, H, W) in [0, 1]."""
    from PIL import Image

    out = []
    for i in nsd_ids:
        p = Path(directory) / f"{int(i)}.png"
        if not p.is_file():
            raise BraidError(f"{p}: reconstruction missing; rerun the reconstruct rule")
        out.append(np.moveaxis(np.asarray(Image.open(p).convert("RGB"), np.float32) / 255.0, -1, 0))
    return np.stack(out)


def evaluate_run(predictions, latents, stimuli_path, images, out_metrics, out_grid, subject: str, encoder: str,
                 strength: float) -> pd.DataFrame:
    """All metrics of one subject x encoder x strength into a one-row CSV, and the grid PNG."""
    from .encoder import load_predictions
    from .latents import LatentCache, read_stimuli

    preds = load_predictions(predictions)
    cache = LatentCache(latents)
    true = cache.get(preds["nsd_id"])
    row = {"subject": subject, "encoder": encoder, "strength": strength, "n_parameters": preds["n_parameters"],
           "weights": cache.weights}
    row |= latent_metrics(preds["pred"], true, preds["z_mean"], preds["z_std"], preds["nsd_id"])
    ids = np.unique(preds["nsd_id"])
    stimuli = read_stimuli(stimuli_path, ids)
    recons = load_images(images, ids)
    per_image = image_metrics(recons, stimuli)
    row |= {"pixcorr": float(per_image["pixcorr"].mean()), "ssim": float(per_image["ssim"].mean()), "n_test_images": int(ids.size)}
    table = pd.DataFrame([row])
    with atomic_output(out_metrics) as tmp:
        table.to_csv(tmp, index=False)
    title = f"{subject} · {encoder} · strength {strength:g} · latent r {row['latent_r']:.2f}"
    if cache.weights != "pretrained":
        title = f"NOT A RESULT: model weights {cache.weights.split()[0]}\n{title}"
    save_grid(stimuli, recons, ids, out_grid, title)
    log.info("%s", row)
    return table
