"""Benchmark: img2img in each conditioning (braid.conditioning) against the fixed prompt, in one run.

    .venv/bin/python benchmarks/conditioning_img2img.py [--images 40] [--steps 10] [--strength 0.7]
                        [--guidance 3.0] [--batch-size 8] [--architecture tiny|ssd1b] [--device cpu]
                        [--dtype float32] [--repeats 2]

  none          ``braid.reconstruct.reconstruct`` with the fixed (empty) prompt, encoded once per job
                (today's img2img)                                                        <- baseline
  predicted     the same with a conditioning store of per-image embeddings (77 x width tokens and
                the pooled embedding, read per batch), as for predicted and true-caption
  retrieved     the same store, plus the text encoders' single pass over one caption per image
                that writing a retrieved conditioning costs (once per subject and mode, shared by
                every guidance scale, strength and seed: shown per image, and amortised over the
                real config's 2 guidance x 3 strengths x 3 seeds = 18 img2img jobs)

``--architecture tiny`` is the demo's tiny pipeline (random weights); ``ssd1b`` builds SSD-1B's real
architecture with random weights (on a GPU: ``--device cuda --dtype float16 --images 100``). Prints
images/s of each and its ratio to ``none``; the conditioned images differ from ``none``'s (the
embeddings reach the UNet).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def predictions_store(path: Path, n: int, size: int) -> None:
    from braid.integrity import new_array, new_group

    rng = np.random.default_rng(0)
    root = new_group(path)
    shape = (4, size // 8, size // 8)
    new_array(root, "pred", data=rng.standard_normal((n, *shape)).astype(np.float32))
    new_array(root, "nsd_id", data=np.arange(n, dtype=np.int64))
    new_array(root, "global_trial", data=np.arange(n, dtype=np.int64))
    new_array(root, "z_mean", data=np.zeros(shape, np.float32))
    new_array(root, "z_std", data=np.ones(shape, np.float32))
    root.attrs.update({"n_parameters": 1, "spec": {}})


def conditioning_store(path: Path, tokens: np.ndarray, pooled: np.ndarray) -> None:
    from braid.integrity import new_array, new_group

    root = new_group(path)
    new_array(root, "nsd_id", data=np.arange(len(tokens), dtype=np.int64))
    new_array(root, "tokens", data=tokens.astype(np.float16))
    new_array(root, "pooled", data=pooled.astype(np.float32))
    root.attrs.update({"conditioning": "predicted-benchmark", "n_parameters_semantic": 0})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--strength", type=float, default=0.7)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--architecture", choices=["tiny", "ssd1b"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from PIL import Image

    from braid import models
    from braid.reconstruct import reconstruct
    from braid.text_embeddings import encode_captions, load_text_encoders

    work = Path(tempfile.mkdtemp(prefix="braid-bench-conditioning-"))
    if args.architecture == "tiny":
        model, size = models.build_tiny_sdxl(work / "model"), 64
    else:
        model, size = models.build_ssd1b_architecture(work / "model"), 512
    predictions_store(work / "pred.zarr", args.images, size)
    pipe = load_text_encoders(model, device=args.device, dtype=args.dtype)
    captions = [f"A photo of object number {i}, close up, in bright light." for i in range(args.images)]
    start = time.perf_counter()
    tokens, pooled = encode_captions(pipe, captions, batch_size=128)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    encode_s = time.perf_counter() - start
    del pipe
    conditioning_store(work / "cond.zarr", tokens, pooled)
    params = {"steps": args.steps, "prompt": "", "negative_prompt": "", "dtype": args.dtype}
    seconds = {}
    for repeat in range(args.repeats):  # interleaved, so that a slower moment of the machine hits both
        for name, cond in (("none", None), ("predicted", work / "cond.zarr")):
            start = time.perf_counter()
            reconstruct(work / "pred.zarr", model, work / f"{name}-{repeat}", args.strength, 0, params,
                        device=args.device, batch_size=args.batch_size, guidance_scale=args.guidance,
                        conditioning_path=cond)
            seconds.setdefault(name, []).append(time.perf_counter() - start)
    best = {k: min(v) for k, v in seconds.items()}
    per_image_encode = encode_s / args.images
    jobs = 18
    print(f"{args.architecture} pipeline, {args.images} images, {args.steps} steps at strength {args.strength}, "
          f"guidance {args.guidance}, batch {args.batch_size}, {args.dtype} on {args.device} (best of {args.repeats})")
    base = args.images / best["none"]
    rows = [("none (baseline)", best["none"]), ("predicted / true-caption", best["predicted"]),
            ("retrieved, its text pass in this job", best["predicted"] + encode_s),
            (f"retrieved, text pass shared by {jobs} jobs", best["predicted"] + encode_s / jobs)]
    for name, s in rows:
        rate = args.images / s
        print(f"  {name:42s} {rate:8.2f} images/s   {rate / base:5.2f}x none")
    print(f"  text encoders: {per_image_encode * 1000:.2f} ms per caption ({args.images} captions in {encode_s:.2f} s)")
    a = np.asarray(Image.open(work / "none-0" / "0.png"), np.int16)
    b = np.asarray(Image.open(work / "predicted-0" / "0.png"), np.int16)
    print(f"  conditioned image 0 differs from none's by up to {int(np.abs(a - b).max())} of 255")


if __name__ == "__main__":
    main()
