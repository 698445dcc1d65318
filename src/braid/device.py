"""Which device a job computes on, and optimisations that must never kill a job.

:func:`resolve_device` turns the config's ``device`` into a torch device and refuses what would
waste a GPU allocation: a job that the scheduler gave a GPU (SLURM's GPU variables, or
``CUDA_VISIBLE_DEVICES`` naming a device) but whose torch cannot use it stops at once, with the
CUDA version torch was built for, the node's driver and what to do, instead of running for hours
on the CPU. A machine with no GPU at all runs on the CPU (the demo), with a warning on the rules
that would use a GPU. :func:`compile_or_eager` runs ``torch.compile``'d code and falls back to
eager, with one warning, when compilation fails (no C compiler, an unsupported GPU).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess

from .common import BraidError

log = logging.getLogger(__name__)

# Variables a scheduler sets when it gives a job GPUs (SLURM: --gpus / --gres=gpu), and the
# CUDA runtime's own list of visible devices.
# SLURM sets lists of GPU indices ("0", "0,1") and counts ("1") for a job given --gpus/--gres=gpu;
# a count of "0" means none, an index "0" is the first GPU.
SLURM_GPU_INDICES = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "GPU_DEVICE_ORDINAL")
SLURM_GPU_COUNTS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS")
NO_DEVICE = ("", "-1", "none", "nodevfiles", "void")

CUDA12_LOCK = "envs/requirements-cu12.lock.txt"


def allocated_gpus(environ=None) -> dict[str, str]:
    """The variables by which the scheduler says that this job has a GPU (empty: none given)."""
    env = os.environ if environ is None else environ
    found = {}
    for var in (*SLURM_GPU_INDICES, *SLURM_GPU_COUNTS):
        value = env.get(var, "").strip()
        if value.lower() not in NO_DEVICE and not (var in SLURM_GPU_COUNTS and value == "0"):
            found[var] = value
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip().lower() not in NO_DEVICE:
        found["CUDA_VISIBLE_DEVICES"] = visible.strip()
    return found


def driver_version() -> str | None:
    """The NVIDIA driver of this node, if it can be read (``/proc/driver/nvidia/version`` or nvidia-smi)."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            for word in f.readline().split():
                if word[:1].isdigit() and "." in word:
                    return word
    except OSError:
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
            return out.splitlines()[0].strip() if out else None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def unusable_gpu_message(allocated: dict[str, str], torch_cuda: str | None, driver: str | None) -> str:
    given = ", ".join(f"{k}={v}" for k, v in allocated.items())
    built = f"CUDA {torch_cuda}" if torch_cuda else "no CUDA (a CPU-only build)"
    return (
        f"this job was given a GPU ({given}) but torch cannot use it: torch is built for {built}, and the node's "
        f"NVIDIA driver is {driver or 'unknown (no /proc/driver/nvidia/version, no nvidia-smi)'}. CUDA 13 builds "
        "need driver R580 or newer, CUDA 12 builds R525 or newer. Install the torch build for this driver "
        f"(e.g. `pip install -r {CUDA12_LOCK}` for CUDA 12), run with `--sdm apptainer` and "
        "`--apptainer-args --nv` if the job runs in a container, or set config on_unusable_gpu: cpu to run "
        "on the CPU knowingly (hours per GPU job at real sizes)."
    )


def resolve_device(name: str = "auto", gpu_rule: bool = True, on_unusable_gpu: str = "fail", environ=None) -> str:
    """The torch device for config ``device``: 'auto' is 'cuda' when torch sees a GPU, else 'cpu'.

    With 'auto', a job that the scheduler gave a GPU which torch cannot use raises a
    :class:`BraidError` naming torch's CUDA build and the driver (``on_unusable_gpu: cpu``: a
    warning, and the CPU); a job on a machine without a GPU runs on the CPU, with a warning when
    it is a ``gpu_rule``. 'cuda' and 'cuda:N' are checked against what torch sees.
    """
    import torch

    if name == "cpu":
        return name
    available = torch.cuda.is_available()
    if name == "auto":
        if available:
            return "cuda"
        allocated = allocated_gpus(environ)
        if allocated:
            message = unusable_gpu_message(allocated, torch.version.cuda, driver_version())
            if on_unusable_gpu != "cpu":
                raise BraidError(message)
            log.warning("%s Running on the CPU (config on_unusable_gpu: cpu).", message.split(": torch")[0])
        elif gpu_rule:
            log.warning("no GPU on this machine: this job runs on the CPU (fine for the demo; at real sizes a GPU "
                        "rule takes hours on a CPU)")
        return "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not available:
            raise BraidError(f"device {name!r} was requested (config key 'device') but torch sees no CUDA GPU "
                             f"(torch built for CUDA {torch.version.cuda}, driver {driver_version() or 'unknown'})")
        index = name.partition(":")[2]
        count = torch.cuda.device_count()
        if index and (not index.isdigit() or int(index) >= count):
            raise BraidError(f"device {name!r} (config key 'device'): this job sees {count} GPU(s), "
                             f"cuda:0..cuda:{count - 1}; SLURM numbers a job's GPUs from 0")
        return name
    raise BraidError(f"device {name!r} (config key 'device') is not auto, cpu, cuda or cuda:N")


def device_of(config: dict, gpu_rule: bool = True) -> str:
    """:func:`resolve_device` with the workflow config's ``device`` and ``on_unusable_gpu``."""
    return resolve_device(config.get("device", "auto"), gpu_rule, config.get("on_unusable_gpu", "fail"))


def precision(device: str, autocast: bool) -> str:
    """The arithmetic an encoder trains in: bf16 autocast on CUDA when asked, float32 otherwise."""
    return "bfloat16-autocast" if autocast and str(device).startswith("cuda") else "float32"


class compile_or_eager:
    """Call ``torch.compile(fn)``; if compiling fails (at the first call, where torch compiles),
    warn once and call ``fn`` eagerly from then on. An optimisation never kills a job.

    ``dynamic=False``: callers keep one input shape (pad the last batch) so that it compiles once.
    """

    def __init__(self, fn, enabled: bool = True, **options):
        import torch

        self.eager = fn
        self.compiled = torch.compile(fn, dynamic=False, **options) if enabled else None
        self.fell_back: str | None = None

    @property
    def active(self) -> bool:
        return self.compiled is not None

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as err:  # inductor/triton raise many types (BackendCompilerFailed, CalledProcessError...)
            self.compiled = None
            self.fell_back = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            log.warning("torch.compile failed (%s); running eagerly instead (same results, not sped up). "
                        "A C compiler (gcc) is needed for compiled code: install one, or set model.compile: false.",
                        self.fell_back[:300])
            return self.eager(*args, **kwargs)
