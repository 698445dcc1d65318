"""The Natural Scenes Dataset's layout: bucket keys, the design file, ROI masks, subject limits.

What NSD's files are called and what they hold (NSD data manual,
https://cvnlab.slite.page/p/CT9Fwl4_hc/NSD-Data-Manual; Allen et al. 2022, Nature
Neuroscience 25:116-126). Moving their bytes is :mod:`braid.transfer`'s business.

Conventions: NSD's files are 1-based
(``masterordering`` indexes a subject's 10k list from 1, ``subjectim`` and ``sharedix`` hold
1-based 73k ids, ``subjectK_repR`` holds 1-based trial numbers with 0 = not shown). BRAID
converts once, here, and everything downstream uses 0-based ``nsd_id`` (= the CSV's ``nsdId``
and the row of ``imgBrick``), 1-based ``session`` and 1-based ``trial`` within the session.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .common import BraidError, subject_label

BUCKET = "natural-scenes-dataset"
TRIALS_PER_SESSION = 750
# nsdgeneral > 0 at 1.8 mm (the MindEye/MedARC counts): sizes jobs before the ROI files are fetched
NSDGENERAL_VOXELS = {1: 15724, 2: 14278, 3: 15226, 4: 13153, 5: 13039, 6: 17907, 7: 12682, 8: 14386}
SESSIONS = {1: 40, 2: 40, 3: 32, 4: 30, 5: 40, 6: 32, 7: 40, 8: 30}

EXPDESIGN = "nsddata/experiments/nsd/nsd_expdesign.mat"
STIM_INFO = "nsddata/experiments/nsd/nsd_stim_info_merged.csv"
STIM_INFO_PKL = "nsddata/experiments/nsd/nsd_stim_info_merged.pkl"
STIMULI = "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"


# NSD's ROI files (nsddata/ppdata/subjNN/<resolution>/roi/<name>.nii.gz; each also with an lh./rh. prefix)
ROI_FILES = ("HCP_MMP1", "Kastner2015", "MTL", "corticalsulc", "floc-bodies", "floc-faces", "floc-places",
             "floc-words", "nsdgeneral", "prf-eccrois", "prf-visualrois", "streams", "thalamus")


def roi_key(subject: int, roi: str, resolution: str = "func1pt8mm") -> str:
    return f"nsddata/ppdata/{subject_label(subject)}/{resolution}/roi/{roi}.nii.gz"


def brainmask_key(subject: int, resolution: str = "func1pt8mm") -> str:
    return f"nsddata/ppdata/{subject_label(subject)}/{resolution}/brainmask.nii.gz"


def ncsnr_key(subject: int, resolution: str = "func1pt8mm", version: str = "betas_fithrf_GLMdenoise_RR") -> str:
    """NSD's noise-ceiling SNR volume (X, Y, Z) of a subject's betas. NSD computes it from all of the
    subject's trials, shared (test) images included."""
    return f"nsddata_betas/ppdata/{subject_label(subject)}/{resolution}/{version}/ncsnr.nii.gz"


def betas_key(
    subject: int,
    session: int,
    resolution: str = "func1pt8mm",
    version: str = "betas_fithrf_GLMdenoise_RR",
) -> str:
    return (
        f"nsddata_betas/ppdata/{subject_label(subject)}/{resolution}/{version}/"
        f"betas_session{int(session):02d}.hdf5"
    )


def check_sessions(subject: int, sessions: list[int]) -> None:
    """Fail with a clear message if a session is outside what NSD recorded for the subject."""
    n = SESSIONS[int(subject)]
    bad = [s for s in sessions if not 1 <= int(s) <= n]
    if bad:
        raise BraidError(f"sessions {bad} are outside {subject_label(subject)}'s NSD sessions 1..{n}")


# --------------------------------------------------------------------------------------------
# Design files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpDesign:
    """``nsd_expdesign.mat``, kept 1-based as stored; use the methods for 0-based ids."""

    masterordering: np.ndarray  # (n_trials,) 1-based index into a subject's image list
    subjectim: np.ndarray  # (8, n_images_per_subject) 1-based 73k ids
    sharedix: np.ndarray  # (n_shared,) 1-based 73k ids

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExpDesign":
        from scipy.io import loadmat

        try:
            mat = loadmat(path)
        except Exception as err:  # scipy raises several types for corrupt files
            raise BraidError(f"{path}: cannot read as a MATLAB file ({err}); delete it and fetch again") from err
        missing = [k for k in ("masterordering", "subjectim", "sharedix") if k not in mat]
        if missing:
            raise BraidError(f"{path}: keys {missing} missing; is this NSD's nsd_expdesign.mat?")
        return cls(
            masterordering=_as_index(mat["masterordering"], path, "masterordering").ravel(),
            subjectim=_as_index(mat["subjectim"], path, "subjectim"),
            sharedix=_as_index(mat["sharedix"], path, "sharedix").ravel(),
        )

    def trial_images(self, subject: int, sessions: list[int], trials_per_session: int) -> pd.DataFrame:
        """One row per trial of ``sessions``: session, trial (1-based), global_trial (0-based), nsd_id (0-based)."""
        rows = []
        for session in sorted(int(s) for s in sessions):
            start = (session - 1) * trials_per_session
            stop = start + trials_per_session
            if stop > self.masterordering.size:
                raise BraidError(
                    f"nsd_expdesign.mat: masterordering has {self.masterordering.size} trials, "
                    f"session {session} needs trials {start + 1}..{stop}"
                )
            slots = self.masterordering[start:stop] - 1  # 1-based -> 0-based slot in the 10k list
            ids = self.subjectim[int(subject) - 1, slots]
            if (ids < 1).any():
                raise BraidError(
                    f"nsd_expdesign.mat: subjectim row for {subject_label(subject)} has no image for "
                    f"some trials of session {session}; is this subject in the dataset?"
                )
            rows.append(
                pd.DataFrame(
                    {
                        "session": np.full(trials_per_session, session, dtype=np.int16),
                        "trial": np.arange(1, trials_per_session + 1, dtype=np.int16),
                        "global_trial": np.arange(start, stop, dtype=np.int32),
                        "nsd_id": (ids - 1).astype(np.int64),
                        "shared1000": np.isin(ids, self.sharedix),
                    }
                )
            )
        table = pd.concat(rows, ignore_index=True)
        # repeat index: 0 for the first presentation of an image, 1 for the second, ...
        order = self._repeat_order(subject)
        table["repeat"] = order[table["global_trial"].to_numpy()].astype(np.int8)
        return table

    def shown_ids(self, subject: int, sessions: list[int], trials_per_session: int,
                  pilot_images: int | None = None) -> np.ndarray:
        """0-based nsd ids of the images shown in ``sessions``, in the order of the subject's image
        list (``subjectim``). ``pilot_images``: only that many of them, those shown most often in
        these sessions first (then in the list's order), so that a pilot keeps repeated images."""
        slots = np.concatenate([self.masterordering[(int(s) - 1) * trials_per_session : int(s) * trials_per_session]
                                for s in sessions]) - 1
        ids = self.subjectim[int(subject) - 1]
        counts = np.bincount(slots, minlength=ids.size)
        counts[ids < 1] = 0
        shown = np.flatnonzero(counts)
        if pilot_images is not None and pilot_images < shown.size:
            shown = np.sort(shown[np.argsort(-counts[shown], kind="stable")[:pilot_images]])
        return ids[shown] - 1

    def _repeat_order(self, subject: int) -> np.ndarray:
        ids = self.subjectim[int(subject) - 1, self.masterordering - 1]
        seen: dict[int, int] = {}
        rep = np.empty(ids.size, dtype=np.int64)
        for t, i in enumerate(ids.tolist()):
            rep[t] = seen.get(i, 0)
            seen[i] = rep[t] + 1
        return rep


def _as_index(value: np.ndarray, path, key: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise BraidError(f"{path}: '{key}' holds non-integer values; the file looks corrupt")
    return arr.astype(np.int64)


def load_roi_mask(roi_files: dict[str, str | os.PathLike], labels: dict[str, list[int]]):
    """Union of ``labels`` over ROI files -> boolean (X, Y, Z) mask, the affine, and each file's label volume."""
    import nibabel as nib

    mask = None
    affine = None
    volumes = {}
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
        volumes[name] = vol
        if mask is None:
            mask, affine = this, img.affine
        elif this.shape != mask.shape:
            raise BraidError(f"{path}: ROI dims {this.shape} differ from the other ROI files' {mask.shape}")
        else:
            mask |= this
    return mask, affine, volumes


def load_stim_info(path: str | os.PathLike) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, index_col=0)
    except Exception as err:
        raise BraidError(f"{path}: cannot read as CSV ({err}); delete it and fetch again") from err
    if "nsdId" not in df.columns:
        raise BraidError(f"{path}: no 'nsdId' column; is this nsd_stim_info_merged.csv?")
    return df
