"""Jobs that SLURM can never start: found before submission and while pending, and stopped with a
message that names the rule and the resource, instead of a run that waits forever.

SLURM refuses some impossible requests at ``sbatch`` (more memory than any node, an unknown
partition), but it accepts others and leaves them pending for ever: more CPUs than any node of
the partition (reason ``PartitionConfig``), nodes that are down or reserved (``ReqNodeNotAvail``),
limits of the partition or the account. Snakemake's SLURM executor only sees "pending" and waits.

BRAID checks twice, from the Snakemake process on the submit host (see ``workflow/rules/common.smk``):

* :func:`preflight` before the first submission: every cluster job of the run against the
  partitions' largest nodes (``sinfo``): partition, CPUs, GPUs, and memory where the job's inputs
  exist (memory sized from inputs that are not written yet is an estimate; SLURM decides later).
* :class:`Watchdog` while the run lasts: this run's pending jobs (``squeue``: same user, same
  working directory, a Snakemake rule comment) whose reason means "never" are cancelled, which
  fails the Snakemake job at its next status check, and the reason is logged, naming rule and resource.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import subprocess
import threading
from pathlib import Path

from .common import BraidError

log = logging.getLogger("braid")

# pending reasons that do not clear by waiting for other jobs to finish
NEVER_REASONS = (
    "PartitionConfig",  # the request exceeds every node of the partition
    "PartitionNodeLimit",
    "PartitionTimeLimit",
    "ReqNodeNotAvail",  # the nodes it could use are down, drained or reserved
    "BadConstraints",
    "InvalidAccount",
    "InvalidQOS",
    "AssocMaxCpuPerJobLimit",
    "AssocMaxMemPerJobLimit",
    "AssocMaxGRESPerJob",
    "AssocMaxWallDurationPerJobLimit",
    "QOSMaxCpuPerJobLimit",
    "QOSMaxMemoryPerJob",
    "QOSMaxGRESPerJob",
    "QOSMaxWallDurationPerJobLimit",
)
FIX = ("lower it in your profile (set-threads: <rule>: N, or max-threads: N for every rule; set-resources: "
       "<rule>: {mem_mb: ..., gpu: ...}), or send the rule to a partition whose nodes are large enough "
       "(set-resources: <rule>: {slurm_partition: ...})")


@dataclasses.dataclass(frozen=True)
class Partition:
    """The largest node of a partition: what one job in it can ever get."""

    name: str
    cpus: int
    mem_mb: int
    gpus: int
    default: bool = False


def parse_sinfo(text: str) -> dict[str, Partition]:
    """Partitions from ``sinfo -h -N -o '%P|%c|%m|%G'`` (one line per node and partition)."""
    parts: dict[str, Partition] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, cpus, mem, gres = (f.strip() for f in line.split("|")[:4])
        default = name.endswith("*")
        name = name.rstrip("*")
        gpus = sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:(,]+)?:(\d+)", gres))
        old = parts.get(name)
        parts[name] = Partition(name, max(int(cpus.rstrip("+")), old.cpus if old else 0),
                                max(int(mem.rstrip("+")), old.mem_mb if old else 0),
                                max(gpus, old.gpus if old else 0), default or (old.default if old else False))
    return parts


def cluster_partitions() -> dict[str, Partition]:
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%P|%c|%m|%G"], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise BraidError(f"sinfo failed ({err}): is this a SLURM submit host?") from err
    return parse_sinfo(out)


def problems(rule: str, request: dict, partitions: dict[str, Partition]) -> list[str]:
    """Why a job of ``rule`` with ``request`` (slurm_partition, cpus, mem_mb, gpus; any may be None)
    can never start on these partitions; empty if it can."""
    name = request.get("slurm_partition")
    if name and name not in partitions:
        return [f"rule {rule}: partition {name!r} (slurm_partition) does not exist; this cluster has "
                f"{', '.join(sorted(partitions))}"]
    part = partition_of(name, partitions)
    if part is None:
        return []
    out = []
    for key, have, unit, label in (("cpus", part.cpus, "CPUs", "threads / cpus_per_task"),
                                   ("mem_mb", part.mem_mb, "MB", "mem_mb"), ("gpus", part.gpus, "GPUs", "gpu")):
        want = request.get(key)
        if want is not None and int(want) > have:
            out.append(f"rule {rule}: asks for {int(want)} {unit} ({label}), but the largest node of "
                       f"partition {part.name!r} has {have} {unit}")
    return out


def partition_of(name: str | None, partitions: dict[str, Partition]) -> Partition | None:
    """The partition a job goes to: the one it names, else the cluster's default (None if unknown)."""
    if name:
        return partitions.get(name)
    return next((p for p in partitions.values() if p.default), None)


def fit_threads(jobs, partitions: dict[str, Partition]) -> dict[str, tuple[int, int, str]]:
    """Rules whose jobs ask for more threads than the largest node of their partition has:
    rule -> (threads asked, threads that fit, partition). Threads set the speed of a job, not its
    result, so they are fitted to the node, as Snakemake fits them to ``--cores`` on one machine.
    A job that sets ``cpus_per_task`` is submitted as asked (and :func:`preflight` names it)."""
    fits: dict[str, tuple[int, int, str]] = {}
    for job in jobs:
        res = job.resources
        part = partition_of(res.get("slurm_partition"), partitions)
        if part is None or res.get("cpus_per_task") is not None or job.threads <= part.cpus:
            continue
        asked, cap, _ = fits.get(job.rule.name, (0, part.cpus, part.name))
        fits[job.rule.name] = (max(asked, job.threads), min(cap, part.cpus), part.name)
    return fits


def fit_message(fits: dict[str, tuple[int, int, str]]) -> str:
    rules = ", ".join(f"{rule} ({asked} -> {cap}, partition {part!r})" for rule, (asked, cap, part) in sorted(fits.items()))
    return (f"threads fitted to the largest node of each partition: {rules}. Threads change a job's speed, not its "
            "results; to choose them yourself, set set-threads (or max-threads) in your profile.")


def job_request(job) -> dict:
    """A Snakemake job's SLURM request, as the executor will submit it."""
    res = job.resources

    def number(key):
        value = res.get(key)
        return value if isinstance(value, int) else None

    part = res.get("slurm_partition")
    cpus = number("cpus_per_task") or job.threads
    return {"slurm_partition": str(part) if part else None, "cpus": cpus, "mem_mb": number("mem_mb"),
            "gpus": number("gpu")}


def preflight(jobs, partitions: dict[str, Partition], check_memory=lambda job: True) -> None:
    """Raise one BraidError listing every job that no node could ever run."""
    found: dict[str, None] = {}
    for job in jobs:
        req = job_request(job)
        if not check_memory(job):
            req["mem_mb"] = None
        for p in problems(job.rule.name, req, partitions):
            found[p] = None
    if found:
        raise BraidError("SLURM could never start these jobs:\n  " + "\n  ".join(found) + f"\nTo fix: {FIX}.")


@dataclasses.dataclass(frozen=True)
class Pending:
    job_id: str
    comment: str
    reason: str
    partition: str
    cpus: int
    mem_mb: int | None
    gpus: int
    workdir: str

    @property
    def rule(self) -> str:
        m = re.match(r"rule_(.+?)(?:_wildcards_(.*))?$", self.comment)
        return m.group(1) if m else self.comment

    @property
    def wildcards(self) -> str:
        m = re.match(r"rule_.+?_wildcards_(.*)$", self.comment)
        return m.group(1) if m else ""


SQUEUE_FORMAT = "JobID:|,Comment:|,Reason:|,Partition:|,NumCPUs:|,MinMemory:|,tres-per-job:|,tres-per-node:|,WorkDir:|"


def _mem_mb(text: str) -> int | None:
    m = re.fullmatch(r"([\d.]+)([KMGT]?)", text.strip())
    if not m:
        return None
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[m.group(2)]
    return int(float(m.group(1)) * scale)


def _gpus(*tres: str) -> int:
    return sum(int(m.group(1)) for t in tres for m in re.finditer(r"gpu(?::[^:,]+)?:(\d+)", t))


def parse_squeue(text: str) -> list[Pending]:
    """Pending jobs from ``squeue -h -t PD -O SQUEUE_FORMAT``."""
    out = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split("|")]
        if len(fields) < 9 or not fields[0]:
            continue
        jid, comment, reason, part, cpus, mem, per_job, per_node, workdir = fields[:9]
        out.append(Pending(jid, comment, reason, part, int(cpus) if cpus.isdigit() else 0, _mem_mb(mem),
                           _gpus(per_job, per_node), workdir))
    return out


def explain(job: Pending, partitions: dict[str, Partition]) -> str:
    """One message for a job that SLURM will never start: rule, wildcards, reason, the resource."""
    where = f" ({job.wildcards})" if job.wildcards else ""
    found = problems(job.rule, {"slurm_partition": job.partition, "cpus": job.cpus, "mem_mb": job.mem_mb,
                                "gpus": job.gpus}, partitions)
    detail = "; ".join(p.split(": ", 1)[1] for p in found) or (
        f"it asks for {job.cpus} CPUs, {job.mem_mb} MB and {job.gpus} GPUs in partition {job.partition!r}")
    return (f"SLURM job {job.job_id} of rule {job.rule}{where} can never start: pending with reason "
            f"{job.reason}; {detail}. Cancelled it; {FIX}.")


def never_starts(job: Pending) -> bool:
    return job.comment.startswith("rule_") and any(job.reason.startswith(r) for r in NEVER_REASONS)


class Watchdog(threading.Thread):
    """Polls ``squeue`` for this run's pending jobs; cancels those that can never start.

    A job must show a "never" reason at two polls in a row (``ReqNodeNotAvail`` can be a moment's
    state while a node comes back). ``messages`` keeps what was reported, for the caller and tests.
    """

    def __init__(self, workdir: str | Path, interval: float = 5.0, report=log.error):
        super().__init__(name="braid-slurm-watchdog", daemon=True)
        self.workdir = str(Path(workdir).resolve())
        self.interval = interval
        self.report = report
        self.messages: list[str] = []
        self._stop_event = threading.Event()
        self.suspects: set[str] = set()
        self._partitions: dict[str, Partition] | None = None

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                self.poll()
            except Exception as err:  # a watchdog must never take the run down
                log.debug("braid slurm watchdog: %s", err)

    def poll(self) -> None:
        out = subprocess.run(["squeue", "--me", "-h", "-t", "PD", "-O", SQUEUE_FORMAT], capture_output=True,
                             text=True, timeout=60).stdout
        hopeless = {j.job_id: j for j in parse_squeue(out)
                    if never_starts(j) and str(Path(j.workdir).resolve()) == self.workdir}
        for jid, job in hopeless.items():
            if jid not in self.suspects:
                continue
            if self._partitions is None:
                self._partitions = cluster_partitions()
            msg = explain(job, self._partitions)
            subprocess.run(["scancel", jid], capture_output=True, timeout=60)
            self.messages.append(msg)
            self.report(msg)
        self.suspects = set(hopeless)

