"""Helpers every stage uses: atomic outputs, logging for Snakemake scripts, devices, subjects.

Kept small on purpose: anything stage-specific lives in that stage's module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Iterator

log = logging.getLogger("braid")


class BraidError(RuntimeError):
    """An error a user can act on: the message names the file, key or value and what to do."""


def subject_label(subject: int) -> str:
    """NSD's 1-based subject label: 1 -> 'subj01'."""
    if not 1 <= int(subject) <= 8:
        raise BraidError(f"subject {subject!r} is outside NSD's subjects 1..8")
    return f"subj{int(subject):02d}"


def subject_number(label: str) -> int:
    """'subj01' -> 1 (inverse of :func:`subject_label`)."""
    if not (label.startswith("subj") and label[4:].isdigit()):
        raise BraidError(f"subject label {label!r} is not of the form 'subjNN'")
    return int(label[4:])


def store_path(path: str | os.PathLike) -> Path:
    """The Zarr store of a rule's ``zarr.json`` input/output (see ``zarr_store`` in common.smk); other paths as is."""
    path = Path(path)
    return path.parent if path.name == "zarr.json" else path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds.

    Works for files and directories (a Zarr store, a pipeline folder). A failure or a kill
    leaves at most a ``.tmp-*`` sibling, never a half-written ``path`` that a rerun would trust.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield tmp
        if tmp.is_file():
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # some writers (safetensors) create files 0600
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def file_lock(lockfile: str | os.PathLike, wait: bool, busy: str = "", remove: bool = False) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lockfile`` for the block.

    ``wait``: block until the holder is done (logging that it waits); otherwise raise a
    :class:`BraidError` with ``busy``. The operating system releases the lock when its holder
    dies, so a crash never leaves it held. ``remove`` deletes the file on release: safe only
    where nobody waits on it (``wait=False`` everywhere), since a waiter would hold a lock on a
    file that a newcomer no longer sees.
    """
    import fcntl

    lockfile = Path(lockfile)
    lockfile.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lockfile, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not wait:
            os.close(fd)  # the holder's file stays
            raise BraidError(busy or f"{lockfile} is held by another process") from None
        log.info("waiting for %s (held by another job)", lockfile)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as err:  # no flock on this file system: what this lock protects cannot be shared safely
        os.close(fd)
        raise BraidError(f"{lockfile}: cannot lock ({err.strerror}); jobs that share this file need locks. On "
                         "Lustre, mount with -o flock, or keep the working directory on a file system with locks "
                         "(NFS v4, a local disk)") from None
    try:
        yield
    finally:
        if remove:
            lockfile.unlink(missing_ok=True)
        os.close(fd)  # closing releases the lock


def history_log(logfile: str | os.PathLike) -> Path:
    """Where every attempt of a job is logged: ``x.log`` -> ``x.history.log`` beside it."""
    logfile = Path(logfile)
    return logfile.with_name(f"{logfile.stem}.history{logfile.suffix or '.log'}")


def setup_logging(logfile: str | os.PathLike | None = None, level: int = logging.INFO) -> None:
    """Log to ``logfile`` (Snakemake's ``log:``), to its :func:`history_log`, and to stderr.

    Snakemake deletes a job's ``log:`` file before every attempt (retries and reruns), so the
    messages are also appended to the history file, which it does not know of: the log of an
    attempt that failed, or was killed, is kept there above the next one's.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if logfile:
        Path(logfile).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(logfile, mode="w"))
        handlers.append(logging.FileHandler(history_log(logfile), mode="a"))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    logging.captureWarnings(True)


@contextlib.contextmanager
def snakemake_job(smk, offline: bool = True) -> Iterator[None]:
    """Run a rule's script body with logging to its ``log:`` file; errors are logged, then re-raised
    (a :class:`BraidError`, whose message says what to do, as exit status 1 without a traceback).

    tqdm progress bars write to stderr, which Snakemake shows locally and SLURM keeps in its
    job log; the ``log:`` file gets the messages. With ``offline`` (every rule but the model
    download) the Hugging Face hub is switched off for the job (``HF_HUB_OFFLINE=1``), so that
    a compute node without internet loads from the fetched folder and never tries the network.
    """
    import socket

    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"

    os.environ["BRAID_RULE"] = str(smk.rule)  # the writers record it (braid.integrity)
    logfile = smk.log[0] if len(smk.log) else None
    setup_logging(logfile)
    use_threads(int(getattr(smk, "threads", 1) or 1))
    log.info("==== rule %s, attempt %s, on %s (pid %d): wildcards %s", smk.rule, getattr(smk, "attempt", 1),
             socket.gethostname(), os.getpid(), dict(smk.wildcards.items()))
    try:
        check_library(Path(smk.scriptdir).parent / "src" / "braid")  # scripts/ beside src/
        with output_lock(list(getattr(smk, "output", [])), str(smk.rule)):
            yield
    except BraidError as err:
        # a message a user acts on: logged once (to the log file and stderr), without a traceback
        log.error("%s", err)
        raise SystemExit(1) from None
    except Exception:
        log.exception("rule %s failed", smk.rule)
        raise


LOCKS = Path(".braid", "locks")  # in the working directory, beside .snakemake/


@contextlib.contextmanager
def output_lock(outputs: list[str], rule: str, folder: str | os.PathLike = LOCKS) -> Iterator[None]:
    """Hold an exclusive lock on a job's ``outputs`` while it runs; refuse a second writer.

    A Snakemake killed with ``kill -9`` leaves its jobs running, and after ``--unlock`` a rerun
    would start the same job again, two writers of the same files. The lock file (one per set of
    outputs, in ``folder``) records the holder's PID, host and start; the operating system
    releases the lock when the holder ends, however it ends.
    """
    import fcntl
    import hashlib
    import json
    import socket
    import time

    names = sorted(str(o) for o in outputs)
    if not names:
        yield
        return
    lockfile = Path(folder) / f"{rule}-{hashlib.sha1(chr(10).join(names).encode()).hexdigest()[:16]}.lock"
    lockfile.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lockfile, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = True
    except BlockingIOError:
        held = False
    except OSError as err:  # a file system without flock (Lustre mounted without -o flock): run unguarded
        os.close(fd)
        log.warning("%s: cannot lock (%s); this job runs without the one-writer guard. On Lustre, mount with "
                    "-o flock, or keep the working directory on a file system with locks", lockfile, err.strerror)
        yield
        return
    if not held:
        os.close(fd)
        try:
            holder = json.loads(lockfile.read_text())
        except (OSError, ValueError):
            holder = {}
        pid, host = holder.get("pid", "?"), holder.get("host", "?")
        raise BraidError(
            f"{names[0]}{f' (and {len(names) - 1} more outputs)' if len(names) > 1 else ''} is being written by "
            f"another job of rule {rule}: PID {pid} on host {host}, started {holder.get('started', '?')}. A Snakemake "
            f"that was killed (kill -9, a closed terminal) leaves its jobs running. Let it finish, or end it "
            f"(on {host}: kill {pid}), then `snakemake --unlock` and rerun. Lock file: {lockfile}"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "rule": rule,
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "outputs": names}).encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock


def pythonpath_first(folder: str | os.PathLike) -> None:
    """Put ``folder`` first on ``PYTHONPATH``, which the jobs this process starts inherit."""
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(folder)]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(folder), *rest])


def check_library(expected: str | os.PathLike) -> None:
    """Refuse to run a job whose ``braid`` is not the library of the workflow that scheduled it.

    Snakemake reruns a job when the checkout's ``src/braid`` changes; a job that imported another
    copy (an environment installed from another clone, a pip-installed braid) would run code
    Snakemake does not track. The workflow puts its ``src/`` first on ``PYTHONPATH``; this check
    catches what can still defeat that (``apptainer --cleanenv``, a ``sitecustomize``).
    """
    here = Path(__file__).resolve().parent
    if here != Path(expected).resolve():
        raise BraidError(
            f"this job imported braid from {here}, but the workflow that scheduled it is {Path(expected).resolve()}: "
            "the job would run code that Snakemake does not track. Run snakemake with the workflow's own "
            f"environment, or put {Path(expected).resolve().parent} first on PYTHONPATH (an Apptainer job needs "
            "the environment passed: no --cleanenv)."
        )


def use_threads(n: int) -> None:
    """Tell torch (and OpenMP/BLAS libraries loaded later) to use the job's ``threads``: on a
    SLURM node that is --cpus-per-task; torch would otherwise start one thread per core it sees.
    At most the CPUs the process may run on (its affinity: SLURM's allocation, a taskset)."""
    if hasattr(os, "sched_getaffinity"):  # never more threads than the CPUs this process may run on
        n = max(1, min(n, len(os.sched_getaffinity(0))))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def torch_dtype(name: str):
    import torch

    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise BraidError(f"dtype {name!r} is not one of float32, float16, bfloat16") from None


def exit_on_sigterm() -> None:
    """Make SIGTERM (``kill``, a scheduler's timeout) exit through Python's unwinding, code 143, so
    that ``finally`` blocks and context managers run: temporary folders are removed and servers a
    script started are stopped, instead of being left behind as they are by the default action."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
