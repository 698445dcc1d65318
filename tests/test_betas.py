"""Masking, scaling, normalisation and splits of the betas stage."""

from __future__ import annotations

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import zarr
from scipy.io import loadmat

from braid import betas, nsd
from braid.common import BraidError


def run_build(root, out, subject=1, sessions=(1, 2), roi=None, split=None, normalisation="session", trials="single"):
    roi = roi or {"nsdgeneral": [1]}
    split = split or {"rule": "seed", "train": 0.7, "val": 0.15, "test": 0.15, "seed": 0}
    return betas.build(
        subject=subject,
        session_files={s: root / nsd.betas_key(subject, s) for s in sessions},
        roi_files={name: root / nsd.roi_key(subject, name) for name in roi},
        roi_labels=roi,
        expdesign_path=root / nsd.EXPDESIGN,
        out_zarr=out / "betas.zarr",
        out_trials=out / "trials.parquet",
        split=split,
        normalisation=normalisation,
        trials=trials,
    )


def peers_masking(root, subject, session, roi_name="nsdgeneral", labels=(1,)):
    """What the published pipelines do: load the whole session, then mask with the transposed ROI."""
    roi = np.asarray(nib.load(root / nsd.roi_key(subject, roi_name)).dataobj)
    with h5py.File(root / nsd.betas_key(subject, session), "r") as f:
        return f["betas"][:][:, np.isin(roi.T, labels)].astype(np.float32) / 300


def test_values_equal_load_then_mask(mirror, tmp_path):
    root, _ = mirror
    table = run_build(root, tmp_path, normalisation="none")
    store = zarr.open_group(tmp_path / "betas.zarr", mode="r")
    expected = np.concatenate([peers_masking(root, 1, s) for s in (1, 2)])
    np.testing.assert_array_equal(store["betas"][:], expected)
    assert len(table) == store["betas"].shape[0] == 120
    assert (table["n_repeats"] == 1).all() and (table["repeat"] >= 0).all()
    # voxel_ijk are the NIfTI coordinates of the columns
    roi = np.asarray(nib.load(root / nsd.roi_key(1, "nsdgeneral")).dataobj)
    ijk = store["voxel_ijk"][:]
    assert np.all(roi[ijk[:, 0], ijk[:, 1], ijk[:, 2]] == 1) and len(ijk) == (roi == 1).sum()
    assert store.attrs["subject"] == "subj01" and store.attrs["sessions"] == [1, 2]


def test_session_zscore(mirror, tmp_path):
    root, _ = mirror
    run_build(root, tmp_path)
    x = zarr.open_group(tmp_path / "betas.zarr", mode="r")["betas"][:]
    raw = peers_masking(root, 1, 2)
    np.testing.assert_allclose(x[60:], (raw - raw.mean(0)) / raw.std(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(x[:60].mean(0), 0, atol=1e-5)


def test_a_pilot_keeps_the_trials_of_its_images(mirror, tmp_path):
    """pilot_images: every trial of the N images shown most often, z-scored per session over those trials."""
    root, _ = mirror
    table = betas.build(
        subject=1, session_files={s: root / nsd.betas_key(1, s) for s in (1, 2)},
        roi_files={"nsdgeneral": root / nsd.roi_key(1, "nsdgeneral")}, roi_labels={"nsdgeneral": [1]},
        expdesign_path=root / nsd.EXPDESIGN, out_zarr=tmp_path / "betas.zarr", out_trials=tmp_path / "trials.parquet",
        split={"rule": "seed", "train": 0.7, "val": 0.15, "test": 0.15, "seed": 0}, pilot_images=10,
    )
    design = loadmat(root / nsd.EXPDESIGN)
    ids = design["subjectim"][0, design["masterordering"].ravel()[:120] - 1] - 1  # 60 trials per session
    counts = pd.Series(ids).value_counts()
    assert table["nsd_id"].nunique() == 10
    assert counts[table["nsd_id"].unique()].min() >= counts.drop(table["nsd_id"].unique()).max()
    trials = np.flatnonzero(np.isin(ids, table["nsd_id"].unique()))  # 0-based over both sessions
    assert table["global_trial"].tolist() == trials.tolist()
    x = zarr.open_group(tmp_path / "betas.zarr", mode="r")["betas"][:]
    assert x.shape[0] == len(table) == trials.size
    for session in (1, 2):
        rows = trials[(trials // 60) == session - 1] % 60
        raw = peers_masking(root, 1, session)[rows]
        np.testing.assert_allclose(x[(table["session"] == session).to_numpy()], (raw - raw.mean(0)) / raw.std(0),
                                   rtol=1e-4, atol=1e-4)


def test_split_never_shares_an_image(mirror, tmp_path):
    root, _ = mirror
    table = run_build(root, tmp_path)
    saved = pd.read_parquet(tmp_path / "trials.parquet")
    pd.testing.assert_frame_equal(saved, table.reset_index(drop=True), check_dtype=False)
    per_image = saved.groupby("nsd_id")["split"].nunique()
    assert per_image.max() == 1
    assert set(saved["split"]) == {"train", "val", "test"}
    again = run_build(root, tmp_path / "again")
    assert again["split"].tolist() == table["split"].tolist()  # deterministic


def test_split_rules():
    ids = np.repeat(np.arange(100), 3)
    s = betas.split_images(ids, "seed", {"train": 0.9, "val": 0.05, "test": 0.05}, seed=1)
    assert s.value_counts().to_dict() == {"train": 90, "val": 5, "test": 5}
    assert not s.equals(betas.split_images(ids, "seed", {"train": 0.9, "val": 0.05, "test": 0.05}, seed=2))
    shared = np.isin(ids, np.arange(10))
    s = betas.split_images(ids, "shared1000", {"val": 0.1}, seed=0, shared=shared)
    assert set(s[s == "test"].index) == set(range(10)) and (s == "val").sum() == 9
    # fractions of the images, never renormalised: 8:1:1 and 0.5/0.25/0.5 are refused
    for wrong in ({"train": 8, "val": 1, "test": 1}, {"train": 0.5, "val": 0.25, "test": 0.5}):
        with pytest.raises(BraidError, match="not 1"):
            betas.split_images(ids, "seed", wrong, seed=1)
    s = betas.split_images(ids, "seed", {"train": 0.5, "val": 0.25, "test": 0.25}, seed=1)
    assert s.value_counts().to_dict() == {"train": 50, "val": 25, "test": 25}
    with pytest.raises(BraidError, match="split 'test' is empty"):
        betas.split_images(np.arange(5), "seed", {"train": 0.79, "val": 0.2, "test": 0.01}, seed=0)


def test_union_of_roi_files_and_labels(mirror, tmp_path):
    root, _ = mirror
    run_build(root, tmp_path, roi={"prf-visualrois": [1, 2], "nsdgeneral": [1]}, normalisation="none")
    x = zarr.open_group(tmp_path / "betas.zarr", mode="r")["betas"]
    n_general = (np.asarray(nib.load(root / nsd.roi_key(1, "nsdgeneral")).dataobj) == 1).sum()
    assert x.shape[1] == n_general  # V1 lies inside nsdgeneral
    run_build(root, tmp_path / "v1", roi={"prf-visualrois": [1, 2]}, normalisation="none")
    v1 = zarr.open_group(tmp_path / "v1" / "betas.zarr", mode="r")["betas"]
    np.testing.assert_array_equal(v1[:], np.concatenate([peers_masking(root, 1, s, "prf-visualrois", (1, 2)) for s in (1, 2)]))
    store = zarr.open_group(tmp_path / "betas.zarr", mode="r")
    labels = store["voxel_labels"][:]
    assert store.attrs["roi_files"] == ["nsdgeneral", "prf-visualrois"]
    assert (labels[:, 0] == 1).all() and set(np.unique(labels[:, 1])) == set(range(0, 8))


def test_bad_inputs_name_the_file_and_leave_nothing(mirror, tmp_path):
    root, _ = mirror
    with pytest.raises(BraidError, match=r"labels \[9\].*nsdgeneral"):
        run_build(root, tmp_path, roi={"nsdgeneral": [9]})
    assert not (tmp_path / "betas.zarr").exists() and not (tmp_path / "trials.parquet").exists()
    # an ROI of another size than the betas
    small = tmp_path / "mirror"
    for key in (nsd.EXPDESIGN, nsd.betas_key(1, 1)):
        (small / key).parent.mkdir(parents=True, exist_ok=True)
        (small / key).write_bytes((root / key).read_bytes())
    roi_path = small / nsd.roi_key(1, "nsdgeneral")
    roi_path.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.int16), np.eye(4)), roi_path)
    with pytest.raises(BraidError, match="betas_session01.hdf5: betas volume"):
        run_build(small, tmp_path / "o", sessions=(1,))
    assert not (tmp_path / "o" / "betas.zarr").exists()
    # a truncated session file
    (small / nsd.betas_key(1, 1)).write_bytes((root / nsd.betas_key(1, 1)).read_bytes()[:5000])
    with pytest.raises(BraidError, match="betas_session01.hdf5"):
        run_build(small, tmp_path / "o", sessions=(1,), roi={"nsdgeneral": [1]})


@pytest.mark.parametrize("normalisation", ["session", "train", "none"])
def test_dead_and_constant_voxels_are_dropped(mirror, tmp_path, normalisation):
    """An all-zero voxel and a constant one carry nothing; every normalisation drops both, by (i, j, k)."""
    root, _ = mirror
    copy = tmp_path / "m"
    for key in (nsd.EXPDESIGN, nsd.roi_key(1, "nsdgeneral"), nsd.betas_key(1, 1)):
        (copy / key).parent.mkdir(parents=True, exist_ok=True)
        (copy / key).write_bytes((root / key).read_bytes())
    roi = np.asarray(nib.load(root / nsd.roi_key(1, "nsdgeneral")).dataobj)
    coords = np.argwhere(roi.T == 1)
    with h5py.File(copy / nsd.betas_key(1, 1), "r+") as f:
        vol = f["betas"][:]
        vol[(slice(None), *coords[0])] = 0  # a dead voxel
        vol[(slice(None), *coords[5])] = 600  # a constant one (2 % signal change on every trial)
        f["betas"][:] = vol
    run_build(copy, tmp_path / "o", sessions=(1,), normalisation=normalisation)
    store = zarr.open_group(tmp_path / "o" / "betas.zarr", mode="r")
    assert store["betas"].shape[1] == (roi == 1).sum() - 2 == store["voxel_ijk"].shape[0]
    assert store.attrs["dropped_voxels"] == 2 and np.isfinite(store["betas"][:]).all()
    assert sorted(map(tuple, store["dropped_voxel_ijk"][:].tolist())) == sorted([tuple(coords[0][::-1]),
                                                                                 tuple(coords[5][::-1])])


def quieter_copy(root, dest, factor):
    """A copy of the mirror whose stored betas are divided by ``factor`` (voxel sds below 1 included)."""
    import shutil

    shutil.copytree(root, dest)
    for s in (1, 2):
        with h5py.File(dest / nsd.betas_key(1, s), "r+") as f:
            f["betas"][...] = np.round(f["betas"][:] / factor).astype(np.int16)
    return dest


@pytest.mark.parametrize("factor", [1, 8])
def test_train_statistics_normalisation(mirror, tmp_path, factor):
    root = mirror[0] if factor == 1 else quieter_copy(mirror[0], tmp_path / "quiet", factor)
    table = run_build(root, tmp_path, normalisation="train")
    store = zarr.open_group(tmp_path / "betas.zarr", mode="r")
    raw = np.concatenate([peers_masking(root, 1, s) for s in (1, 2)])
    train = raw[table["split"].to_numpy() == "train"]
    mean, std = train.mean(0), train.std(0)
    if factor > 1:
        assert (std < 1).mean() > 0.5  # the quiet copy exercises standard deviations below 1
    np.testing.assert_allclose(store["train_mean"][:], mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(store["train_std"][:], std, rtol=1e-5)
    np.testing.assert_allclose(store["betas"][:], (raw - mean) / std, rtol=1e-4, atol=1e-4)
    assert store.attrs["normalisation"] == "train"


def test_session_statistics_are_stored(mirror, tmp_path):
    root, _ = mirror
    run_build(root, tmp_path)
    store = zarr.open_group(tmp_path / "betas.zarr", mode="r")
    for k, s in enumerate((1, 2)):
        raw = peers_masking(root, 1, s)
        np.testing.assert_allclose(store["session_mean"][k], raw.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(store["session_std"][k], raw.std(0), rtol=1e-5)


def test_repeats_averaged_per_image(mirror, tmp_path):
    root, _ = mirror
    single = run_build(root, tmp_path / "single")
    x = zarr.open_group(tmp_path / "single" / "betas.zarr", mode="r")["betas"][:]
    avg = run_build(root, tmp_path / "avg", trials="average")
    y = zarr.open_group(tmp_path / "avg" / "betas.zarr", mode="r")["betas"][:]
    assert avg["nsd_id"].is_unique and len(avg) == single["nsd_id"].nunique() == len(y)
    assert avg["global_trial"].is_monotonic_increasing
    for row in avg.sample(5, random_state=0).itertuples():
        rows = single.index[single["nsd_id"] == row.nsd_id]
        assert row.n_repeats == len(rows) and row.repeat == -1
        np.testing.assert_allclose(y[row.Index], x[rows].mean(0), rtol=1e-5, atol=1e-5)
    # the split of an image is the same in both modes
    assert dict(zip(avg["nsd_id"], avg["split"])) == dict(zip(single["nsd_id"], single["split"]))
    # average_test: test images averaged, train/val trials untouched
    mixed = run_build(root, tmp_path / "mixed", trials="average_test")
    z = zarr.open_group(tmp_path / "mixed" / "betas.zarr", mode="r")["betas"][:]
    test = mixed[mixed["split"] == "test"]
    assert test["nsd_id"].is_unique and (test["repeat"] == -1).all()
    assert len(mixed) == (single["split"] != "test").sum() + single.loc[single["split"] == "test", "nsd_id"].nunique()
    kept = mixed[mixed["split"] != "test"]
    np.testing.assert_array_equal(z[kept.index], x[single.index[single["split"] != "test"]])
    for row in test.itertuples():
        np.testing.assert_allclose(z[row.Index], x[single.index[single["nsd_id"] == row.nsd_id]].mean(0), rtol=1e-5, atol=1e-5)


def test_averaging_uses_the_train_normalised_trials(mirror, tmp_path):
    single = run_build(root := mirror[0], tmp_path / "single", normalisation="train")
    x = zarr.open_group(tmp_path / "single" / "betas.zarr", mode="r")["betas"][:]
    avg = run_build(root, tmp_path / "avg", normalisation="train", trials="average")
    y = zarr.open_group(tmp_path / "avg" / "betas.zarr", mode="r")["betas"][:]
    assert list(avg.columns) == list(single.columns) == betas.TABLE_COLUMNS
    assert list(pd.read_parquet(tmp_path / "avg" / "trials.parquet").columns) == betas.TABLE_COLUMNS
    for row in avg.itertuples():
        np.testing.assert_allclose(y[row.Index], x[(single["nsd_id"] == row.nsd_id).to_numpy()].mean(0),
                                   rtol=1e-4, atol=1e-4)


def test_hemisphere_files_unite_to_the_whole(mirror, tmp_path):
    root, _ = mirror
    run_build(root, tmp_path / "both", roi={"lh.nsdgeneral": [1], "rh.nsdgeneral": [1]}, normalisation="none")
    run_build(root, tmp_path / "whole", normalisation="none")
    both = zarr.open_group(tmp_path / "both" / "betas.zarr", mode="r")
    whole = zarr.open_group(tmp_path / "whole" / "betas.zarr", mode="r")
    np.testing.assert_array_equal(both["betas"][:], whole["betas"][:])
    np.testing.assert_array_equal(both["voxel_ijk"][:], whole["voxel_ijk"][:])


def test_other_layouts_fall_back_to_plane_reads(mirror, tmp_path, caplog):
    """A compressed or contiguous file (not NSD's layout) gives the same values, read another way."""
    root, _ = mirror
    roi = np.asarray(nib.load(root / nsd.roi_key(1, "nsdgeneral")).dataobj) == 1
    with h5py.File(root / nsd.betas_key(1, 1), "r") as f:
        vol = f["betas"][:]
    for name, kwargs in (("gzip.hdf5", dict(chunks=(60, 2, 2, 2), compression="gzip")), ("contig.hdf5", {})):
        with h5py.File(tmp_path / name, "w") as f:
            f.create_dataset("betas", data=vol, **kwargs)
        with caplog.at_level("INFO", logger="braid.betas"):
            got = betas.read_session(tmp_path / name, roi.T)
        np.testing.assert_array_equal(got, peers_masking(root, 1, 1))
        assert "reading Z-planes" in caplog.text
        caplog.clear()
    with caplog.at_level("INFO", logger="braid.betas"):
        betas.read_session(root / nsd.betas_key(1, 1), roi.T)  # NSD's own layout: voxel chunks, no planes
    assert "reading Z-planes" not in caplog.text


def test_memory_does_not_grow_with_sessions(tmp_path):
    """Sessions are streamed: four sessions peak at about what two do (two already pay the fixed cost
    of reads and writes that span two chunks)."""
    import tracemalloc

    from scipy.io import savemat

    from braid.synthetic import write_betas

    rng = np.random.default_rng(0)
    dims, per_session, n_sessions = (20, 20, 16), 300, 4
    roi = np.zeros(dims, np.int16)
    roi[2:18, 2:18, 4:12] = 1  # 2,048 voxels
    root = tmp_path / "m"
    (root / nsd.roi_key(1, "nsdgeneral")).parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(roi, np.eye(4)), root / nsd.roi_key(1, "nsdgeneral"))
    subjectim = np.zeros((8, 600), np.int32)
    subjectim[0] = np.arange(1, 601)
    (root / nsd.EXPDESIGN).parent.mkdir(parents=True)
    order = rng.permutation(np.repeat(np.arange(1, 601), 2))[: per_session * n_sessions]
    savemat(root / nsd.EXPDESIGN, {"masterordering": order[None], "subjectim": subjectim, "sharedix": np.arange(1, 11)[None]})
    brain = np.ones(dims[::-1], bool)
    for k in range(1, n_sessions + 1):
        write_betas(root / nsd.betas_key(1, k), rng.integers(-900, 900, (per_session, brain.sum()), dtype=np.int16), brain)
    run_build(root, tmp_path / "warm", sessions=(1,))  # imports and caches outside the measurement
    peaks = []
    for sessions in ((1, 2), (1, 2, 3, 4)):
        tracemalloc.start()
        run_build(root, tmp_path / str(len(sessions)), sessions=sessions)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.5 * peaks[0], peaks  # held whole, four sessions would peak at twice what two do
