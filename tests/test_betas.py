"""Masking, scaling, normalisation and splits of the betas stage."""

from __future__ import annotations

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import zarr

from braid import betas, nsd
from braid.common import BraidError


def run_build(root, out, subject=1, sessions=(1, 2), roi=None, split=None, normalisation="session"):
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
    with pytest.raises(BraidError, match="split 'test' is empty"):
        betas.split_images(np.arange(5), "seed", {"train": 1, "val": 0.2, "test": 0.01}, seed=0)


def test_union_of_roi_files_and_labels(mirror, tmp_path):
    root, _ = mirror
    run_build(root, tmp_path, roi={"prf-visualrois": [1, 2], "nsdgeneral": [1]}, normalisation="none")
    x = zarr.open_group(tmp_path / "betas.zarr", mode="r")["betas"]
    n_general = (np.asarray(nib.load(root / nsd.roi_key(1, "nsdgeneral")).dataobj) == 1).sum()
    assert x.shape[1] == n_general  # V1 lies inside nsdgeneral
    run_build(root, tmp_path / "v1", roi={"prf-visualrois": [1, 2]}, normalisation="none")
    v1 = zarr.open_group(tmp_path / "v1" / "betas.zarr", mode="r")["betas"]
    np.testing.assert_array_equal(v1[:], np.concatenate([peers_masking(root, 1, s, "prf-visualrois", (1, 2)) for s in (1, 2)]))


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


def test_nan_and_empty_voxels_are_dropped(mirror, tmp_path):
    root, _ = mirror
    copy = tmp_path / "m"
    for key in (nsd.EXPDESIGN, nsd.roi_key(1, "nsdgeneral"), nsd.betas_key(1, 1)):
        (copy / key).parent.mkdir(parents=True, exist_ok=True)
        (copy / key).write_bytes((root / key).read_bytes())
    roi = np.asarray(nib.load(root / nsd.roi_key(1, "nsdgeneral")).dataobj)
    with h5py.File(copy / nsd.betas_key(1, 1), "r+") as f:
        vol = f["betas"][:]
        z, y, x = np.argwhere(roi.T == 1)[0]
        vol[:, z, y, x] = 0  # a dead voxel
        f["betas"][:] = vol
    run_build(copy, tmp_path / "o", sessions=(1,))
    store = zarr.open_group(tmp_path / "o" / "betas.zarr", mode="r")
    assert store["betas"].shape[1] == (roi == 1).sum() - 1 == store["voxel_ijk"].shape[0]
    assert store.attrs["dropped_voxels"] == 1 and np.isfinite(store["betas"][:]).all()
