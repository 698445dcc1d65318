"""Moving NSD's bytes: the S3 client, whole-object and ranged fetches, resumable downloads.

Objects come from NSD's public bucket (``s3://natural-scenes-dataset``, read anonymously with
boto3) or from a local mirror with the same keys. Whole objects are downloaded in parallel
ranged parts into ``<dest>.part`` and renamed once complete; ROI-only betas and row-only
stimuli read just the HDF5 chunks they need (:mod:`braid.hdf5_ranges`). Every download resumes
after a kill and is owned by one process at a time. What the keys are, and what the files
hold, is :mod:`braid.nsd`'s business; this module only moves bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np

from .common import BraidError, atomic_output, file_lock
from .nsd import BUCKET, SESSIONS

log = logging.getLogger(__name__)

PART_SIZE = 16 * 2**20  # ranged parts of whole-object downloads
PART_PARALLEL = 8  # parts in flight at once
# ranged GETs in flight at once for ROI-only / row-only fetches and their chunk index (a speed
# setting: BRAID_RANGE_PARALLEL lowers it for an endpoint that answers 503 under load)
RANGE_PARALLEL = int(os.environ.get("BRAID_RANGE_PARALLEL", 64))
# (benchmarks/fetch_link.py: 64 beat 16, 32 and 128 over simulated 20 ms and 60 ms links)
GAP_CHUNKS = 4  # ROI chunks fewer than this many chunks apart are fetched in one request


def s3_client(endpoint_url: str | None = None, region: str = "us-east-2", anonymous: bool = True,
              profile: str | None = None, request_attempts: int = 8):
    """A boto3 S3 client: unsigned (anonymous) by default, as NSD's public bucket allows.

    With ``anonymous=False`` boto3's own credential chain applies: the named ``profile`` (the
    config's ``nsd.profile``) or keys in the environment; credentials never pass through BRAID's
    config, params or logs. Every fetch function takes these four settings as keywords
    (``**s3``) and hands them here. ``request_attempts``: botocore's tries of each request (throttling,
    5xx, connection errors), with its adaptive backoff.
    """
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    cfg = Config(
        region_name=region,
        retries={"max_attempts": request_attempts, "mode": "adaptive"},
        signature_version=UNSIGNED if anonymous else None,
        max_pool_connections=max(RANGE_PARALLEL, PART_PARALLEL),  # one kept-alive connection per thread
    )
    session = boto3.Session(profile_name=profile) if profile and not anonymous else boto3.Session()
    return session.client("s3", endpoint_url=endpoint_url or None, config=cfg)


def fetch(
    source: str,
    key: str,
    dest: str | os.PathLike,
    part_size: int = PART_SIZE,
    **s3,
) -> int:
    """Copy object ``key`` from ``source`` (``s3://bucket[/prefix]`` or a local mirror) to ``dest``.

    The object is written under a temporary name and renamed once its size is verified.
    Returns the number of bytes written.
    """
    dest = Path(dest)
    if source.startswith("s3://"):
        return _fetch_s3(source, key, dest, part_size, **s3)
    from .hdf5_ranges import check_not_truncated

    src = Path(source) / key
    if not src.is_file():
        raise BraidError(f"{src}: not found in the local NSD mirror (config nsd.source = {source!r})")
    size = src.stat().st_size
    with open(src, "rb") as f:
        check_not_truncated(f.read(128), size, str(src), truncated_fix(source))
    with atomic_output(dest) as tmp:
        shutil.copyfile(src, tmp)
        _check_size(tmp, size, key)
    log.info("copied %s (%d bytes) from %s", key, size, source)
    return size


def truncated_fix(source: str) -> str:
    """What to do about a cut-short source file."""
    if source.startswith("s3://"):
        return f"the object in {source} is incomplete: report it to the bucket's maintainers, or use another mirror"
    return (f"the local NSD mirror's copy ({source}) is incomplete: download that file into the mirror again, or "
            "set nsd.source to s3://natural-scenes-dataset")


class PartialDownload:
    """Bytes of a download gathered in ``<dest>.part``, resumable, and owned by one process.

    ``lengths`` are the pieces (parts of an object, or runs of chunks), laid end to end in the
    ``.part`` file. ``<dest>.part.json`` records ``identity`` (what is being downloaded: key,
    size, ETag...) and the pieces already written; it is replaced atomically after each piece,
    so a kill leaves the old record or the new one. A rerun with the same identity continues
    where the last stopped; any other identity starts again. Use it inside :func:`exclusive`.
    """

    def __init__(self, dest, identity: dict, lengths: list[int]):
        import threading

        self.dest = Path(dest)
        self.part = self.dest.with_name(self.dest.name + ".part")
        self.record = self.dest.with_name(self.dest.name + ".part.json")
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self.lengths = [int(n) for n in lengths]
        # the pieces themselves, not just their count and total: a ROI fetch resumed without its
        # chunk-index cache has other runs, and a piece must never be read back as another
        pieces = hashlib.sha256(np.asarray(self.lengths, np.int64).tobytes()).hexdigest()
        self.state = {"identity": identity, "lengths": len(lengths), "pieces": pieces, "total": int(self.offsets[-1]),
                      "done": []}
        if self.part.exists() and self.record.exists():
            try:
                old = json.loads(self.record.read_text())
            except ValueError:
                old = {}  # an unreadable record: start again
            same = all(old.get(k) == self.state[k] for k in ("identity", "lengths", "pieces", "total"))
            if same and self.part.stat().st_size == self.state["total"]:
                self.state["done"] = sorted(set(old["done"]))
        if not self.state["done"]:
            with open(self.part, "wb") as f:
                f.truncate(self.state["total"])
        self._fd = os.open(self.part, os.O_RDWR)
        self._mutex = threading.Lock()

    def todo(self) -> list[int]:
        done = set(self.state["done"])
        return [i for i in range(len(self.lengths)) if i not in done]

    def write(self, i: int, data: bytes) -> None:
        if len(data) != self.lengths[i]:
            raise BraidError(f"{self.dest}: piece {i} has {len(data)} bytes, expected {self.lengths[i]}")
        os.pwrite(self._fd, data, int(self.offsets[i]))
        with self._mutex:
            self.state["done"].append(i)
            tmp = self.record.with_name(self.record.name + ".tmp")
            tmp.write_text(json.dumps(self.state))
            os.replace(tmp, self.record)

    def read(self, i: int) -> bytes:
        return os.pread(self._fd, self.lengths[i], int(self.offsets[i]))

    def discard(self) -> None:
        """Forget the pieces (a corrupt result): the next run starts from zero."""
        for path in (self.part, self.record):
            path.unlink(missing_ok=True)

    def close(self, finished: bool = False) -> None:
        """Release the file; when ``finished``, remove the record (the caller has used or moved ``.part``)."""
        os.close(self._fd)
        if finished:
            self.discard()


def exclusive(dest):
    """Hold ``<dest>.part.lock`` while ``dest`` is being fetched: a second process that would write
    the same ``.part`` files (an orphaned job of a killed Snakemake, and the rerun) is refused."""
    dest = Path(dest)
    lockfile = dest.with_name(dest.name + ".part.lock")
    return file_lock(lockfile, wait=False, remove=True, busy=(
        f"{dest}: another process is fetching it now (lock {lockfile} is held). Wait for it, or stop it "
        f"(e.g. a job left running by a Snakemake that was killed) and run again."))


def _fetch_s3(source, key, dest, part_size: int = PART_SIZE, **s3) -> int:
    """Parallel ranged download into ``<dest>.part`` (a :class:`PartialDownload`), verified, then renamed.

    The result is checked against the size and, where the ETag is a plain MD5 (single-part
    uploads), against the MD5.
    """
    src = RangeSource(source, key, **s3)
    dest = Path(dest)
    n_parts = max(1, -(-src.size // part_size))
    lengths = [min(part_size, src.size - i * part_size) for i in range(n_parts)] if src.size else [0]
    try:
        with exclusive(dest):
            _download_whole(src, key, dest, part_size, lengths)
    finally:
        src.close()
    log.info("downloaded %s (%d bytes, %d requests)", src.label, src.size, src.requests)
    return src.size


def _download_whole(src, key, dest, part_size, lengths) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from .progress import progress

    n_parts = len(lengths)
    download = PartialDownload(dest, {"key": key, "size": src.size, "etag": src.etag, "part_size": part_size}, lengths)
    finished = False
    try:
        todo = download.todo()
        if len(todo) < n_parts:
            log.info("%s: resuming, %d of %d parts already here", key, n_parts - len(todo), n_parts)
        with ThreadPoolExecutor(PART_PARALLEL) as pool, progress(total=src.size, initial=src.size - sum(lengths[i] for i in todo),
                                                 unit="B", unit_scale=True, desc=key.rsplit("/", 1)[-1],
                                                 mininterval=2) as bar:
            def one(i):
                data = src.read(i * part_size, lengths[i])
                download.write(i, data)
                bar.update(len(data))

            for future in [pool.submit(one, i) for i in todo]:
                future.result()
        _check_size(download.part, src.size, key)
        try:
            checked = verify_download(download.part, src)
        except BraidError:
            download.discard()
            raise
        log.info("%s: verified (%s)", key, ", ".join(checked) or "size only: the source gives no checksum")
        os.replace(download.part, dest)
        finished = True
    finally:
        download.close(finished)


def verify_download(path: Path, src: "RangeSource") -> list[str]:
    """Check a whole-object download against what S3 says of the object; return what was checked.

    - the ETag: a single-part upload's is the MD5 of the object; a multipart upload's
      (``<hex>-<parts>``) is the MD5 of its parts' MD5s, with the part size read from S3
      (``HeadObject`` of part 1);
    - S3's stored full-object checksums (``ChecksumMode``), SHA-256 and CRC-32, where the
      object has them.
    A mismatch raises a :class:`BraidError`: the bytes were altered on the way (nothing else
    checks them over plain HTTP).
    """
    import base64
    import zlib

    multipart = re.fullmatch(r"([0-9a-f]{32})-(\d+)", src.etag or "")
    part_size = src.part_size() if multipart else None
    stored = getattr(src, "checksums", {})  # only the sums S3 holds: each one is a pass over the bytes
    whole = hashlib.md5() if re.fullmatch(r"[0-9a-f]{32}", src.etag or "") else None
    sha, crc = (hashlib.sha256() if "SHA256" in stored else None), 0
    parts, part, in_part = [], hashlib.md5(), 0  # MD5s of the upload's parts
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            if whole is not None:
                whole.update(block)
            if sha is not None:
                sha.update(block)
            if "CRC32" in stored:
                crc = zlib.crc32(block, crc)
            view = memoryview(block)
            while part_size and len(view):
                take = min(len(view), part_size - in_part)
                part.update(view[:take])
                in_part, view = in_part + take, view[take:]
                if in_part == part_size:
                    parts.append(part.digest())
                    part, in_part = hashlib.md5(), 0
    if part_size and in_part:
        parts.append(part.digest())
    found = {}
    if whole is not None:
        found["MD5 (ETag)"] = (whole.hexdigest(), src.etag)
    elif multipart and part_size:
        got = f"{hashlib.md5(b''.join(parts)).hexdigest()}-{len(parts)}"
        found[f"multipart ETag ({multipart.group(2)} parts of {part_size} bytes)"] = (got, src.etag)
    if "SHA256" in stored:
        found["SHA-256 (S3 checksum)"] = (base64.b64encode(sha.digest()).decode(), stored["SHA256"])
    if "CRC32" in stored:
        found["CRC-32 (S3 checksum)"] = (base64.b64encode(crc.to_bytes(4, "big")).decode(), stored["CRC32"])
    for what, (got, want) in found.items():
        if got != want:
            raise BraidError(
                f"{src.label}: the downloaded bytes do not match the object's {what}: {got}, S3 says {want}. They "
                "were altered on the way (over plain HTTP nothing else checks them: a proxy, a mirror, a faulty "
                "network). The download was discarded; run again, and use an https:// endpoint if it recurs.")
    return list(found)


def _check_size(path: Path, expected: int, key: str) -> None:
    got = path.stat().st_size
    if got != expected:
        raise BraidError(f"{key}: got {got} bytes, the source says {expected}; fetch again")


# --------------------------------------------------------------------------------------------
# Ranged reads: ROI-only betas and the needed rows of the stimuli
# --------------------------------------------------------------------------------------------


_WARNED_PLAIN_HTTP: set[str] = set()


def _warn_plain_http(endpoint: str) -> None:
    """Once per endpoint and process: ranged reads over plain HTTP have no check of their bytes."""
    if endpoint.startswith("http://") and endpoint not in _WARNED_PLAIN_HTTP:
        _WARNED_PLAIN_HTTP.add(endpoint)
        log.warning(
            "%s is plain HTTP: whole-object downloads are checked against S3's ETag and checksums, but the bytes of "
            "ranged reads (ROI-only betas, stimulus rows, chunk indexes) are not, and nothing else protects them on "
            "the way. Use an https:// endpoint, or nsd.fetch: whole, where a proxy or network may alter bytes.",
            endpoint)


class RangeSource:
    """Ranged reads of one object (S3 or a local mirror), verified, retried, and counted.

    Each read must return exactly the bytes asked for (clamped at the object's end); a short
    or failed read is retried with backoff, then reported with the key. botocore already
    retries throttling, 5xx and connection errors for each request.
    """

    def __init__(self, source: str, key: str, attempts: int = 5, **s3):
        import threading

        self.key, self.attempts = key, attempts
        self.bytes = 0
        self.requests = 0
        self._lock = threading.Lock()
        if source.startswith("s3://"):
            bucket, _, prefix = source[len("s3://") :].partition("/")
            self.bucket, self.full_key = bucket, f"{prefix.strip('/')}/{key}" if prefix.strip("/") else key
            self.client = s3_client(**s3)
            self.size = self._head()
            self.label = f"s3://{bucket}/{self.full_key}"
            _warn_plain_http(self.client.meta.endpoint_url)
        else:
            self.client = None
            self.path = Path(source) / key
            if not self.path.is_file():
                raise BraidError(f"{self.path}: not found in the local NSD mirror (config nsd.source = {source!r})")
            stat = self.path.stat()
            self.size = stat.st_size
            self.etag = f"{stat.st_size}-{stat.st_mtime_ns}"  # what a resume record compares
            self._fd = os.open(self.path, os.O_RDONLY)
            self.label = str(self.path)

    def _head(self) -> int:
        from botocore.exceptions import BotoCoreError, ClientError

        endpoint = self.client.meta.endpoint_url
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.full_key, ChecksumMode="ENABLED")
            self.etag = head.get("ETag", "").strip('"')
            # full-object checksums only: a multipart object's composite ones ("...-N") are of its parts
            self.checksums = {algo: head[f"Checksum{algo}"] for algo in ("SHA256", "CRC32")
                              if head.get(f"Checksum{algo}") and "-" not in head[f"Checksum{algo}"]
                              and (head.get("ChecksumType") == "FULL_OBJECT" or "-" not in self.etag)}
            return head["ContentLength"]
        except ClientError as err:
            raise _s3_error(err, self.client, self.bucket, self.full_key) from err
        except BotoCoreError as err:  # no connection, DNS, TLS, timeouts: after botocore's own retries
            raise BraidError(
                f"s3://{self.bucket}/{self.full_key}: cannot reach the S3 endpoint {endpoint} ({err}). Check this "
                f"host's network, or nsd.endpoint_url / nsd.region in the config. On a cluster, the fetch rules are "
                f"local rules: they run on the host where Snakemake runs, which needs internet access."
            ) from err

    def part_size(self) -> int | None:
        """The size of part 1 of a multipart object (S3's ``HeadObject`` with ``PartNumber=1``)."""
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self.full_key, PartNumber=1)["ContentLength"])
        except Exception as err:  # noqa: BLE001 - a mirror without part numbers: the ETag cannot be checked
            log.warning("%s: the part size of this multipart object is not available (%s); its ETag is not checked",
                        self.label, err)
            return None

    def read(self, offset: int, size: int) -> bytes:
        import time

        size = max(0, min(size, self.size - offset))
        if size == 0:
            return b""
        for attempt in range(1, self.attempts + 1):
            try:
                if self.client is None:
                    data = os.pread(self._fd, size, offset)
                else:
                    resp = self.client.get_object(Bucket=self.bucket, Key=self.full_key,
                                                  Range=f"bytes={offset}-{offset + size - 1}")
                    data = resp["Body"].read()
                if len(data) == size:
                    with self._lock:
                        self.bytes += size
                        self.requests += 1
                    return data
                problem = f"got {len(data)} of {size} bytes"
            except BraidError:
                raise
            except Exception as err:  # connection resets, timeouts, 5xx after botocore's retries
                problem = f"{type(err).__name__}: {err}"
            log.warning("%s bytes %d-%d: %s (attempt %d/%d)", self.label, offset, offset + size - 1, problem, attempt, self.attempts)
            time.sleep(min(0.2 * 2 ** (attempt - 1), 5.0))
        raise BraidError(f"{self.label}: bytes {offset}-{offset + size - 1} failed {self.attempts} times ({problem}); "
                         + (UNAVAILABLE_FIX if _unavailable(problem) else "check the network or the endpoint and run again"))

    def close(self) -> None:
        if self.client is None:
            os.close(self._fd)


UNAVAILABLE_FIX = (
    "the endpoint answered 503 (SlowDown / Service Unavailable) through every retry: it is overloaded or "
    f"throttling this host. Wait a few minutes and run again; if it persists, send fewer requests at once "
    f"(BRAID_RANGE_PARALLEL=16 in the environment; now {RANGE_PARALLEL}) and check nsd.endpoint_url")


def _unavailable(problem: str) -> bool:
    return any(word in problem for word in ("503", "SlowDown", "ServiceUnavailable", "Service Unavailable"))


def _s3_error(err, client, bucket: str, key: str) -> BraidError:
    """A message for a failed HEAD of ``key`` that names bucket, endpoint and what to check."""
    endpoint = client.meta.endpoint_url
    code = err.response.get("Error", {}).get("Code", "")
    where = f"s3://{bucket}/{key} (endpoint {endpoint})"
    if code in ("404", "NoSuchKey", "NoSuchBucket", "403", "AccessDenied"):
        # HEAD has no body to say which is missing: ask about the bucket itself
        try:
            client.head_bucket(Bucket=bucket)
            bucket_ok = True
        except Exception as bucket_err:  # noqa: BLE001 - any failure here is reported as what it says
            bucket_code = getattr(bucket_err, "response", {}).get("Error", {}).get("Code", "")
            bucket_ok = None if bucket_code in ("403", "AccessDenied") else False
        if bucket_ok is False:
            return BraidError(
                f"{where}: the bucket {bucket!r} does not exist at this endpoint. Check nsd.source (NSD's is "
                f"s3://{BUCKET}), nsd.endpoint_url and nsd.region in the config."
            )
    if code in ("404", "NoSuchKey"):
        return BraidError(
            f"{where}: no such object in bucket {bucket!r}. Check the subject, session and resolution in the "
            f"config (NSD has sessions {SESSIONS}), and that nsd.source and nsd.endpoint_url point at NSD."
        )
    if code in ("403", "AccessDenied"):
        return BraidError(
            f"{where}: access denied. Either the key does not exist (S3 answers 403 for missing keys to readers "
            f"who may not list the bucket: check subject, session and resolution) or the source needs credentials "
            f"(nsd.anonymous: false uses boto3's profile/env credentials). NSD itself is public for reads, under "
            f"its data-use terms."
        )
    if code in ("503", "SlowDown", "ServiceUnavailable"):
        return BraidError(f"{where}: {UNAVAILABLE_FIX}")
    return BraidError(f"{where}: {err}")


def _fetch_sparse(source: str, key: str, dest, name: str, locate, want: bytes, gap_chunks: int, what: str,
                  **s3) -> dict:
    """Fetch some chunks of dataset ``name`` into a sparse local HDF5 of the same shape; resumable.

    ``locate(meta, ds)`` returns the chunk coordinates wanted (rows of element offsets) and their
    byte addresses, or raises ``LayoutError`` when the layout does not allow it; the whole object
    is then downloaded instead, with a warning. ``want`` identifies the request (the ROI mask,
    the rows). The located chunks are kept in ``<dest>.part.plan.npz`` and the fetched runs in a
    :class:`PartialDownload`, so that a failed or killed fetch continues where it stopped,
    without reading the file's metadata again. Each written chunk holds the source's exact
    bytes; the others are unallocated (read as the fill value, 0). Wanted chunks fewer than
    ``gap_chunks`` chunks apart are fetched in one request. Unless ``gap_chunks`` is 0, the file's
    head and its chunk index are read in merged requests and kept (:class:`braid.hdf5_ranges.RangeCache`): the
    index's leaves lie among the chunks they index, so most wanted chunks come with them and the
    fetch takes a hundred-odd requests instead of thousands (``bytes_metadata`` then includes
    those chunks). Returns a manifest entry (bytes and requests of this run; ``resumed_runs``
    were already here).
    """
    from .hdf5_ranges import LayoutError

    src = RangeSource(source, key, **s3)
    dest = Path(dest)
    identity = {"key": key, "size": src.size, "etag": src.etag, "what": what, "gap_chunks": gap_chunks,
                "want": hashlib.sha256(want).hexdigest()}
    try:
        with exclusive(dest):
            return _fetch_sparse_locked(src, source, key, dest, name, locate, identity, what)
    except LayoutError as err:
        log.warning("%s: %s fetch not possible (%s); downloading the whole object", src.label, what, err)
        size = fetch(source, key, dest, **s3)
        return {"key": key, "mode": "whole", "bytes_metadata": 0, "bytes_data": size, "bytes_object": size,
                "bytes_stored": dest.stat().st_size}
    finally:
        src.close()


def _fetch_sparse_locked(src, source, key, dest, name, locate, identity, what) -> dict:
    """The sparse fetch, with ``dest`` held: plan the chunks, download their runs, assemble the file."""
    from .hdf5_ranges import RangeCache

    # the index is read in merged requests and kept, so that the wanted chunks near its leaves come
    # with it (not with gap_chunks=0: exactly the wanted bytes, one request per run)
    cache = RangeCache(src.read, parallel=RANGE_PARALLEL) if identity["gap_chunks"] else None
    plan_path = dest.with_name(dest.name + ".part.plan.npz")
    plan = _load_plan(plan_path, identity)
    if plan is None:
        plan, cache = _plan_read_twice(src, source, name, locate, cache, plan_path, identity)
    metadata_bytes = src.bytes
    coords, addrs = plan["coords"], plan["addrs"]
    chunk_shape, dtype = tuple(int(n) for n in plan["chunk_shape"]), np.dtype(str(plan["dtype"]))
    chunk_bytes = int(np.prod(chunk_shape)) * dtype.itemsize
    from_index, runs = _chunk_runs(addrs, chunk_bytes, cache, identity["gap_chunks"])
    download = PartialDownload(dest, identity, [length for _, length, _ in runs])
    finished = False
    try:
        todo = download.todo()
        if len(todo) < len(runs):
            log.info("%s: resuming, %d of %d runs already here", key, len(runs) - len(todo), len(runs))
        _download_runs(src, runs, todo, download, key.rsplit("/", 1)[-1])
        chunks = dict(from_index)
        for k, (start, _, idx) in enumerate(runs):
            blob = download.read(k)
            for i in idx.tolist():
                rel = int(addrs[i]) - start
                chunks[i] = blob[rel : rel + chunk_bytes]
        attrs = {"source": source, "key": key, "what": what, "chunks": len(coords)}
        digest = _write_sparse(dest, name, plan, chunk_shape, dtype, coords, chunks, attrs)
        finished = True
    finally:
        download.close(finished)
    plan_path.unlink(missing_ok=True)
    entry = {
        "key": key, "mode": what, "chunks": len(coords), "requests": src.requests, "resumed_runs": len(runs) - len(todo),
        "bytes_metadata": int(metadata_bytes), "bytes_data": int(src.bytes - metadata_bytes),
        "bytes_ideal": len(coords) * chunk_bytes, "bytes_object": int(src.size),
        "bytes_stored": dest.stat().st_size, "sha256_fetched": digest,
    }
    log.info("%s: %s", key, entry)
    return entry


PLAN_FIELDS = ("coords", "addrs", "chunk_shape", "shape", "dtype")


def _load_plan(plan_path: Path, identity: dict) -> dict | None:
    """The plan a killed fetch of the same request left (``<dest>.part.plan.npz``), if readable."""
    if not plan_path.exists():
        return None
    try:
        with np.load(plan_path) as f:
            if json.loads(str(f["identity"])) == identity:
                return {k: f[k] for k in PLAN_FIELDS}
    except Exception:  # noqa: BLE001 - an unreadable plan is made again
        pass
    return None


def _plan_read_twice(src, source, name, locate, cache, plan_path, identity):
    """:func:`_make_plan`; where the file's metadata or chunk index reads as malformed (or as a
    file cut short), read them once more from the source before blaming the file: bytes altered
    on the way look the same as a damaged file. Returns the plan and the range cache it used."""
    from .hdf5_ranges import LayoutError, RangeCache

    try:
        return _make_plan(src, source, name, locate, cache, plan_path, identity), cache
    except (BraidError, LayoutError, ValueError, KeyError, IndexError, OverflowError) as err:
        if src.client is None:
            raise  # a file on this machine: nothing travelled
        first = err
    log.warning("%s: its metadata read as malformed (%s); reading it again, since bytes altered in transit look "
                "the same", src.label, first)
    fresh = RangeCache(src.read, parallel=RANGE_PARALLEL) if cache is not None else None
    try:
        plan = _make_plan(src, source, name, locate, fresh, plan_path, identity)
    except type(first):
        raise first from None
    log.warning("%s: the second read is well formed: the first was altered in transit (a transfer fault, not the "
                "file's)", src.label)
    return plan, fresh


def _make_plan(src, source: str, name: str, locate, cache, plan_path: Path, identity: dict) -> dict:
    """Read the file's metadata and chunk index: which chunks are wanted and where they lie; kept
    in ``plan_path`` so that a resumed fetch need not read them again."""
    from .hdf5_ranges import HDF5Ranges, LayoutError, check_not_truncated

    meta = HDF5Ranges(src.read, parallel=RANGE_PARALLEL, cache=cache, size=src.size)
    check_not_truncated(meta.superblock, src.size, src.label, truncated_fix(source))
    ds = meta.dataset(name)
    if ds.filtered or ds.layout not in ("chunked", "contiguous"):
        raise LayoutError(f"layout {ds.layout}, filtered {ds.filtered}")
    coords, addrs, chunk_shape = locate(meta, ds)
    if (addrs < 0).any():
        raise BraidError(f"{src.label}: {int((addrs < 0).sum())} wanted chunks are not stored; the file looks incomplete")
    plan = {"coords": coords, "addrs": addrs, "chunk_shape": np.asarray(chunk_shape), "shape": np.asarray(ds.shape),
            "dtype": np.asarray(ds.dtype.str)}
    with atomic_output(plan_path) as tmp, open(tmp, "wb") as f:
        np.savez(f, identity=np.asarray(json.dumps(identity)), **plan)
    return plan


def _chunk_runs(addrs: np.ndarray, chunk_bytes: int, cache, gap_chunks: int) -> tuple[dict, list]:
    """The chunks that came with the chunk index's merged reads (index -> bytes), and the runs of
    the others to request: (start, length, chunk indices), chunks fewer than ``gap_chunks`` apart merged."""
    from .hdf5_ranges import coalesce

    from_index = {}
    if cache is not None:
        for i, address in enumerate(addrs.tolist()):
            block = cache.cached(address, chunk_bytes)
            if block is not None:
                from_index[i] = block
    rest = np.array([i for i in range(len(addrs)) if i not in from_index], np.int64)
    runs = [(start, length, rest[idx]) for start, length, idx in
            coalesce(addrs[rest], chunk_bytes, gap_chunks * chunk_bytes)] if rest.size else []
    return from_index, runs


def _download_runs(src, runs: list, todo: list[int], download: PartialDownload, label: str) -> None:
    """Request the runs ``todo``, RANGE_PARALLEL at a time, each into ``download`` as it arrives."""
    from concurrent.futures import ThreadPoolExecutor

    from .progress import progress

    with ThreadPoolExecutor(RANGE_PARALLEL) as pool, progress(total=sum(runs[k][1] for k in todo), unit="B",
                                                          unit_scale=True, desc=label, mininterval=2) as bar:
        def one(k):
            data = src.read(runs[k][0], runs[k][1])
            download.write(k, data)
            bar.update(len(data))

        for future in [pool.submit(one, k) for k in todo]:
            future.result()


def _write_sparse(dest: Path, name: str, plan: dict, chunk_shape: tuple, dtype, coords: np.ndarray, chunks: dict,
                  attrs: dict) -> str:
    """The sparse HDF5: dataset ``name`` of the source's shape with only ``chunks`` written (the
    source's exact bytes); returns the SHA-256 of those bytes in chunk order."""
    import h5py

    digest = hashlib.sha256()
    with atomic_output(dest) as tmp, h5py.File(tmp, "w") as f:
        out = f.create_dataset(name, shape=tuple(int(n) for n in plan["shape"]), dtype=dtype, chunks=chunk_shape)
        for i, coord in enumerate(coords.tolist()):
            out.id.write_direct_chunk(tuple(coord), chunks[i])
            digest.update(chunks[i])
        out.attrs["braid_sparse"] = json.dumps(attrs)
    return digest.hexdigest()


def fetch_betas_roi(source: str, key: str, dest, mask_zyx: np.ndarray, gap_chunks: int | None = None, **s3) -> dict:
    """Fetch only the chunks of the ROI's voxels of one betas file into a sparse local HDF5.

    ``dest`` gets ``/betas`` with the source's shape, dtype and chunking, so that masking it
    equals masking the whole file. The source must keep one voxel per unfiltered chunk (NSD's
    layout); otherwise the whole object is downloaded. Chunks fewer than ``gap_chunks`` chunks
    apart are fetched in one request: a few percent more data, fewer requests.
    """
    from .hdf5_ranges import LayoutError

    def locate(meta, ds):
        if ds.layout != "chunked" or ds.chunk_shape != (ds.shape[0], 1, 1, 1):
            raise LayoutError(f"layout {ds.layout}, chunks {ds.chunk_shape}")
        if ds.shape[1:] != mask_zyx.shape:
            raise BraidError(f"{key}: betas volume (Z, Y, X) = {ds.shape[1:]} but the ROI is "
                             f"{mask_zyx.shape[::-1]} as (X, Y, Z); same subject and resolution?")
        coords = np.argwhere(mask_zyx)
        coords = np.c_[np.zeros(len(coords), np.int64), coords]
        return coords, meta.chunk_addresses(ds, coords), ds.chunk_shape

    return _fetch_sparse(source, key, dest, "betas", locate, np.packbits(mask_zyx).tobytes() + str(mask_zyx.shape).encode(),
                         GAP_CHUNKS if gap_chunks is None else gap_chunks, "roi", **s3)


def fetch_stimuli_rows(source: str, key: str, dest, nsd_ids: np.ndarray, **s3) -> dict:
    """Fetch only the ``imgBrick`` rows ``nsd_ids`` into a sparse local HDF5 of the same shape."""
    from .hdf5_ranges import LayoutError

    ids = np.unique(np.asarray(nsd_ids, np.int64))

    def locate(meta, ds):
        if ids.size and ids.max() >= ds.shape[0]:
            raise BraidError(f"{key}: imgBrick has {ds.shape[0]} images; asked for id {ids.max()}")
        row = (1, *ds.shape[1:])
        coords = np.zeros((ids.size, len(ds.shape)), np.int64)
        coords[:, 0] = ids
        if ds.layout == "contiguous":
            return coords, ds.address + ids * int(np.prod(row)) * ds.dtype.itemsize, row
        if ds.chunk_shape != row:
            raise LayoutError(f"chunks {ds.chunk_shape}")
        return coords, meta.chunk_addresses(ds, coords), row

    return _fetch_sparse(source, key, dest, "imgBrick", locate, ids.tobytes(), 0, "rows", **s3)
