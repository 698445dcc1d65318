"""The Natural Scenes Dataset: bucket keys, design files, and fetching objects.

Conventions (see ``shared/reference/nsd-layout.md``): NSD's files are 1-based
(``masterordering`` indexes a subject's 10k list from 1, ``subjectim`` and ``sharedix`` hold
1-based 73k ids, ``subjectK_repR`` holds 1-based trial numbers with 0 = not shown). BRAID
converts once, here, and everything downstream uses 0-based ``nsd_id`` (= the CSV's ``nsdId``
and the row of ``imgBrick``), 1-based ``session`` and 1-based ``trial`` within the session.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .common import BraidError, atomic_output, subject_label

log = logging.getLogger(__name__)

BUCKET = "natural-scenes-dataset"
TRIALS_PER_SESSION = 750
SESSIONS = {1: 40, 2: 40, 3: 32, 4: 30, 5: 40, 6: 32, 7: 40, 8: 30}

EXPDESIGN = "nsddata/experiments/nsd/nsd_expdesign.mat"
STIM_INFO = "nsddata/experiments/nsd/nsd_stim_info_merged.csv"
STIMULI = "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"


def roi_key(subject: int, roi: str, resolution: str = "func1pt8mm") -> str:
    return f"nsddata/ppdata/{subject_label(subject)}/{resolution}/roi/{roi}.nii.gz"


def brainmask_key(subject: int, resolution: str = "func1pt8mm") -> str:
    return f"nsddata/ppdata/{subject_label(subject)}/{resolution}/brainmask.nii.gz"


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


def load_stim_info(path: str | os.PathLike) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, index_col=0)
    except Exception as err:
        raise BraidError(f"{path}: cannot read as CSV ({err}); delete it and fetch again") from err
    if "nsdId" not in df.columns:
        raise BraidError(f"{path}: no 'nsdId' column; is this nsd_stim_info_merged.csv?")
    return df


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------


def s3_client(endpoint_url: str | None = None, region: str = "us-east-2", anonymous: bool = True):
    """A boto3 S3 client: unsigned (anonymous) by default, as NSD's public bucket allows."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    cfg = Config(
        region_name=region,
        retries={"max_attempts": 8, "mode": "adaptive"},
        signature_version=UNSIGNED if anonymous else None,
    )
    return boto3.client("s3", endpoint_url=endpoint_url or None, config=cfg)


def fetch(
    source: str,
    key: str,
    dest: str | os.PathLike,
    endpoint_url: str | None = None,
    region: str = "us-east-2",
    anonymous: bool = True,
) -> int:
    """Copy object ``key`` from ``source`` (``s3://bucket[/prefix]`` or a local mirror) to ``dest``.

    The object is written under a temporary name and renamed once its size is verified.
    Returns the number of bytes written.
    """
    dest = Path(dest)
    if source.startswith("s3://"):
        return _fetch_s3(source, key, dest, endpoint_url, region, anonymous)
    src = Path(source) / key
    if not src.is_file():
        raise BraidError(f"{src}: not found in the local NSD mirror (config nsd.source = {source!r})")
    size = src.stat().st_size
    with atomic_output(dest) as tmp:
        shutil.copyfile(src, tmp)
        _check_size(tmp, size, key)
    log.info("copied %s (%d bytes) from %s", key, size, source)
    return size


def _fetch_s3(source, key, dest, endpoint_url, region, anonymous) -> int:
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import ClientError
    from tqdm import tqdm

    bucket, _, prefix = source[len("s3://") :].partition("/")
    full_key = f"{prefix.strip('/')}/{key}" if prefix.strip("/") else key
    client = s3_client(endpoint_url, region, anonymous)
    try:
        size = client.head_object(Bucket=bucket, Key=full_key)["ContentLength"]
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey"):
            raise BraidError(
                f"s3://{bucket}/{full_key}: no such object. Check the subject, session and resolution "
                f"in the config (NSD has sessions {SESSIONS}) and the endpoint ({endpoint_url or 'AWS'})."
            ) from err
        if code in ("403", "AccessDenied"):
            raise BraidError(
                f"s3://{bucket}/{full_key}: access denied. Either the key does not exist (S3 answers 403 "
                f"for missing keys to readers who may not list the bucket: check subject, session and "
                f"resolution) or the source needs credentials (nsd.anonymous: false uses boto3's "
                f"profile/env credentials). NSD itself is public for reads, under its data-use terms."
            ) from err
        raise
    config = TransferConfig(multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20, max_concurrency=8)
    with atomic_output(dest) as tmp, tqdm(total=size, unit="B", unit_scale=True, desc=key, mininterval=2) as bar:
        client.download_file(bucket, full_key, str(tmp), Config=config, Callback=bar.update)
        _check_size(tmp, size, key)
    log.info("downloaded s3://%s/%s (%d bytes)", bucket, full_key, size)
    return size


def _check_size(path: Path, expected: int, key: str) -> None:
    got = path.stat().st_size
    if got != expected:
        raise BraidError(f"{key}: got {got} bytes, the source says {expected}; fetch again")
