"""NSD single-trial betas -> ROI-masked, normalised Zarr stores and a trial table per subject.

Output (per subject)
  ``betas.zarr``: array ``betas`` (trials x voxels, float32, percent signal change / z-scored),
  array ``voxel_ijk`` (voxels x 3, the NIfTI (i, j, k) of each column), attributes saying
  subject, ROI files and labels, sessions, normalisation and split rule.
  ``trials.parquet``: one row per stored row, in the store's order: session and trial
  (1-based, NSD's numbering), global_trial (0-based), nsd_id (0-based), repeat (0 = first
  presentation), n_repeats (1 for a single trial), shared1000, split (train/val/test). An
  averaged row is an image: session/trial/global_trial of its first presentation, repeat -1.

Conventions: HDF5 betas are (trials, Z, Y, X) through h5py and NIfTI ROIs are (X, Y, Z), so the
mask is transposed (``roi.T``); values are int16 x 300 and are divided by 300.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import __version__
from .common import BraidError, atomic_output, subject_label
from .integrity import new_array, new_group, open_store
from .nsd import ExpDesign, load_roi_mask

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


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
        check_fractions(fractions)
        n_test = int(round(fractions["test"] * ids.size))
        n_val = int(round(fractions["val"] * ids.size))
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


def check_fractions(fractions: dict) -> None:
    """Split fractions of rule ``seed`` are fractions of the images: they must sum to 1 (no renormalising)."""
    total = sum(float(fractions[k]) for k in SPLITS)
    if abs(total - 1.0) > 1e-6:
        given = " + ".join(f"{k} {fractions[k]:g}" for k in SPLITS)
        raise BraidError(f"config split: {given} = {total:g}, not 1; give the fractions of the images, e.g. "
                         "train 0.9, val 0.05, test 0.05")


NORMALISATIONS = ("session", "train", "none")
TRIAL_MODES = ("single", "average", "average_test")
TABLE_COLUMNS = ["session", "trial", "global_trial", "nsd_id", "repeat", "n_repeats", "shared1000", "split"]


def read_session(path: str | os.PathLike, mask_zyx: np.ndarray, trials: int | None = None) -> np.ndarray:
    """The ROI voxels of one session file as float32 (trials, voxels), percent signal change.

    NSD stores each voxel's trials as one uncompressed chunk (trials, 1, 1, 1): BRAID reads
    just the chunks of the ROI voxels (HDF5 direct chunk reads, ~2 % of the file for
    nsdgeneral) instead of the whole volume. Other layouts (compressed, contiguous, other
    chunking) fall back to reading one Z-plane at a time, and say so in the log. Columns are in
    the order of ``volume[:, mask_zyx]``.
    """
    import h5py

    try:
        with h5py.File(path, "r") as f:
            ds = f["betas"]
            if ds.ndim != 4 or ds.shape[1:] != mask_zyx.shape:
                raise BraidError(
                    f"{path}: betas volume (Z, Y, X) = {ds.shape[1:]} but the ROI is {mask_zyx.shape[::-1]} "
                    f"as (X, Y, Z); are the ROI and betas of the same subject and resolution?"
                )
            if trials is not None and ds.shape[0] != trials:
                raise BraidError(f"{path}: {ds.shape[0]} trials, expected {trials} like the first session")
            coords = np.argwhere(mask_zyx)
            if _voxel_chunked(ds):
                read = ds.id.read_direct_chunk
                chunks = b"".join([read((0, z, y, x))[1] for z, y, x in coords.tolist()])
                out = np.frombuffer(chunks, dtype=ds.dtype).reshape(coords.shape[0], ds.shape[0]).T
            else:
                log.info("%s: layout %s, chunks %s, filters %s: reading Z-planes instead of voxel chunks",
                         path, ds.id.get_create_plist().get_layout(), ds.chunks, ds.compression)
                out = np.empty((ds.shape[0], coords.shape[0]), dtype=ds.dtype)
                col = 0
                for z in np.unique(coords[:, 0]).tolist():
                    plane = ds[:, z]
                    vals = plane[:, mask_zyx[z]]
                    out[:, col : col + vals.shape[1]] = vals
                    col += vals.shape[1]
    except (OSError, KeyError, ValueError) as err:
        raise BraidError(f"{path}: cannot read betas ({err}); delete the file and fetch it again") from err
    scaled = np.empty(out.shape, np.float32)
    np.divide(out, np.float32(300.0), out=scaled)  # int16 x 300 -> percent signal change, one pass
    return scaled


def _voxel_chunked(ds) -> bool:
    """True when every voxel is one unfiltered chunk holding all its trials (NSD's layout)."""
    import h5py

    plist = ds.id.get_create_plist()
    return (
        plist.get_layout() == h5py.h5d.CHUNKED
        and ds.chunks == (ds.shape[0], 1, 1, 1)
        and plist.get_nfilters() == 0
    )


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
    trials: str = "single",
    pilot_images: int | None = None,
) -> pd.DataFrame:
    """Mask, scale and normalise the betas of ``session_files`` into ``out_zarr``; write ``out_trials``.

    normalisation: ``session`` z-scores each voxel within each session (NSD's convention; the
    statistics include the session's test trials, which makes it transductive),
    ``train`` z-scores with the mean/std of the training split's trials, ``none`` keeps percent
    signal change. The statistics are stored with the data (``session_mean``/``session_std`` or
    ``train_mean``/``train_std``) so that new data can be transformed the same way.
    trials: ``single`` keeps every trial; ``average`` averages the (normalised) repeats of each
    image, one row per image; ``average_test`` does so for the test split only (train on single
    trials, test on repeat averages, as Takagi and MindEye evaluate). At most one session is in memory at a time (plus, for
    ``average``, one running sum per image). pilot_images: keep only the trials of that many images
    (config ``pilot_images``, :meth:`braid.nsd.ExpDesign.shown_ids`; the normalisation statistics
    are those of the kept trials).

    Three passes: the trial table (which trials, which split), the sessions one at a time into a
    scratch array (their statistics, the voxels to drop), then the kept voxels, normalised and
    (optionally) averaged, into ``betas``.
    """

    if normalisation not in NORMALISATIONS:
        raise BraidError(f"normalisation {normalisation!r} is not one of {NORMALISATIONS} (config betas.normalisation)")
    if trials not in TRIAL_MODES:
        raise BraidError(f"trials {trials!r} is not one of {TRIAL_MODES} (config betas.trials)")
    mask_xyz, affine, roi_volumes = load_roi_mask(roi_files, roi_labels)
    mask_zyx = mask_xyz.T
    if not mask_zyx.any():
        raise BraidError(f"the ROI selection {roi_labels} has no voxels")
    sessions = sorted(session_files)
    first = read_session(session_files[sessions[0]], mask_zyx)
    table = _trial_table(ExpDesign.load(expdesign_path), subject, sessions, first.shape[0], split, pilot_images)

    with atomic_output(out_zarr) as tmp:
        root = new_group(tmp)
        stats = _stack_sessions(root, subject, session_files, mask_zyx, first, table, normalisation, pilot_images)
        del first
        ijk = _zyx_columns_to_ijk(mask_zyx)
        shift, scale = _voxel_transform(root, stats, normalisation, subject, ijk)
        keep = ~stats.bad
        if trials == "single":
            _write_single(root, stats.scratch, keep, shift, scale, stats.per_file, dtype)
        else:
            table = _write_averaged(root, stats.scratch, table, trials, keep, shift, scale, stats.per_file, dtype)
        del root["scratch"]
        _write_voxels(root, ijk, stats.bad, roi_volumes)
        root.attrs.update(_attributes(subject, roi_labels, sorted(roi_volumes), sessions, pilot_images, trials,
                                      normalisation, split, affine, int(stats.bad.sum())))
    with atomic_output(out_trials) as tmp:
        table.to_parquet(tmp, index=False)
    counts = table.drop_duplicates("nsd_id")["split"].value_counts().to_dict()
    log.info("%s: %d rows x %d voxels; images per split %s", subject_label(subject), len(table), keep.sum(), counts)
    return table


def _trial_table(design: ExpDesign, subject: int, sessions: list[int], per_file: int, split: dict,
                 pilot_images: int | None) -> pd.DataFrame:
    """One row per kept trial (TABLE_COLUMNS), in session order, with its image's split."""
    table = design.trial_images(subject, sessions, per_file)
    if pilot_images is not None:
        table = table[table["nsd_id"].isin(design.shown_ids(subject, sessions, per_file, pilot_images))]
        table = table.reset_index(drop=True)
    table["split"] = split_images(
        table["nsd_id"].to_numpy(), split["rule"], split, split["seed"], table["shared1000"].to_numpy()
    ).reindex(table["nsd_id"]).to_numpy()
    table["n_repeats"] = np.int16(1)
    return table[TABLE_COLUMNS]


@dataclass
class _SessionStats:
    """What the pass over the sessions leaves: the stacked trials and what normalising them needs."""

    scratch: object  # zarr array, trials x ROI voxels, as read (session-z-scored for "session")
    per_file: int  # trials per session file
    bad: np.ndarray  # voxels all-zero, constant or NaN in some session
    session_mean: np.ndarray
    session_std: np.ndarray
    train_sum: np.ndarray  # over the training split's trials (float64)
    train_sq: np.ndarray
    n_train: int


def _stack_sessions(root, subject: int, session_files: dict, mask_zyx: np.ndarray, first: np.ndarray,
                    table: pd.DataFrame, normalisation: str, pilot_images: int | None) -> _SessionStats:
    """Read the sessions one at a time into ``root["scratch"]`` (z-scoring each within itself for
    ``session``), gathering the statistics and the voxels to drop."""
    from .progress import progress

    sessions = sorted(session_files)
    per_file, n_vox = first.shape
    kept = {s: table.loc[table["session"] == s, "trial"].to_numpy() - 1 for s in sessions}  # rows of each file
    starts = np.cumsum([0] + [len(kept[s]) for s in sessions])
    is_train = table["split"].to_numpy() == "train"
    scratch = new_array(root, "scratch", shape=(len(table), n_vox), chunks=(max(1, min(per_file, len(table))), n_vox),
                                dtype="float32")
    stats = _SessionStats(scratch, per_file, np.zeros(n_vox, bool), np.zeros((len(sessions), n_vox), np.float32),
                          np.ones((len(sessions), n_vox), np.float32), np.zeros(n_vox, np.float64),
                          np.zeros(n_vox, np.float64), int(is_train.sum()))
    bar = progress(sessions, desc=f"{subject_label(subject)} sessions", unit="session", mininterval=2)
    for k, session in enumerate(bar):
        x = first if k == 0 else read_session(session_files[session], mask_zyx, per_file)
        x = x[kept[session]] if pilot_images is not None else x
        rows = slice(starts[k], starts[k + 1])
        stats.bad |= ~np.isfinite(x).all(0) | (np.nanmax(np.abs(x), 0) == 0)
        x = np.nan_to_num(x)
        sd = x.std(0)
        stats.bad |= sd == 0  # constant within a session: no information, whatever the normalisation
        if normalisation == "session":
            stats.session_mean[k] = x.mean(0)
            stats.session_std[k] = np.where(sd > 0, sd, 1.0)
            x = (x - stats.session_mean[k]) / stats.session_std[k]
        elif normalisation == "train":
            xt = x[is_train[rows]].astype(np.float64)
            stats.train_sum += xt.sum(0)
            stats.train_sq += (xt**2).sum(0)
        scratch[rows] = x
        del x
    return stats


def _voxel_transform(root, stats: _SessionStats, normalisation: str, subject: int,
                     ijk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-voxel shift and scale still to apply to the scratch rows (for ``train``: the
    training split's statistics); store the statistics of the kept voxels; warn of dropped ones."""
    n_vox = stats.bad.size
    shift = np.zeros(n_vox, np.float32)
    scale = np.ones(n_vox, np.float32)
    if normalisation == "train":
        n = stats.n_train
        shift = (stats.train_sum / n).astype(np.float32)
        sd = np.sqrt(np.maximum(stats.train_sq / n - (stats.train_sum / n) ** 2, 0))
        stats.bad |= sd == 0
        scale = np.where(sd > 0, sd, 1.0).astype(np.float32)
        new_array(root, "train_mean", data=shift[~stats.bad])
        new_array(root, "train_std", data=scale[~stats.bad])
    elif normalisation == "session":
        new_array(root, "session_mean", data=stats.session_mean[:, ~stats.bad])
        new_array(root, "session_std", data=stats.session_std[:, ~stats.bad])
    bad = stats.bad
    if bad.any():
        where = ", ".join(str(tuple(v)) for v in ijk[bad][:10].tolist())
        log.warning("%s: dropping %d of %d ROI voxels that are all-zero, constant or NaN in some session; "
                    "(i, j, k) %s%s", subject_label(subject), bad.sum(), n_vox, where, " ..." if bad.sum() > 10 else "")
    return shift, scale


def _write_single(root, scratch, keep: np.ndarray, shift: np.ndarray, scale: np.ndarray, per_file: int,
                  dtype: str) -> None:
    """``betas``: every trial's kept voxels, normalised, one output chunk at a time: each chunk is
    written once, whole (a write that covered part of a chunk would read, decode and re-encode it)."""
    n_rows, n_keep = scratch.shape[0], int(keep.sum())
    out = new_array(root, "betas", shape=(n_rows, n_keep), chunks=(min(256, n_rows), n_keep), dtype=dtype)
    step = out.chunks[0]
    for start in range(0, n_rows, step):
        block = scratch[start : start + step][:, keep]
        out[start : start + step] = ((block - shift[keep]) / scale[keep]).astype(dtype)


def _write_averaged(root, scratch, table: pd.DataFrame, trials: str, keep: np.ndarray, shift: np.ndarray,
                    scale: np.ndarray, per_file: int, dtype: str) -> pd.DataFrame:
    """``betas`` with the repeats of each image averaged (all images for ``average``, the test
    split's for ``average_test``); returns the table of the rows written."""
    # rows that are averaged share a group per image; the others stay single trials
    averaged = np.ones(len(table), bool) if trials == "average" else table["split"].to_numpy() == "test"
    group = np.where(averaged, table["nsd_id"].to_numpy(), -1 - np.arange(len(table)))
    _, first, inverse = np.unique(group, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))  # groups in order of their first trial
    inverse = rank[inverse]
    sums = np.zeros((first.size, int(keep.sum())), np.float32)
    for start in range(0, len(table), per_file):
        block = (scratch[start : start + per_file][:, keep] - shift[keep]) / scale[keep]
        np.add.at(sums, inverse[start : start + per_file], block)
    counts = np.bincount(inverse)
    data = sums / counts[:, None]
    firsts = table.iloc[np.sort(first)].reset_index(drop=True)
    firsts["repeat"] = np.where(averaged[np.sort(first)], -1, firsts["repeat"])
    firsts["n_repeats"] = counts.astype(np.int16)
    out = new_array(root, "betas", shape=data.shape, chunks=(min(256, len(data)), data.shape[1]), dtype=dtype)
    out[:] = data.astype(dtype)
    return firsts[TABLE_COLUMNS]


def _write_voxels(root, ijk: np.ndarray, bad: np.ndarray, roi_volumes: dict) -> None:
    """Where each kept voxel is (``voxel_ijk``), its label in each ROI file, and the dropped voxels."""
    keep = ~bad
    new_array(root, "voxel_ijk", data=ijk[keep].astype(np.int32))
    names = sorted(roi_volumes)
    labels = np.stack([roi_volumes[n][tuple(ijk[keep].T)] for n in names], axis=1).astype(np.int16)
    new_array(root, "voxel_labels", data=labels)  # voxels x ROI files (attrs roi_files), the files' own labels
    if bad.any():
        new_array(root, "dropped_voxel_ijk", data=ijk[bad].astype(np.int32))


def _attributes(subject, roi_labels, roi_files, sessions, pilot_images, trials, normalisation, split, affine,
                dropped) -> dict:
    return {
        "subject": subject_label(subject),
        "roi": {k: [int(v) for v in roi_labels[k]] for k in sorted(roi_labels)},
        "roi_files": roi_files,
        "sessions": [int(s) for s in sessions],
        "pilot_images": pilot_images,
        "trials": trials,
        "normalisation": normalisation,
        "units": {"session": "z-score per voxel within each session", "train": "z-score with training-split statistics",
                  "none": "percent signal change"}[normalisation],
        "split": {k: split[k] for k in sorted(split)},
        "affine": np.asarray(affine).tolist(),
        "dropped_voxels": dropped,
        "braid_version": __version__,
    }


def _zyx_columns_to_ijk(mask_zyx: np.ndarray) -> np.ndarray:
    """(i, j, k) NIfTI coordinates of the columns produced by ``volume[:, mask_zyx]``."""
    zyx = np.argwhere(mask_zyx)  # C order over (Z, Y, X): the order boolean indexing uses
    return zyx[:, ::-1]


def open_betas(path: str | os.PathLike):
    """The betas store for reading; a damaged or missing store is named with its repair."""
    return open_store(path, rule="betas_mask")
