"""What each stage's job holds in memory, from the sizes of its data and model: the ``mem_mb`` the
rules ask SLURM (or a local ``--resources mem_mb=``) for.

Each estimate is a sum of the arrays and weights the stage keeps at once (named in each function),
plus the interpreter and its libraries (``BASE_MB``, ``TORCH_MB``), times ``MARGIN``; rounded up to
a multiple of 256 MB. The rules measure sizes from their inputs once those exist (SLURM jobs are
sized when they are submitted, after the jobs before them have written their outputs); a dry run
before that shows the estimate from the config (``*_fallback`` values in common.smk).
Runtimes are not derived here: they depend on the hardware; see README's resource table.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

MB = 1 << 20
BASE_MB = 600  # python, numpy, pandas, zarr, h5py
TORCH_MB = 1500  # + torch (CPU), diffusers, transformers; CUDA's context is on the GPU
MARGIN = 1.3
# a VAE at full resolution holds this much per image pixel at its peak (activations of its
# 128-512-channel convolutions): measured by the rehearsal at 512 px, 572 bytes encoding in
# bfloat16 and 860 decoding; float32 encoding needs about twice the first
VAE_BYTES_PER_PIXEL = 1024


def _round(mb: float) -> int:
    return int(math.ceil(mb * MARGIN / 256) * 256)


def mlp_parameters(n_in: int, n_out: int, hidden: list[int]) -> int:
    """Linear (weights + bias) per layer, LayerNorm (scale + shift) per hidden layer."""
    total, width = 0, n_in
    for h in hidden:
        total += width * h + h + 2 * h
        width = h
    return total + width * n_out + n_out


def encoder_parameters(arch: dict, n_in: int, n_out: int) -> int:
    """Parameters of braid.encoder's network for an ``architecture()`` dict."""
    if arch["type"] == "lowrank":
        return n_in * arch["rank"] + arch["rank"] * n_out + n_out
    return mlp_parameters(n_in, n_out, list(arch["hidden"]))


def betas_mask_mb(sessions: int, trials_per_session: int, n_voxels: int, average: bool = False) -> int:
    return _round(BASE_MB + betas_mask_bytes(sessions, trials_per_session, n_voxels, average) / MB)


def betas_mask_bytes(sessions: int, trials_per_session: int, n_voxels: int, average: bool = False) -> int:
    """The masking stage's arrays at their peak. One session at a time: its int16 chunks (read,
    then joined), their float32 copy, the first session kept until the statistics are known, the
    temporaries of normalising, and the compressed, checksummed copy of each chunk written: 48
    bytes per trial and voxel (40 measured with tracemalloc, tests/test_resources.py);
    per-session statistics; when averaging repeats, one float32 running sum per image (at most
    one per trial)."""
    sums = sessions * trials_per_session * n_voxels * 4 if average else 0
    return 48 * trials_per_session * n_voxels + 2 * sessions * n_voxels * 4 + sums


def encoder_train_mb(trials: int, n_voxels: int, latent_dim: int, n_params: int) -> int:
    """Betas (float32, and their z-scored copy), latents (float32, and their z-scored copy),
    the network with its gradients and Adam's two moments (4 x float32), and the predictions."""
    data = 2 * trials * n_voxels * 4 + 3 * trials * latent_dim * 4
    return _round(TORCH_MB + (data + 4 * 4 * n_params) / MB)


def ridge_path_mb(trials: int, n_voxels: int, latent_dim: int) -> int:
    """braid.encoder.RidgePath in float64: the data, the Gram matrix and its eigenvectors
    (k = min(trials, voxels), twice), the n x k and p x k factors, k x latents coefficients, and
    the final voxels x latents weights (float64, and their float32 copy: 3.1 GB for nsdgeneral at
    512 px, which the rehearsal found missing here)."""
    k = min(trials, n_voxels)
    floats = trials * n_voxels + 2 * k * k + trials * k + n_voxels * k + k * latent_dim + trials * latent_dim
    return _round(TORCH_MB + (8 * floats + 12 * n_voxels * latent_dim) / MB)


def model_job_mb(weights_bytes: int, images: int = 0, image_size: int = 0, per_pixel: int = 12) -> int:
    """A job that loads weights from disk: they pass through host memory once more while loading
    (safetensors read, dtype cast), plus a batch of ``images``, ``per_pixel`` bytes per pixel at its
    peak: 12 for a float32 RGB batch, :data:`VAE_BYTES_PER_PIXEL` for a VAE encoding or decoding it."""
    return _round(TORCH_MB + (2 * weights_bytes + images * per_pixel * image_size**2) / MB)


def weights_bytes(path: str | os.PathLike, variant: str | None = None) -> int | None:
    """Bytes of the weight files under ``path`` that a load reads (only ``variant``'s, e.g.
    ``*.fp16.safetensors``, where the folder has them); None while ``path`` does not exist."""
    root = Path(path)
    if not root.exists():
        return None
    files = [f for pat in ("*.safetensors", "*.bin", "*.pth", "*.pt") for f in root.rglob(pat) if f.is_file()]
    if variant and any(f".{variant}." in f.name for f in files):
        files = [f for f in files if f".{variant}." in f.name]
    return sum(f.stat().st_size for f in files)


def roi_voxels(roi_files: dict[str, str], labels: dict[str, list[int]]) -> int | None:
    """Voxels in the union of the ROIs (ROI name -> file; a voxel counts if its value is one of the
    name's labels); None while a file is missing.

    Snakemake calls this for every job at each scheduling pass: the count is kept per files'
    (path, size, mtime) and labels, so each volume is read once until it changes.
    """
    if not roi_files or not all(Path(f).exists() for f in roi_files.values()):
        return None
    key = []
    for name, f in sorted(roi_files.items()):
        stat = os.stat(f)
        key.append((name, str(f), stat.st_size, stat.st_mtime_ns, tuple(int(v) for v in labels[name])))
    return _roi_voxels(tuple(key))


@functools.lru_cache(maxsize=32)
def _roi_voxels(files: tuple) -> int:
    import nibabel as nib
    import numpy as np

    union = None
    for _, f, _, _, labels in files:
        part = np.isin(np.asanyarray(nib.load(f).dataobj), labels)
        union = part if union is None else (union | part)
    return int(union.sum())


def session_trials(path: str | os.PathLike) -> int | None:
    """Trials in one NSD betas file (its dataset's first dimension), None if it is missing."""
    if not Path(path).exists():
        return None
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return int(f["betas"].shape[0])
    except (OSError, KeyError):
        return None


def zarr_shape(array_dir: str | os.PathLike) -> tuple[int, ...] | None:
    """The shape in a Zarr v3 array's ``zarr.json``, None if it is not written yet."""
    meta = Path(array_dir) / "zarr.json"
    if not meta.exists():
        return None
    return tuple(json.loads(meta.read_text())["shape"])
