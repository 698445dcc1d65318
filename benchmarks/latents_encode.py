"""Benchmark: caching VAE latents, BRAID's encoder vs the per-image fp32 loop a typical script writes.

    .venv/bin/python benchmarks/latents_encode.py [--images 8] [--device auto] [--dtypes float32 bfloat16]
                                                  [--batch-size 8] [--compile] [--workdir DIR]

Both run on the real SDXL VAE architecture (SSD-1B's VAE: 83.7 M parameters, random weights
built from ``braid.models.SDXL_VAE_CONFIG``, saved in the Hugging Face layout), at 512 px, on
NSD-sized 425x425 uint8 images stored as an ``imgBrick`` HDF5:

  naive    for each image: read its row, PIL bicubic resize, to tensor, vae.encode in float32,
           posterior mean x scaling factor, to numpy                                  <- baseline
  braid    braid.latents.update_cache: batches, the next batch read and resized in a background
           thread, channels_last, the given dtype (and torch.compile on a GPU with --compile),
           appended to a Zarr cache with commits

Each method runs once untimed on one batch of ``--batch-size`` images (warm-up at the timed shape:
allocation, cuDNN autotuning), then timed over ``--images``. With ``--compile`` (GPU), the compiled
rows time whole jobs: "cold" is a job that compiles (its last, partial batch is padded, so it
compiles once), "warm" a second job in the same process with inductor's caches filled (the
steady rate); "cold" minus "warm" is what compiling costs a job, and the break-even image count
says whether it pays at a subject's 10,000 images. Prints images/s and the ratio to the baseline, and the
largest difference of BRAID's latents from the baseline's (bf16 differs by its precision).
Timings depend on the machine; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from braid.gpu_check import load_vae_float32, naive_encode, write_stimuli

SIZE = 512


def build_vae_folder(folder: Path) -> Path:
    """The SDXL VAE architecture with random weights, as ``<folder>/vae`` (what load_vae reads)."""
    import torch
    from diffusers import AutoencoderKL

    from braid.models import SDXL_VAE_CONFIG

    if not (folder / "vae" / "config.json").is_file():
        torch.manual_seed(0)
        AutoencoderKL(**SDXL_VAE_CONFIG).save_pretrained(folder / "vae")
    return folder


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def naive(stimuli: Path, folder: Path, ids: np.ndarray, device: str) -> np.ndarray:
    """What a typical script does: load the VAE, then one image at a time, float32."""
    return naive_encode(stimuli, load_vae_float32(folder, device), ids, SIZE, device)


def braid_encode(stimuli: Path, folder: Path, ids: np.ndarray, device: str, dtype: str, batch_size: int,
                 compile: bool, store: Path) -> np.ndarray:
    from braid.latents import LatentCache, update_cache

    update_cache(stimuli, folder, ids, store, image_size=SIZE, device=device, dtype=dtype, batch_size=batch_size,
                 compile=compile)
    return LatentCache(store).get(ids)


def timed(fn, device: str):
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--warmup", type=int, help="warm-up images (default: one batch, the timed shape)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--compile", action="store_true", help="also time BRAID with torch.compile (GPU only)")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args()

    import torch

    from braid.device import resolve_device

    device = resolve_device(args.device)
    args.warmup = args.warmup or args.batch_size
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        folder = build_vae_folder(tmp / "sdxl-vae")
        stimuli = tmp / "nsd_stimuli.hdf5"
        write_stimuli(stimuli, args.warmup + 2 * args.images)
        warm, ids = np.arange(args.warmup), np.arange(args.warmup, args.warmup + args.images)
        more = np.arange(args.warmup + args.images, args.warmup + 2 * args.images)
        name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
        print(f"SDXL VAE (random weights) at {SIZE}px, {args.images} images, {device} ({name}), torch {torch.__version__}")

        naive(stimuli, folder, warm, device)
        ref, t_naive = timed(lambda: naive(stimuli, folder, ids, device), device)
        rows = [("naive per-image float32 loop (baseline)", t_naive, 0.0)]
        for k, dtype in enumerate(args.dtypes):
            store = tmp / f"cache-{k}.zarr"
            braid_encode(stimuli, folder, warm, device, dtype, args.batch_size, False, store)  # warm-up, cached ids
            z, t = timed(lambda: braid_encode(stimuli, folder, ids, device, dtype, args.batch_size, False, store), device)
            rows.append((f"braid {dtype}, batch {args.batch_size}, channels_last", t,
                         float(np.abs(z - ref).max() / np.abs(ref).max())))
            if args.compile and device.startswith("cuda"):
                store = tmp / f"cache-{k}-compiled.zarr"
                z, cold = timed(lambda: braid_encode(stimuli, folder, ids, device, dtype, args.batch_size, True, store),
                                device)
                err = float(np.abs(z - ref).max() / np.abs(ref).max())
                rows.append((f"braid {dtype}, compiled, cold job (compiles once)", cold, err))
                _, warm_t = timed(lambda: braid_encode(stimuli, folder, more, device, dtype, args.batch_size, True,
                                                       store), device)
                rows.append((f"braid {dtype}, compiled, warm job (steady rate)", warm_t, err))
                eager_per, warm_per = t / args.images, warm_t / args.images
                overhead = max(cold - warm_t, 0.0)
                even = overhead / (eager_per - warm_per) if eager_per > warm_per else float("inf")
                print(f"{dtype}: compiling costs a job {overhead:.1f} s; it pays from {even:,.0f} images "
                      f"({'pays' if even < 10_000 else 'does not pay'} at a subject's 10,000)")

    print(f"{'method':58s} {'wall s':>8s} {'img/s':>8s} {'vs naive':>9s} {'max |dz|/max|z|':>16s}")
    for label, t, err in rows:
        print(f"{label:58s} {t:8.2f} {args.images / t:8.2f} {t_naive / t:8.2f}x {err:16.2e}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "images": args.images, "rows": [
            {"method": label, "wall_s": t, "images_per_s": args.images / t, "speedup": t_naive / t, "rel_err": err}
            for label, t, err in rows]}, indent=1))


if __name__ == "__main__":
    from braid.common import exit_on_sigterm

    exit_on_sigterm()  # a killed run removes its temporary folder
    sys.exit(main())
