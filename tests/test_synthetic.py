"""The synthetic NSD has NSD's formats, and carries the documented planted signal."""

from __future__ import annotations

import h5py
import nibabel as nib
import numpy as np
from scipy.io import loadmat

from braid import nsd, synthetic
from braid.evaluate import rowwise_pearson


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


def test_planted_signal_is_in_the_roi_only(mirror, tiny_model):
    """Repeats of an image agree inside the ROI (shared signal) and not outside it (noise only)."""
    root, meta = mirror
    design = nsd.ExpDesign.load(root / nsd.EXPDESIGN)
    table = design.trial_images(1, [1, 2], 60)
    roi = np.asarray(nib.load(root / nsd.roi_key(1, "nsdgeneral")).dataobj)
    brain = np.asarray(nib.load(root / nsd.brainmask_key(1)).dataobj) > 0
    vols = []
    for s in (1, 2):
        with h5py.File(root / nsd.betas_key(1, s), "r") as f:
            vols.append(f["betas"][:])
    vol = np.concatenate(vols).astype(np.float32) / 300
    inside = vol[:, roi.T == 1]
    outside = vol[:, (roi.T == 0) & brain.T]
    assert np.all(vol[:, ~brain.T] == 0)  # NSD zeroes voxels outside the brain mask
    first = table.index[table["repeat"] == 0]
    pairs = [(i, table.index[(table["nsd_id"] == table.loc[i, "nsd_id"]) & (table["repeat"] == 1)]) for i in first]
    pairs = [(i, j[0]) for i, j in pairs if len(j)]
    r_in = np.mean([np.corrcoef(inside[i], inside[j])[0, 1] for i, j in pairs])
    r_out = np.mean([np.corrcoef(outside[i], outside[j])[0, 1] for i, j in pairs])
    assert r_in > 0.5 and abs(r_out) < 0.1
    ceiling = meta["subjects"]["subj01"]
    assert 0.3 < ceiling["ceiling_latent_r"] <= 1.0 and ceiling["ceiling_two_way"] > 0.9
    assert ceiling["roi_voxels"] == inside.shape[1]


def test_oracle_decoder_is_exact_without_noise_and_shrinks_with_it():
    rng = np.random.default_rng(0)
    s = rng.standard_normal((200, 5))
    A = rng.standard_normal((8, 5))
    cov = np.cov(s, rowvar=False)
    assert np.allclose(synthetic.oracle_decode(s @ A.T, A, cov, 1e-6), s, atol=1e-4)
    noisy = s @ A.T + 3.0 * rng.standard_normal((200, 8))
    decoded = synthetic.oracle_decode(noisy, A, cov, 3.0)
    r = rowwise_pearson(decoded, s).mean()
    assert 0.3 < r < 0.99
    assert np.linalg.norm(decoded) < np.linalg.norm(s)  # posterior mean shrinks towards the prior mean
