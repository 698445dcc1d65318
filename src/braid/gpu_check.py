"""``make gpu-check``: every GPU path of the real configuration, on one GPU, in a few minutes.

    python -m braid.gpu_check [--out results/gpu-check] [--cpu] [--only STEP ...]

Runs BRAID's own code at the real configuration's shapes (SDXL's VAE at 512 px, the seed MLP,
ridge over subj01's nsdgeneral, SSD-1B's UNet and text encoders, the five metric networks),
all with random weights built here, so that it needs no download and works on a compute node
without network. Each step runs in its own process under its own timeout, so one failure does
not hide the rest; the table (``gpu-check.md``) and the figures (``gpu-check.json``) are written
to ``--out`` and printed. The exit code is 1 when any step failed.

Steps: ``environment`` (driver, CUDA, capability, compiler), ``latents`` (latent caching in
bf16, compile off and on, and whether compiling pays at a subject's 10,000 images), ``mlp``
(the seed MLP: epochs/s, peak memory), ``ridge`` (6,750 trials x 15,724 voxels -> 16,384),
``resume`` (a run interrupted at a checkpoint and resumed equals an uninterrupted one, on the
device), ``img2img`` (SSD-1B's architecture at 512 px in float16 and bfloat16: s/step,
images/s, peak memory, finite latents, and PNG hashes of a repeat run), ``metrics`` (PixCorr,
SSIM and the metric networks: images/s).

``--cpu`` runs every step at tiny sizes on the CPU in a minute or two: the test suite runs it
that way, so the check cannot rot. Timings depend on the machine; the goals it is compared with
(``GOALS``) are the project's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("braid.gpu_check")

STEPS = ("environment", "latents", "mlp", "ridge", "resume", "img2img", "metrics")
# each step's limit on a GPU (--timeout-scale multiplies them); together well under the 8 minutes the check aims at
TIMEOUT_S = {"environment": 60, "latents": 300, "mlp": 120, "ridge": 120, "resume": 90, "img2img": 300, "metrics": 180}
SUBJECT_IMAGES = 10_000  # images a subject's latents_encode job encodes (NSD: 10,000 per subject)
GOALS = {
    "latents": "10,000 latents in < 5 min (>= 33 images/s); >= 5x the per-image fp32 loop",
    "mlp": "seed MLP, 200 epochs in < 30 s",
    "img2img": ">= 10 images/s",
    "metrics": "1,000 images' metrics in < 2 min (>= 8.3 images/s)",
}

# Sizes: the real configuration's (GPU) and tiny ones that prove the same code on a CPU.
REAL = dict(
    image_size=512, latent_images=256, latent_batch=32, naive_images=32,
    mlp_trials=6750, mlp_in=4657, mlp_hidden=[2048, 4096], mlp_epochs=10,
    ridge_trials=6750, ridge_voxels=15724,
    resume_trials=2048, resume_in=512, resume_hidden=[256, 512], resume_epochs=6,
    img2img_images=32, img2img_batch=16, steps=25, strength=0.8,
    metric_images=256, metric_batch=64,
)
TINY = dict(
    image_size=64, latent_images=12, latent_batch=4, naive_images=4,
    mlp_trials=256, mlp_in=64, mlp_hidden=[32, 64], mlp_epochs=3,
    ridge_trials=120, ridge_voxels=200,
    resume_trials=96, resume_in=16, resume_hidden=[8], resume_epochs=4,
    img2img_images=4, img2img_batch=2, steps=4, strength=0.5,
    metric_images=6, metric_batch=4,
)
TINY_CLIP = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, patch_size=14,
                 image_size=224, projection_dim=16)


# ---------------------------------------------------------------------------------------------
# Measuring


def sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float | None:
    """Peak GPU memory allocated by torch since :func:`reset_peak` (None on the CPU)."""
    import torch

    if str(device).startswith("cuda"):
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return None


class Timer:
    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.s = time.perf_counter() - self.t0


# ---------------------------------------------------------------------------------------------
# Steps: each returns a dict of figures; an exception fails the step


def step_environment(device: str, size: dict, work: Path) -> dict:
    import torch

    from .device import driver_version

    compiler = next((shutil.which(c) for c in ("gcc", "cc", "clang") if shutil.which(c)), None)
    out = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "driver": driver_version(),
           "compiler": compiler, "python": platform.python_version(), "device": device}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gb=round(props.total_memory / 2**30, 1),
                   sm_count=props.multi_processor_count, bf16=torch.cuda.is_bf16_supported(),
                   cudnn=torch.backends.cudnn.version(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    else:
        out.update(gpu=None, cpu_threads=torch.get_num_threads())
    return out


def _vae_folder(work: Path, size: dict, device: str) -> Path:
    """The SDXL VAE's architecture (random weights) in the HF layout: real at 512 px, tiny on the CPU."""
    import torch
    from diffusers import AutoencoderKL

    from .models import SDXL_VAE_CONFIG, TINY_VAE_CONFIG

    folder = work / "vae-model"
    if not (folder / "vae" / "config.json").is_file():
        torch.manual_seed(0)
        config = SDXL_VAE_CONFIG if size["image_size"] >= 512 else TINY_VAE_CONFIG
        AutoencoderKL(**config).save_pretrained(folder / "vae")
    return folder


def write_stimuli(path: Path, n: int) -> None:
    """NSD-sized 425x425 uint8 images in an ``imgBrick``: smooth random fields (noise upsampled),
    closer to photographs than white noise."""
    import h5py

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, size=(n, 27, 27, 3), dtype=np.uint8)
    with h5py.File(path, "w") as f:
        f.create_dataset("imgBrick", data=np.repeat(np.repeat(small, 16, axis=1), 16, axis=2)[:, :425, :425],
                         chunks=(1, 425, 425, 3))


def step_latents(device: str, size: dict, work: Path) -> dict:
    """braid.latents.update_cache, as a latents_encode job runs it: eager, then compiled twice (the
    first compiled job pays the compilation; the second runs with inductor's caches warm, which
    gives the compiled throughput). Break-even: images at which one job's compilation is repaid."""
    from .latents import LatentCache, update_cache

    folder = _vae_folder(work, size, device)
    n = size["latent_images"]
    stimuli = work / "stimuli.hdf5"
    write_stimuli(stimuli, 3 * n)
    common = dict(image_size=size["image_size"], device=device, dtype="bfloat16", batch_size=size["latent_batch"])
    runs = {}
    for k, (label, comp) in enumerate((("eager", False), ("compiled_first", True), ("compiled_warm", True))):
        ids = np.arange(k * n, (k + 1) * n)
        reset_peak(device)
        with Timer(device) as t:
            update_cache(stimuli, folder, ids, work / f"cache-{label}.zarr", compile=comp, **common)
        runs[label] = {"s": round(t.s, 2), "images_per_s": round(n / t.s, 1), "peak_gb": peak_gb(device)}
        z = LatentCache(work / f"cache-{label}.zarr").get(ids)
        if not np.isfinite(z).all():
            raise RuntimeError(f"{label}: non-finite latents")
    naive_s = _naive_per_image(stimuli, folder, size, device)
    eager, first, warm = (runs[k]["s"] / n for k in ("eager", "compiled_first", "compiled_warm"))
    overhead = max(0.0, (first - warm) * n)
    gain = eager - warm  # seconds saved per image once compiled
    break_even = overhead / gain if gain > 0 else None
    return {"images": n, "batch": size["latent_batch"], "image_size": size["image_size"], "dtype": "bfloat16", **{
        f"{k}_{m}": v for k, r in runs.items() for m, v in r.items()},
        "compile_overhead_s": round(overhead, 1), "compile_speedup": round(eager / warm, 2),
        "break_even_images": None if break_even is None else int(break_even),
        "compile_pays_at_subject": bool(break_even is not None and break_even < SUBJECT_IMAGES),
        "naive_images_per_s": round(1 / naive_s, 1), "eager_vs_naive": round(naive_s / eager, 1),
        "subject_images_min_eager": round(SUBJECT_IMAGES * eager / 60, 1)}


def load_vae_float32(folder: Path, device: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True).to(device).eval()


def naive_encode(stimuli: Path, vae, ids, image_size: int, device: str) -> np.ndarray:
    """The loop a typical script writes (the baseline of the latents goal): one image at a time,
    read, PIL-resized and encoded in float32 by ``vae``. Returns the latents (scaled)."""
    import h5py
    import torch
    from PIL import Image

    out = []
    with h5py.File(stimuli, "r") as f:
        for i in ids:
            img = Image.fromarray(f["imgBrick"][int(i)]).resize((image_size, image_size), Image.Resampling.BICUBIC)
            x = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)[None].float().div(255).mul(2).sub(1).to(device)
            with torch.no_grad():
                out.append((vae.encode(x).latent_dist.mean * vae.config.scaling_factor).cpu().numpy()[0])
    return np.stack(out)


def _naive_per_image(stimuli: Path, folder: Path, size: dict, device: str) -> float:
    """Seconds per image of :func:`naive_encode` (the VAE loaded, one image untimed)."""
    vae = load_vae_float32(folder, device)
    naive_encode(stimuli, vae, [0], size["image_size"], device)
    n = size["naive_images"]
    with Timer(device) as t:
        naive_encode(stimuli, vae, range(n), size["image_size"], device)
    return t.s / n


def _problem(trials: int, n_in: int, n_out: int, device: str, seed: int = 0):
    """z-scored inputs and targets of a learnable random linear problem, on the device."""
    import torch

    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(trials, n_in, generator=g, device=device)
    w = torch.randn(n_in, n_out, generator=g, device=device) / n_in**0.5
    z = x @ w + 0.5 * torch.randn(trials, n_out, generator=g, device=device)
    z = (z - z.mean(0)) / z.std(0)
    n_val = max(trials // 10, 8)
    return [a.contiguous() for a in (x[n_val:], z[n_val:], x[:n_val], z[:n_val])]


def _fit(device: str, n_in: int, n_out: int, hidden, epochs: int, data, checkpoint: Path, checkpoint_minutes=0.0,
         **extra):
    import torch

    from .encoder import DEFAULTS, build_mlp, fit_gradient

    sp = {**DEFAULTS, "hidden": hidden, "epochs": epochs, "seed": 0, "keep": "last", **extra}
    torch.manual_seed(0)
    model = build_mlp(n_in, n_out, hidden, sp["dropout"]).to(device)
    fit_gradient(sp, model, *data, device, checkpoint, "gpu-check", checkpoint_minutes=checkpoint_minutes)
    return model


def step_mlp(device: str, size: dict, work: Path) -> dict:
    """braid.encoder.fit_gradient on the seed design (4,657 -> 2,048 -> 4,096 -> 16,384, batch 512,
    bf16 autocast on CUDA) over a subject's 6,750 training trials; epochs/s after a warm-up epoch."""
    from .encoder import n_parameters

    n_out = 4 * (size["image_size"] // 8) ** 2
    data = _problem(size["mlp_trials"], size["mlp_in"], n_out, device)
    args = (device, size["mlp_in"], n_out, size["mlp_hidden"])
    _fit(*args, 1, data, work / "warm.ckpt", checkpoint_minutes=10)  # CUDA/cuBLAS start-up
    reset_peak(device)
    with Timer(device) as t:  # checkpoints every 10 minutes, as the workflow's default: none in this time
        model = _fit(*args, size["mlp_epochs"], data, work / "mlp.ckpt", checkpoint_minutes=10)
    per_epoch = t.s / size["mlp_epochs"]
    return {"parameters": n_parameters(model), "trials": len(data[0]), "epochs": size["mlp_epochs"],
            "epochs_per_s": round(1 / per_epoch, 2), "s_200_epochs": round(200 * per_epoch, 1),
            "peak_gb": peak_gb(device)}


def step_ridge(device: str, size: dict, work: Path) -> dict:
    """braid.encoder.fit_closed_form (ridge, the default alpha grid of 19 values) over every
    nsdgeneral voxel of subj01 to the 16,384 latents: seconds and peak memory."""
    import torch

    from .encoder import DEFAULTS, build_mlp, fit_closed_form

    n_out = 4 * (size["image_size"] // 8) ** 2
    data = _problem(size["ridge_trials"], size["ridge_voxels"], n_out, device, seed=1)
    model = build_mlp(size["ridge_voxels"], n_out, [], 0.0).to(device)
    reset_peak(device)
    with Timer(device) as t:
        table = fit_closed_form({**DEFAULTS, "kind": "ridge"}, *data, model)
    if not torch.isfinite(model[0].weight).all():
        raise RuntimeError("ridge weights are not finite")
    return {"trials": len(data[0]), "voxels": size["ridge_voxels"], "latents": n_out, "alphas": len(table),
            "s": round(t.s, 2), "peak_gb": peak_gb(device)}


def step_resume(device: str, size: dict, work: Path) -> dict:
    """A run stopped after a checkpoint and resumed ends with the weights of an uninterrupted run,
    on this device; the resumed optimiser keeps Adam's step counters on the host."""
    import torch

    from . import encoder

    n_out = 4 * (size["image_size"] // 8) ** 2
    data = _problem(size["resume_trials"], size["resume_in"], n_out, device, seed=2)
    args = (device, size["resume_in"], n_out, size["resume_hidden"], size["resume_epochs"], data)
    whole = _fit(*args, work / "whole.ckpt")

    class Stop(Exception):
        pass

    original, stop_at = encoder._write_checkpoint, size["resume_epochs"] // 2

    def write_then_stop(path, state):
        original(path, state)
        if state["epoch"] == stop_at:
            raise Stop

    encoder._write_checkpoint = write_then_stop
    try:
        _fit(*args, work / "stopped.ckpt")
    except Stop:
        pass
    finally:
        encoder._write_checkpoint = original
    steps_on_host = []
    original_load = torch.optim.Adam.load_state_dict

    def load_and_look(self, state):
        original_load(self, state)
        steps_on_host.extend(s["step"].device.type == "cpu" for s in self.state.values() if "step" in s)

    torch.optim.Adam.load_state_dict = load_and_look
    try:
        resumed = _fit(*args, work / "stopped.ckpt")
    finally:
        torch.optim.Adam.load_state_dict = original_load
    a, b = whole.state_dict(), resumed.state_dict()
    equal = all(torch.equal(a[k], b[k]) for k in a)
    max_diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    if not steps_on_host:
        raise RuntimeError("the run did not resume from its checkpoint")
    return {"epochs": size["resume_epochs"], "stopped_after": stop_at, "bit_identical": equal,
            "max_abs_diff": max_diff, "adam_steps_on_host": all(steps_on_host),
            "ok": equal and all(steps_on_host)}


def _ssd1b_folder(work: Path, size: dict, device: str) -> Path:
    """SSD-1B's architecture with random weights (or the tiny stand-in), saved as the ``fp16`` variant."""
    import torch

    from .models import (CLIP_BIGG_CONFIG, CLIP_L_CONFIG, SDXL_VAE_CONFIG, SSD1B_UNET_CONFIG, TINY_TE_CONFIG,
                         TINY_UNET_CONFIG, TINY_VAE_CONFIG, assemble_sdxl, save_sdxl, sdxl_components)

    folder = work / "ssd1b"
    if folder.is_dir():
        return folder
    torch.manual_seed(0)
    real = size["image_size"] >= 512
    configs = ((SSD1B_UNET_CONFIG, SDXL_VAE_CONFIG, CLIP_L_CONFIG, CLIP_BIGG_CONFIG) if real else
               (TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TE_CONFIG, TINY_TE_CONFIG))
    with torch.device(device):  # random initialisation on the GPU: seconds, not a minute
        components = sdxl_components(*configs)
    save_sdxl(assemble_sdxl(components), folder, {"source": "gpu-check", "seed": 0}, variants=("fp16",))
    return folder


def _predictions(path: Path, n: int, size: dict) -> None:
    """A predictions store as an encoder writes it: n test images' latents (unit-variance noise)."""
    import zarr

    shape = (4, size["image_size"] // 8, size["image_size"] // 8)
    rng = np.random.default_rng(0)
    root = zarr.open_group(path, mode="w")
    root.create_array("pred", data=rng.standard_normal((n, *shape)).astype(np.float32))
    root.create_array("nsd_id", data=np.arange(n, dtype=np.int64))
    root.create_array("global_trial", data=np.arange(n, dtype=np.int64))
    root.create_array("z_mean", data=np.zeros(shape, np.float32))
    root.create_array("z_std", data=np.ones(shape, np.float32))
    root.attrs.update({"n_parameters": 0, "n_voxels": 0, "spec": {"kind": "gpu-check"}})


def _png_hashes(folder: Path) -> str:
    h = hashlib.sha256()
    for png in sorted(folder.glob("*.png"), key=lambda p: int(p.stem)):
        h.update(png.read_bytes())
    return h.hexdigest()[:16]


def step_img2img(device: str, size: dict, work: Path) -> dict:
    """braid.reconstruct.reconstruct (what reconstruct_img2img runs) with SSD-1B's architecture at
    the real size, in float16 and bfloat16 (the VAE as vae_dtype decides), the fp16 files loaded;
    each dtype twice: the repeat must give the same PNG hashes on the same GPU."""
    from .reconstruct import reconstruct

    folder = _ssd1b_folder(work, size, device)
    n = size["img2img_images"]
    preds = work / "predictions.zarr"
    _predictions(preds, n, size)
    run_steps = int(size["steps"] * size["strength"])
    out = {"images": n, "batch": size["img2img_batch"], "steps": size["steps"], "strength": size["strength"],
           "steps_run": run_steps}
    dtypes = ("float16", "bfloat16") if device.startswith("cuda") else ("bfloat16",)  # no float16 on a CPU
    for dtype in dtypes:
        params = {"steps": size["steps"], "prompt": "", "negative_prompt": "", "dtype": dtype,
                  "variant": "fp16"}
        hashes = []
        for repeat in range(2):
            reset_peak(device)
            with Timer(device) as t:
                reconstruct(preds, folder, work / f"{dtype}-{repeat}", size["strength"], 0, params, device=device,
                            batch_size=size["img2img_batch"])  # raises on non-finite latents or pixels
            hashes.append(_png_hashes(work / f"{dtype}-{repeat}"))
            if repeat == 0:
                first = t.s  # includes loading the pipeline
        batches = -(-n // size["img2img_batch"])
        out[dtype] = {"s_first": round(first, 1), "s_repeat": round(t.s, 1), "images_per_s": round(n / t.s, 2),
                      "s_per_step": round(t.s / (batches * run_steps), 3), "peak_gb": peak_gb(device),
                      "finite": True, "png_hashes_equal": hashes[0] == hashes[1], "png_hash": hashes[0]}
    return out


def step_metrics(device: str, size: dict, work: Path) -> dict:
    """PixCorr and SSIM (braid.evaluate.image_metrics) and the five metric networks' features and
    scores (random weights, the real architectures) over reconstructions of NSD-sized stimuli."""
    from . import metric_networks as nets
    from .evaluate import image_metrics, network_features, network_scores

    n = size["metric_images"]
    rng = np.random.default_rng(0)
    stimuli = rng.integers(0, 256, size=(n, 425, 425, 3), dtype=np.uint8)
    recons = rng.random((n, 3, size["image_size"], size["image_size"]), dtype=np.float32)
    folders = {}
    for network in nets.NETWORKS:
        folders[network] = work / f"metric-{network}"
        kw = {"clip_config": TINY_CLIP} if network == "clip" and not device.startswith("cuda") else {}
        nets.build_random(network, folders[network], **kw)
    import torch

    reset_peak(device)
    with Timer(device) as t_pix:
        table = image_metrics(torch.from_numpy(recons), stimuli)
    with Timer(device) as t_net:
        rec = network_features(nets.to_256(torch.from_numpy(recons)), folders, device, size["metric_batch"])
        gt = network_features(nets.to_256(torch.from_numpy(np.moveaxis(stimuli, -1, 1).astype(np.float32) / 255)),
                              folders, device, size["metric_batch"])
        scores = network_scores(rec, gt)
    if not np.isfinite(table.to_numpy(dtype=float)).all() or not all(np.isfinite(v).all() for v in scores.values()):
        raise RuntimeError("non-finite metric values")
    total = t_pix.s + t_net.s
    return {"images": n, "networks": list(nets.NETWORKS), "pixel_s": round(t_pix.s, 2), "networks_s": round(t_net.s, 2),
            "images_per_s": round(n / total, 1), "s_1000_images": round(1000 * total / n, 1),
            "peak_gb": peak_gb(device)}


# ---------------------------------------------------------------------------------------------
# Running the steps, each in its own process


def run_step(name: str, device: str, cpu: bool, work: Path, out_json: Path) -> None:
    """One step in this process: its figures, or its error, to ``out_json``."""
    size = TINY if cpu else REAL
    t0 = time.perf_counter()
    try:
        figures = globals()[f"step_{name}"](device, size, work)
        ok = bool(figures.pop("ok", True))
        result = {"step": name, "status": "ok" if ok else "failed", "figures": figures}
    except Exception as err:  # the step failed: say why, the other steps still run
        log.exception("step %s failed", name)
        result = {"step": name, "status": "failed", "error": f"{type(err).__name__}: {err}"[:2000]}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    out_json.write_text(json.dumps(result, indent=1, default=str))


def run_all(out: Path, cpu: bool, steps=STEPS, timeout_scale: float = 1.0) -> list[dict]:
    from .common import atomic_output

    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="braid-gpu-check-") as tmp:
        for name in steps:
            work = Path(tmp) / name
            work.mkdir()
            step_json = work / "result.json"
            timeout = TIMEOUT_S[name] * timeout_scale
            cmd = [sys.executable, "-m", "braid.gpu_check", "--step", name, "--work", str(work), "--json", str(step_json)]
            if cpu:
                cmd.append("--cpu")
            print(f"gpu-check: {name} (timeout {timeout:.0f} s) ...", flush=True)
            t0 = time.perf_counter()
            with open(out / f"{name}.log", "w") as logfile:
                try:
                    proc = subprocess.run(cmd, stdout=logfile, stderr=subprocess.STDOUT, timeout=timeout)
                    code = proc.returncode
                except subprocess.TimeoutExpired:
                    code = None
            if step_json.is_file():
                result = json.loads(step_json.read_text())
            elif code is None:
                result = {"step": name, "status": "failed", "error": f"timed out after {timeout:.0f} s"}
            else:
                result = {"step": name, "status": "failed", "error": f"exit code {code}; see {out / (name + '.log')}"}
            result["wall_s"] = round(time.perf_counter() - t0, 1)
            results.append(result)
            print(f"gpu-check: {name} {result['status']} in {result['wall_s']} s", flush=True)
    with atomic_output(out / "gpu-check.json") as tmp_json:
        tmp_json.write_text(json.dumps({"mode": "cpu (tiny sizes)" if cpu else "gpu (real sizes)",
                                        "goals": GOALS, "steps": results}, indent=1, default=str))
    with atomic_output(out / "gpu-check.md") as tmp_md:
        tmp_md.write_text(table(results, cpu))
    return results


def _flatten(figures: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in figures.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def table(results: list[dict], cpu: bool) -> str:
    """The Markdown table of every step's figures (or error), with the goals."""
    lines = [f"# BRAID gpu-check ({'CPU, tiny sizes: proves the code paths, not the speed' if cpu else 'GPU, real sizes'})",
             "", "| step | status | s | figure | value |", "|---|---|---|---|---|"]
    for r in results:
        rows = _flatten(r.get("figures", {})) or [("error", r.get("error", ""))]
        for k, (key, value) in enumerate(rows):
            head = f"| {r['step']} | {r['status']} | {r['wall_s']} " if k == 0 else "| | | "
            lines.append(f"{head}| {key} | {str(value).replace('|', '/')} |")
    lines += ["", "Goals: " + "; ".join(f"{k}: {v}" for k, v in GOALS.items()), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/gpu-check"))
    ap.add_argument("--cpu", action="store_true", help="every step at tiny sizes on the CPU (what the tests run)")
    ap.add_argument("--only", nargs="+", choices=STEPS, help="run these steps only")
    ap.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every step's timeout (slow machines)")
    ap.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # internal: run one step in this process
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.step:
        import torch

        from .device import resolve_device

        device = "cpu" if args.cpu else resolve_device("cuda")
        if args.cpu:
            torch.set_num_threads(min(2, os.cpu_count() or 1))
        run_step(args.step, device, args.cpu, args.work, args.json)
        return 0
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            from .device import driver_version

            print(f"gpu-check: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU (driver "
                  f"{driver_version() or 'unknown'}); run it on a GPU node, or with --cpu for the tiny CPU check",
                  file=sys.stderr)
            return 2
    results = run_all(args.out, args.cpu, args.only or STEPS, args.timeout_scale)
    print(table(results, args.cpu))
    print(f"gpu-check: table in {args.out / 'gpu-check.md'}, figures in {args.out / 'gpu-check.json'}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    from .common import exit_on_sigterm

    exit_on_sigterm()
    sys.exit(main())
