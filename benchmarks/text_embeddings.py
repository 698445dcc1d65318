"""Benchmark: the text-embedding cache (braid.text_embeddings), batched, against a per-caption loop.

    .venv/bin/python benchmarks/text_embeddings.py [--images 200] [--captions 5] [--batch-size 128]
                                                    [--architecture tiny|ssd1b] [--device cpu] [--dtype float32]

Captions in the synthetic NSD's style (about 40 characters; COCO's average about 50), ``--captions``
per image, encoded by SDXL's two text encoders through ``encode_prompt``, as BRAID's cache does:

  per-caption  one ``encode_prompt`` call per caption, its outputs accumulated per image
               (the loop a typical script writes: Takagi & Nishimoto's img2feat code calls the
               text model once per caption)                                          <- baseline
  braid        ``braid.text_embeddings.update_cache``: ``--batch-size`` captions per call, the
               means per image and each caption's pooled embedding written to a Zarr cache (the
               writing is included in its time)

``--architecture tiny`` is the demo's tiny model (32-wide text encoders); ``ssd1b`` builds SSD-1B's
real text encoders (CLIP ViT-L, 123 M, and OpenCLIP bigG, 695 M parameters) with random weights,
for timing on a GPU (``--device cuda --dtype float16 --images 10000``: one subject's images). Prints
images/s of each and the ratio, and both means agree to float tolerance.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def build_model(architecture: str, out: Path, dtype: str) -> Path:
    """A model folder (HF layout) whose text encoders are the tiny or SSD-1B's; its UNet and VAE tiny."""
    import torch

    from braid import models

    torch.manual_seed(0)
    te1, te2 = ((models.TINY_TE_CONFIG, models.TINY_TE_CONFIG) if architecture == "tiny"
                else (models.CLIP_L_CONFIG, models.CLIP_BIGG_CONFIG))
    unet = dict(models.TINY_UNET_CONFIG, cross_attention_dim=te1["hidden_size"] + te2["hidden_size"],
                projection_class_embeddings_input_dim=6 * 8 + te2["projection_dim"])
    components = models.sdxl_components(unet, models.TINY_VAE_CONFIG, te1, te2)
    return models.save_sdxl(models.assemble_sdxl(components), out, {"source": f"{architecture}-text", "seed": 0})


def caption_table(n_images: int, per_image: int) -> pd.DataFrame:
    from braid import synthetic

    rng = np.random.default_rng(0)
    made = [{"category": int(rng.integers(len(synthetic.CATEGORIES))), "share": float(rng.uniform(0.35, 1)),
             "mirrored": False, "upside_down": bool(rng.random() < 0.25), "gains": rng.uniform(0.6, 1.4, 3).tolist()}
            for _ in range(n_images)]
    texts = synthetic.make_captions(made, rng, per_image)
    return pd.DataFrame({"nsd_id": np.repeat(np.arange(n_images), per_image),
                         "caption_index": np.tile(np.arange(per_image), n_images),
                         "caption": [t for ts in texts for t in ts]})


def per_caption(model: Path, table: pd.DataFrame, device: str, dtype: str) -> tuple[float, np.ndarray]:
    import torch

    from braid.text_embeddings import load_text_encoders

    pipe = load_text_encoders(model, device, dtype)
    sync(device)
    start = time.perf_counter()
    means = []
    with torch.inference_mode():
        for _, group in table.groupby("nsd_id", sort=True):
            pooled = [pipe.encode_prompt(text, device=device, do_classifier_free_guidance=False)[2].float().cpu()
                      for text in group["caption"]]
            means.append(torch.cat(pooled).mean(0).numpy())
    sync(device)
    return time.perf_counter() - start, np.stack(means)


def batched(model: Path, table: pd.DataFrame, folder: Path, device: str, dtype: str, batch: int) -> tuple[float, np.ndarray]:
    from braid.text_embeddings import TextEmbeddingCache, update_cache

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "captions.parquet"
    table.to_parquet(path)
    start = time.perf_counter()
    update_cache(path, model, table["nsd_id"].unique(), folder / "text.zarr", {"benchmark": 1}, device=device,
                 dtype=dtype, batch_size=batch)
    sync(device)
    seconds = time.perf_counter() - start
    return seconds, TextEmbeddingCache(folder / "text.zarr").pooled(np.sort(table["nsd_id"].unique()))


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--captions", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--architecture", choices=["tiny", "ssd1b"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    table = caption_table(args.images, args.captions)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args.architecture, Path(tmp) / "model", args.dtype)
        batched(model, table.head(args.captions * 2), Path(tmp) / "warm", args.device, args.dtype, args.batch_size)
        t_loop, loop = per_caption(model, table, args.device, args.dtype)
        t_braid, cache = batched(model, table, Path(tmp), args.device, args.dtype, args.batch_size)
    n = args.images
    print(f"{n} images x {args.captions} captions, {args.architecture} text encoders, {args.device} {args.dtype}")
    print(f"  per-caption loop (baseline): {t_loop:8.2f} s  {n / t_loop:9.1f} images/s")
    print(f"  braid update_cache (batch {args.batch_size}): {t_braid:8.2f} s  {n / t_braid:9.1f} images/s  "
          f"({t_loop / t_braid:.1f}x the baseline)")
    print(f"  max |difference| of the mean pooled embeddings: {np.abs(loop - cache).max():.2e}")


if __name__ == "__main__":
    main()
