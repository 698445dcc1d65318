"""NSD single-trial betas -> ROI-masked, normalised Zarr stores and a trial table per subject.

Output (per subject)
  ``betas.zarr``: array ``betas`` (trials x voxels, float32, percent signal change / z-scored),
  array ``voxel_ijk`` (voxels x 3, the NIfTI (i, j, k) of each column), attributes saying
  subject, ROI files and labels, sessions, normalisation and split rule.
  ``trials.parquet``: one row per stored trial, in the store's row order: session and trial
  (1-based, NSD's numbering), global_trial (0-based), nsd_id (0-based), repeat (0 = first
  presentation), shared1000, split (train/val/test).

Conventions: HDF5 betas are (trials, Z, Y, X) through h5py and NIfTI ROIs are (X, Y, Z), so the
mask is transposed (``roi.T``); values are int16 x 300 and are divided by 300.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .common import BraidError, atomic_output, subject_label
from .nsd import ExpDesign

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def load_roi_mask(roi_files: dict[str, str | os.PathLike], labels: dict[str, list[int]]):
    """Union of ``labels`` over ROI files -> boolean (X, Y, Z) mask, the affine, and per-voxel labels."""
    import nibabel as nib

    mask = None
    affine = None
    for name, path in roi_files.items():
        try:
            img = nib.load(str(path))
            vol = np.asarray(img.dataobj).astype(np.int64)
        except Exception as err:
            raise BraidError(f"{path}: cannot read ROI '{name}' as NIfTI ({err}); delete it and fetch again") from err
        want = [int(v) for v in labels[name]]
        present = set(np.unique(vol).tolist())
        absent = [v for v in want if v not in present]
        if absent:
            raise BraidError(
                f"{path}: labels {absent} (config roi '{name}') are not in this ROI file, which has "
                f"labels {sorted(v for v in present if v > 0)}"
            )
        this = np.isin(vol, want)
        if mask is None:
            mask, affine = this, img.affine
        elif this.shape != mask.shape:
            raise BraidError(f"{path}: ROI dims {this.shape} differ from the other ROI files' {mask.shape}")
        else:
            mask |= this
    return mask, affine


def split_images(nsd_ids: np.ndarray, rule: str, fractions: dict, seed: int, shared: np.ndarray | None = None) -> pd.Series:
    """Assign every distinct image to one split; deterministic from ``seed``.

    ``seed``: train/val/test fractions over images (grouped: all repeats of an image share a split).
    ``shared1000``: test = the shared images; val = ``fractions['val']`` of the others.
    """
    ids = np.unique(nsd_ids)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(ids)
    out = pd.Series("train", index=ids, name="split")
    if rule == "seed":
        total = sum(fractions[k] for k in SPLITS)
        n_test = int(round(fractions["test"] / total * ids.size))
        n_val = int(round(fractions["val"] / total * ids.size))
        out[perm[:n_test]] = "test"
        out[perm[n_test : n_test + n_val]] = "val"
    elif rule == "shared1000":
        if shared is None:
            raise BraidError("split rule 'shared1000' needs the shared-image flags")
        is_shared = pd.Series(shared, index=nsd_ids).groupby(level=0).first().reindex(ids).to_numpy()
        out[ids[is_shared]] = "test"
        rest = perm[~np.isin(perm, ids[is_shared])]
        out[rest[: int(round(fractions["val"] * rest.size))]] = "val"
    else:
        raise BraidError(f"split rule {rule!r} is not one of 'seed', 'shared1000' (config split.rule)")
    for name in SPLITS:
        if not (out == name).any():
            raise BraidError(f"split '{name}' is empty with {ids.size} images; change config split")
    return out


def build(
    subject: int,
    session_files: dict[int, str | os.PathLike],
    roi_files: dict[str, str | os.PathLike],
    roi_labels: dict[str, list[int]],
    expdesign_path: str | os.PathLike,
    out_zarr: str | os.PathLike,
    out_trials: str | os.PathLike,
    split: dict,
    normalisation: str = "session",
    dtype: str = "float32",
) -> pd.DataFrame:
    """Mask, scale and normalise the betas of ``session_files`` into ``out_zarr``; write ``out_trials``."""
    import h5py
    import zarr
    from tqdm import tqdm

    if normalisation not in ("session", "none"):
        raise BraidError(f"normalisation {normalisation!r} is not one of 'session', 'none' (config betas.normalisation)")
    mask_xyz, affine = load_roi_mask(roi_files, roi_labels)
    mask_zyx = mask_xyz.T
    n_vox = int(mask_zyx.sum())
    if n_vox == 0:
        raise BraidError(f"the ROI selection {roi_labels} has no voxels")
    sessions = sorted(session_files)
    try:
        with h5py.File(session_files[sessions[0]], "r") as f:
            trials_per_session = f["betas"].shape[0]
    except (OSError, KeyError) as err:
        raise BraidError(f"{session_files[sessions[0]]}: cannot read betas ({err}); delete the file and fetch it again") from err
    design = ExpDesign.load(expdesign_path)
    table = design.trial_images(subject, sessions, trials_per_session)
    table["split"] = split_images(
        table["nsd_id"].to_numpy(), split["rule"], split, split["seed"], table["shared1000"].to_numpy()
    ).reindex(table["nsd_id"]).to_numpy()

    with atomic_output(out_zarr) as tmp:
        root = zarr.open_group(tmp, mode="w")
        store = root.create_array(
            "betas", shape=(len(table), n_vox), chunks=(min(256, len(table)), n_vox), dtype=dtype
        )
        bad = np.zeros(n_vox, bool)
        for k, session in enumerate(tqdm(sessions, desc=f"{subject_label(subject)} sessions", mininterval=2)):
            path = session_files[session]
            try:
                with h5py.File(path, "r") as f:
                    ds = f["betas"]
                    if ds.shape[1:] != mask_zyx.shape:
                        raise BraidError(
                            f"{path}: betas volume (Z, Y, X) = {ds.shape[1:]} but the ROI is {mask_zyx.shape[::-1]} "
                            f"as (X, Y, Z); are the ROI and betas of the same subject and resolution?"
                        )
                    if ds.shape[0] != trials_per_session:
                        raise BraidError(f"{path}: {ds.shape[0]} trials, expected {trials_per_session}")
                    x = ds[:][:, mask_zyx].astype(np.float32) / 300.0
            except (OSError, KeyError) as err:
                raise BraidError(f"{path}: cannot read betas ({err}); delete the file and fetch it again") from err
            finite = np.isfinite(x)
            bad |= ~finite.all(0) | (np.abs(x).max(0) == 0)
            if normalisation == "session":
                mu = np.nanmean(x, 0)
                sd = np.nanstd(x, 0)
                bad |= sd == 0
                x = (x - mu) / np.where(sd > 0, sd, 1.0)
            store[k * trials_per_session : (k + 1) * trials_per_session] = np.nan_to_num(x).astype(dtype)
        if bad.any():
            # drop voxels that are empty or non-finite in any session, and say where they were
            keep = ~bad
            log.warning("dropping %d of %d ROI voxels that are all-zero, constant or NaN in some session", bad.sum(), n_vox)
            data = store[:][:, keep]
            del root["betas"]
            root.create_array("betas", data=data, chunks=(min(256, len(table)), int(keep.sum())))
        voxel_ijk = _zyx_columns_to_ijk(mask_zyx)
        if bad.any():
            voxel_ijk = voxel_ijk[~bad]
        root.create_array("voxel_ijk", data=voxel_ijk.astype(np.int32))
        root.attrs.update(
            {
                "subject": subject_label(subject),
                "roi": {k: [int(v) for v in roi_labels[k]] for k in sorted(roi_labels)},
                "sessions": [int(s) for s in sessions],
                "normalisation": normalisation,
                "units": "z-score per voxel per session" if normalisation == "session" else "percent signal change",
                "split": {k: split[k] for k in sorted(split)},
                "affine": np.asarray(affine).tolist(),
                "dropped_voxels": int(bad.sum()),
                "braid_version": __version__,
            }
        )
    with atomic_output(out_trials) as tmp:
        table.to_parquet(tmp, index=False)
    counts = table.drop_duplicates("nsd_id")["split"].value_counts().to_dict()
    log.info("%s: %d trials x %d voxels; images per split %s", subject_label(subject), len(table), n_vox - bad.sum(), counts)
    return table


def _zyx_columns_to_ijk(mask_zyx: np.ndarray) -> np.ndarray:
    """(i, j, k) NIfTI coordinates of the columns produced by ``volume[:, mask_zyx]``."""
    zyx = np.argwhere(mask_zyx)  # C order over (Z, Y, X): the order boolean indexing uses
    return zyx[:, ::-1]


def open_betas(path: str | os.PathLike):
    import zarr

    try:
        return zarr.open_group(Path(path), mode="r")
    except Exception as err:
        raise BraidError(f"{path}: not a BRAID betas store ({err}); rerun the betas rule") from err
