"""The synthetic data's oracles: the best linear decoders, knowing the generative model, of the
latent (``braid_oracle/subjNN.npz``) and of the pooled text embedding (``subjNN-semantic.npz``)
from one row of ROI responses; :mod:`braid.synthetic` writes their ingredients and explains the
model. Apart from the generator, so that the jobs that score an oracle do not depend on the code
that makes the data (or on the text encoders it runs).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def oracle_decode(x: np.ndarray, prior_s: np.ndarray, prior_response: np.ndarray, noise_var: float) -> np.ndarray:
    """The linear MMSE estimate of ``s`` from responses ``x`` (rows), with moments from prior samples.

    ``prior_s`` (n, d) are samples of ``s``, ``prior_response`` (n, v) their noise-free responses
    and ``noise_var`` the variance of the noise in ``x``. ``Cov(x)`` = sample covariance of the
    responses + ``noise_var`` I is inverted through the Woodbury identity, so that only an
    (n, n) system is solved, however many voxels.
    """
    n = len(prior_s)
    mu_s, mu_r = prior_s.mean(0), prior_response.mean(0)
    S = (prior_s - mu_s) / np.sqrt(n - 1)
    R = (prior_response - mu_r) / np.sqrt(n - 1)  # Cov(x) = RᵀR + noise_var I; Cov(s, x) = SᵀR
    xc = (np.asarray(x, np.float64) - mu_r).T  # (v, rows)
    # (RᵀR + σ²I)⁻¹ xc = (xc − Rᵀ (σ²I + R Rᵀ)⁻¹ R xc) / σ²
    inner = np.linalg.solve(noise_var * np.eye(n) + R @ R.T, R @ xc)
    solved = (xc - R.T @ inner) / noise_var
    return (mu_s[:, None] + S.T @ (R @ solved)).T


def oracle_predictions(oracle_path, session_files: dict, roi_files: dict, roi_labels: dict, expdesign_path,
                       trials: pd.DataFrame, subject: int) -> np.ndarray:
    """The oracle's latents (unstandardised, as the encoders predict them) for the test rows of ``trials``.

    Responses are read from the same fetched betas files and ROI as the encoders' (voxels of the
    ROI outside ``nsdgeneral`` carry no signal: their noise-free response is 0). A row that
    averages ``k`` repeats is decoded from the mean of its trials with noise variance
    ``noise_sd² / k``.
    """
    from .betas import read_session
    from .nsd import ExpDesign, load_roi_mask

    with np.load(oracle_path) as f:
        o = {k: f[k] for k in f.files}
    mask_xyz, _, _ = load_roi_mask(roi_files, roi_labels)
    ijk = np.argwhere(mask_xyz.T)[:, ::-1]  # columns of read_session, as (i, j, k)
    where = {tuple(v): c for c, v in enumerate(o["voxel_ijk"].tolist())}
    cols = np.array([where.get(tuple(v), -1) for v in ijk.tolist()])
    response = np.zeros((len(o["prior_response"]), len(ijk)))
    response[:, cols >= 0] = o["prior_response"][:, cols[cols >= 0]]
    sessions = sorted(session_files)
    x = np.concatenate([read_session(session_files[k], mask_xyz.T) for k in sessions]) / float(o["gain"])
    single = ExpDesign.load(expdesign_path).trial_images(subject, sessions, len(x) // len(sessions))
    test = trials[trials["split"] == "test"]
    position = pd.Series(np.arange(len(single)), index=single["global_trial"].to_numpy())
    rows = []  # each test row's responses: one trial, or the mean of an image's trials (repeat -1)
    for r in test.itertuples():
        rows.append(x[position[r.global_trial]] if r.repeat >= 0 else x[single["nsd_id"].to_numpy() == r.nsd_id].mean(0))
    rows = np.asarray(rows)
    out = np.empty((len(test), o["prior_s"].shape[1]))
    repeats = test["n_repeats"].to_numpy()
    for k in np.unique(repeats):
        out[repeats == k] = oracle_decode(rows[repeats == k], o["prior_s"], response, float(o["noise_sd"]) ** 2 / k)
    return (out * o["z_std"] + o["z_mean"]).astype(np.float32)
