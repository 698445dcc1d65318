"""The synthetic NSD has NSD's formats (HDF5 and NIfTI betas, CSV and pickled stim info), carries the
documented planted signal, and its oracle is the linear MMSE decoder with a prior from fresh images."""

from __future__ import annotations

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy.io import loadmat

from braid import nsd, oracle, synthetic


def test_every_key_is_written(mirror, synthetic_cfg):
    root, _ = mirror
    for key in synthetic.keys(synthetic_cfg):
        assert (root / key).is_file(), key
    assert (root / synthetic.META).is_file()


def test_formats_match_nsd(mirror, synthetic_cfg):
    root, _ = mirror
    X, Y, Z = synthetic_cfg["volume"]
    with h5py.File(root / nsd.betas_key(1, 1), "r") as f:
        b = f["betas"]
        assert b.dtype == np.int16 and b.shape == (60, Z, Y, X)
        assert b.chunks == (60, 1, 1, 1) and b.compression is None
    with h5py.File(root / nsd.STIMULI, "r") as f:
        brick = f["imgBrick"]
        assert brick.dtype == np.uint8 and brick.shape[1:] == (425, 425, 3)
        assert len({brick[i].tobytes() for i in range(brick.shape[0])}) == brick.shape[0]  # all distinct
    roi = np.asarray(nib.load(root / nsd.roi_key(1, "nsdgeneral")).dataobj)
    assert roi.shape == (X, Y, Z) and set(np.unique(roi)) == {-1, 0, 1}
    prf = np.asarray(nib.load(root / nsd.roi_key(1, "prf-visualrois")).dataobj)
    assert set(np.unique(prf[prf > 0])) == set(range(1, 8)) and np.all(roi[prf > 0] == 1)
    mat = loadmat(root / nsd.EXPDESIGN)
    assert mat["masterordering"].shape == (1, 120) and mat["masterordering"].min() == 1
    assert mat["subjectim"].shape == (8, 40) and mat["subjectim"][2].max() == 0  # subject 3 not generated
    assert mat["sharedix"].min() >= 1 and np.all(np.diff(mat["sharedix"].ravel()) > 0)
    assert np.bincount(mat["masterordering"].ravel()).max() <= 3


def test_planted_signal_is_in_the_rois_only(mirror, tiny_model):
    """Repeats of an image agree inside nsdgeneral and the ventral stream (streams label 5: the
    semantic signal) and not elsewhere in the brain (noise only)."""
    root, meta = mirror
    design = nsd.ExpDesign.load(root / nsd.EXPDESIGN)
    table = design.trial_images(1, [1, 2], 60)
    roi = np.asarray(nib.load(root / nsd.roi_key(1, "nsdgeneral")).dataobj)
    ventral = np.asarray(nib.load(root / nsd.roi_key(1, "streams")).dataobj) == 5
    brain = np.asarray(nib.load(root / nsd.brainmask_key(1)).dataobj) > 0
    assert ventral.sum() >= 20 and not (ventral & (roi == 1)).any()
    vols = []
    for s in (1, 2):
        with h5py.File(root / nsd.betas_key(1, s), "r") as f:
            vols.append(f["betas"][:])
    vol = np.concatenate(vols).astype(np.float32) / 300
    inside = vol[:, roi.T == 1]
    semantic = vol[:, ventral.T]
    outside = vol[:, (roi.T == 0) & ~ventral.T & brain.T]
    assert np.all(vol[:, ~brain.T] == 0)  # NSD zeroes voxels outside the brain mask
    first = table.index[table["repeat"] == 0]
    pairs = [(i, table.index[(table["nsd_id"] == table.loc[i, "nsd_id"]) & (table["repeat"] == 1)]) for i in first]
    pairs = [(i, j[0]) for i, j in pairs if len(j)]
    r_in = np.mean([np.corrcoef(inside[i], inside[j])[0, 1] for i, j in pairs])
    r_out = np.mean([np.corrcoef(outside[i], outside[j])[0, 1] for i, j in pairs])
    r_sem = np.mean([np.corrcoef(semantic[i], semantic[j])[0, 1] for i, j in pairs])
    assert r_in > 0.5 and r_sem > 0.3 and abs(r_out) < 0.1
    assert meta["subjects"]["subj01"]["roi_voxels"] == inside.shape[1]


def test_nifti_betas_and_pickled_stim_info_equal_the_primary_files(mirror):
    """What peer NSD clients read: betas_sessionNN.nii.gz (X, Y, Z, trials) and nsd_stim_info_merged.pkl."""
    root, _ = mirror
    key = nsd.betas_key(1, 2)
    img = nib.load(root / key.replace(".hdf5", ".nii.gz"))
    nii = np.asarray(img.dataobj)
    assert nii.dtype == np.int16 and img.header.get_data_dtype() == np.int16
    with h5py.File(root / key, "r") as f:
        h5 = f["betas"][:]
    np.testing.assert_array_equal(nii, h5.transpose(3, 2, 1, 0))
    roi = np.asarray(nib.load(root / nsd.roi_key(1, "nsdgeneral")).dataobj)
    np.testing.assert_array_equal(np.sort(nii[roi > 0].ravel()), np.sort(h5[:, roi.T > 0].ravel()))  # BD's masking
    np.testing.assert_allclose(img.affine, nib.load(root / nsd.roi_key(1, "nsdgeneral")).affine)
    pkl = pd.read_pickle(root / nsd.STIM_INFO_PKL)
    pd.testing.assert_frame_equal(pkl, nsd.load_stim_info(root / nsd.STIM_INFO), check_dtype=False)


def test_oracle_decode_equals_the_closed_form():
    """Linear responses: Woodbury form == μ + C Aᵀ (A C Aᵀ + σ² I)⁻¹ (x − A μ), C the samples' covariance."""
    rng = np.random.default_rng(0)
    s = rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6)) + 0.5
    A = rng.standard_normal((40, 6))
    x = rng.standard_normal((5, 40))
    mu, C = s.mean(0), np.cov(s, rowvar=False)
    expected = mu + (C @ A.T @ np.linalg.solve(A @ C @ A.T + 2.0 * np.eye(40), (x - A @ mu).T)).T
    np.testing.assert_allclose(oracle.oracle_decode(x, s, s @ A.T, 2.0), expected, rtol=1e-8, atol=1e-10)
    # no noise: exact; more noise: shrinks towards the prior mean
    clean = s[:5] @ A.T
    np.testing.assert_allclose(oracle.oracle_decode(clean, s, s @ A.T, 1e-4), s[:5], atol=1e-2)
    far = oracle.oracle_decode(clean, s, s @ A.T, 1e4)
    assert np.abs(far - mu).max() < 0.1 * np.abs(s[:5] - mu).max()


def test_oracle_prior_is_fresh_images_not_the_stimuli(mirror, synthetic_cfg, tiny_model):
    from braid.latents import encode_images, read_stimuli
    from braid.models import load_vae

    root, _ = mirror
    with np.load(root / synthetic.oracle_key(1)) as f:
        o = {k: f[k] for k in f.files}
    n_roi = (np.asarray(nib.load(root / nsd.roi_key(1, "nsdgeneral")).dataobj) == 1).sum()
    assert o["prior_s"].shape == (synthetic_cfg["prior_images"], 256) and o["prior_response"].shape[1] == n_roi
    design = nsd.ExpDesign.load(root / nsd.EXPDESIGN)
    ids = np.arange(design.subjectim.max())
    z = encode_images(read_stimuli(root / nsd.STIMULI, ids), load_vae(tiny_model), 64).reshape(len(ids), -1)
    s_data = (z - o["z_mean"]) / o["z_std"]
    np.testing.assert_allclose(s_data.mean(0), 0, atol=1e-5)  # s is standardised over the data's stimuli
    gap = np.min(np.linalg.norm(o["prior_s"][:, None] - s_data[None], axis=-1))
    assert gap > 1.0  # no prior sample is one of the data's images


@pytest.fixture(scope="module")
def stage(mirror, tiny_model, tmp_path_factory):
    from braid import betas
    from braid.latents import cache_latents

    root, _ = mirror
    out = tmp_path_factory.mktemp("oracle")
    sessions = {s: root / nsd.betas_key(1, s) for s in (1, 2)}
    rois = {"nsdgeneral": root / nsd.roi_key(1, "nsdgeneral")}
    for mode in ("single", "average_test"):
        betas.build(1, sessions, rois, {"nsdgeneral": [1]}, root / nsd.EXPDESIGN, out / f"{mode}.zarr",
                    out / f"{mode}.parquet", {"rule": "seed", "train": 0.6, "val": 0.1, "test": 0.3, "seed": 0},
                    trials=mode)
    ids = pd.read_parquet(out / "single.parquet")["nsd_id"].unique()
    cache_latents(root / nsd.STIMULI, tiny_model, ids, out / "latents.zarr", image_size=64)
    return root, out, sessions, rois


def test_oracle_beats_ridge_on_the_same_test_rows_and_gains_from_averaging(stage):
    """Scored with the encoders' metric on the test rows; better than a ridge fit on the training rows
    (which has to learn what the oracle knows), and better again on repeat-averaged test rows."""
    from braid.evaluate import evaluate_oracle, latent_metrics, standardiser
    from braid.latents import LatentCache

    root, out, sessions, rois = stage
    scores = {}
    for mode in ("single", "average_test"):
        scores[mode] = evaluate_oracle(root / synthetic.oracle_key(1), sessions, rois, {"nsdgeneral": [1]},
                                       root / nsd.EXPDESIGN, out / f"{mode}.parquet", out / "latents.zarr",
                                       out / f"{mode}.csv", "subj01").iloc[0]
    trials = pd.read_parquet(out / "single.parquet")
    x = zarr_betas(out / "single.zarr")
    cache = LatentCache(out / "latents.zarr")
    tr, te = (trials["split"] == "train").to_numpy(), (trials["split"] == "test").to_numpy()
    z = cache.get(trials["nsd_id"].to_numpy()).reshape(len(trials), -1)
    mean, std = standardiser(z[tr])
    xm, xs = x[tr].mean(0), x[tr].std(0)
    X, Z = (x - xm) / xs, (z - mean) / std
    W = np.linalg.solve(X[tr].T @ X[tr] + 100 * np.eye(X.shape[1]), X[tr].T @ Z[tr])
    ridge = latent_metrics((X[te] @ W) * std + mean, z[te], mean, std, trials["nsd_id"].to_numpy()[te])
    assert scores["single"]["n_test_trials"] == te.sum()
    assert list(pd.read_csv(out / "single.csv").columns) == ["subject", "latent_mse", "latent_r", "latent_two_way",
                                                             "n_test_trials"]
    # the reported r is the oracle's predictions scored with numpy, standardised by the training rows
    pred = oracle.oracle_predictions(root / synthetic.oracle_key(1), sessions, rois, {"nsdgeneral": [1]},
                                        root / nsd.EXPDESIGN, trials, 1)
    ps, ts = (pred - z[tr].mean(0)) / z[tr].std(0), (z[te] - z[tr].mean(0)) / z[tr].std(0)
    r = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(ps, ts)])
    assert scores["single"]["latent_r"] == pytest.approx(r, abs=1e-5)
    assert 0.1 < ridge["latent_r"] < scores["single"]["latent_r"] < scores["average_test"]["latent_r"] <= 1.0
    assert scores["single"]["latent_mse"] < ridge["latent_mse"]


def zarr_betas(path):
    import zarr

    return np.asarray(zarr.open_group(path, mode="r")["betas"][:], np.float64)


def test_a_design_longer_than_the_betas_written(synthetic_cfg):
    """design_sessions: NSD's design spans 40 sessions while a rehearsal writes betas for a few;
    the design keeps its length, each image at most three times, and only the written sessions' keys."""
    import numpy as np

    from braid import nsd
    from braid.synthetic import keys, make_design

    cfg = {**synthetic_cfg, "sessions": 1, "design_sessions": 3, "images_per_subject": 60}
    design = make_design(cfg, np.random.default_rng(0))
    order = design["masterordering"].ravel()
    assert order.size == 3 * cfg["trials_per_session"]
    assert np.bincount(order).max() <= 3 and order.min() >= 1 and order.max() <= 60
    betas = [k for k in keys(cfg) if k.endswith(".hdf5") and "betas_session" in k]
    assert betas == [nsd.betas_key(s, 1) for s in cfg["subjects"]]
    assert make_design({**cfg, "design_sessions": None}, np.random.default_rng(0))["masterordering"].size == \
        cfg["trials_per_session"]


def test_semantic_gain_scales_the_ventral_signal_only(mirror, synthetic_cfg, tiny_model, tmp_path):
    """``semantic_gain`` multiplies the ventral stream's semantic signal, and nothing else: with the
    same seed, gain 0 leaves the noise alone there, gain 0.5 half the signal of gain 1 (the default
    mirror's); nsdgeneral's betas stay as they were; the noise ceiling and the semantic oracle's
    prior responses follow the gain."""
    root1, _ = mirror
    roots = {1.0: root1}
    for g in (0.0, 0.5):
        roots[g] = tmp_path / f"gain{g}"
        synthetic.generate({**synthetic_cfg, "semantic_gain": g}, tiny_model, roots[g], image_size=64)
    roi = np.asarray(nib.load(root1 / nsd.roi_key(1, "nsdgeneral")).dataobj).T == 1
    ventral = np.asarray(nib.load(root1 / nsd.roi_key(1, "streams")).dataobj).T == 5
    betas = {}
    for g, root in roots.items():
        with h5py.File(root / nsd.betas_key(1, 1), "r") as f:
            betas[g] = f["betas"][:].astype(np.float64) / 300 / synthetic_cfg["gain"]
    # one int16 step of slack: the default mirror may have been written at another torch thread count
    np.testing.assert_allclose(betas[0.5][:, roi], betas[1.0][:, roi], rtol=0, atol=1.01 / 600)
    signal = betas[1.0][:, ventral] - betas[0.0][:, ventral]
    assert signal.std() > 0.5  # unit variance, less what the int16 rounding takes
    np.testing.assert_allclose(betas[0.5][:, ventral] - betas[0.0][:, ventral], 0.5 * signal, atol=2 / 600)
    ncsnr = np.asarray(nib.load(roots[0.5] / nsd.ncsnr_key(1, "func1pt8mm", "betas_fithrf_GLMdenoise_RR")).dataobj).T
    noise = synthetic_cfg["noise_sd"]
    assert np.allclose(ncsnr[roi], 1 / noise) and np.allclose(ncsnr[ventral], 0.5 / noise)
    prior = {g: np.load(roots[g] / synthetic.oracle_key(1, "semantic"))["prior_response"] for g in (0.5, 1.0)}
    np.testing.assert_allclose(prior[0.5], 0.5 * prior[1.0], rtol=1e-4, atol=1e-6)
