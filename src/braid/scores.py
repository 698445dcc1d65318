"""The statistics every stage scores with: row-wise Pearson r, 2-way identification, the training
standardiser and the latent metrics. Kept apart from :mod:`braid.evaluate` so that encoders (which
choose by them) rerun only when these change, not when an image metric does.

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

import numpy as np

from .common import BraidError


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


def two_way_scores(real: np.ndarray, pred: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Per prediction j: the fraction of comparable targets i with ``r[i, j] < r[j, j]`` (NaN where none).

    ``r[i, j]`` = corr(real_i, pred_j), as in the MindEye/Brain-Diffuser code; comparable are
    ``groups[i] != groups[j]`` when ``groups`` is given, else all i ≠ j. Differences within
    ``TIE`` are ties and not wins, so that rounding in the matrix product cannot turn an exact
    tie into a win. The mean over j is 2-way identification (chance 0.5).
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
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, wins / np.maximum(counts, 1), np.nan)


def two_way_identification(real: np.ndarray, pred: np.ndarray, groups: np.ndarray | None = None) -> float:
    """2-way identification: the mean of :func:`two_way_scores` over the predictions that have a comparison."""
    scores = two_way_scores(real, pred, groups)
    if np.isnan(scores).all():
        raise BraidError("2-way identification needs test samples from at least two different images")
    return float(np.nanmean(scores))


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
