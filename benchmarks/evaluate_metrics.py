"""Metric computation speed: BRAID's evaluation against MindEye's reference loop, in one run.

Scenario: ``--runs`` reconstruction runs (e.g. strengths x seeds) of ``--images`` test images are
scored with the six network metrics (AlexNet(2), AlexNet(5), InceptionV3, CLIP ViT-L/14,
EfficientNet-B1, SwAV-ResNet50), the networks in their real architectures (random weights: speed
does not depend on the weights) on ``--device``.

- baseline, MindEye's reference code (``Reconstruction_Metrics.py``): for every run and every
  metric, one forward pass over the reconstructions and one over the stimuli (AlexNet runs twice,
  once per layer), then ``np.corrcoef`` over both sets;
- BRAID (``braid.evaluate``): the stimuli's features once per subject (``evaluate_stimuli``), each
  run's reconstructions once per network (both AlexNet layers from one pass), 2-way by one matrix
  product; CLIP in float32 as in the reference CPU path.

Prints images/s (scored reconstructions per second, weights loading excluded) and the ratio.
On a GPU (``--device cuda --images 1000``) it answers the goal "1,000 test images in under 2
minutes"; on this project's CPU machine use few images (``--images 16 --runs 2``).

    .venv/bin/python benchmarks/evaluate_metrics.py --images 16 --runs 2 [--networks alexnet inception ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from braid import metric_networks as nets
from braid.evaluate import network_scores


def me_reference(models: dict, recon: torch.Tensor, real: torch.Tensor, metrics: list[str], batch: int) -> dict:
    """MindEye's loop: per metric, features of recon and real by separate passes; 2-way by corrcoef."""
    import scipy.spatial

    out = {}
    for metric in metrics:
        network = nets.METRICS[metric][0]
        feats = []
        for images in (real, recon):
            f = nets.features(network, models[network], images, batch_size=batch)[metric]
            feats.append(f.astype(np.float64))
        real_f, recon_f = feats
        if nets.METRICS[metric][2] == "two_way":
            n = len(real_f)
            r = np.corrcoef(real_f, recon_f)[:n, n:]
            out[metric] = float(np.mean(np.sum(r < np.diag(r), 0)) / (n - 1))
        else:
            out[metric] = float(np.mean([scipy.spatial.distance.correlation(a, b) for a, b in zip(real_f, recon_f)]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--networks", nargs="+", default=list(nets.NETWORKS))
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.random((args.images, 3, 256, 256), dtype=np.float32))
    recons = [torch.from_numpy(rng.random((args.images, 3, 256, 256), dtype=np.float32)) for _ in range(args.runs)]
    metrics = [m for m, (n, _, _) in nets.METRICS.items() if n in args.networks]
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for network in args.networks:
            nets.build_random(network, Path(tmp) / network, seed=0)
            models[network] = nets.load(network, Path(tmp) / network, device=args.device)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    # warm-up (allocator, kernels) on two images
    for network, model in models.items():
        nets.features(network, model, real[:2], batch_size=2)
    sync()
    t = time.perf_counter()
    base = [me_reference(models, rec, real, metrics, args.batch_size) for rec in recons]
    sync()
    t_base = time.perf_counter() - t

    t = time.perf_counter()
    gt = {}
    for network, model in models.items():
        gt |= nets.features(network, model, real, batch_size=args.batch_size)
    ours = []
    for rec in recons:
        feats = {}
        for network, model in models.items():
            feats |= nets.features(network, model, rec, batch_size=args.batch_size)
        ours.append({m: float(np.nanmean(v)) for m, v in network_scores(feats, gt).items()})
    sync()
    t_braid = time.perf_counter() - t

    for b, o in zip(base, ours):  # the same numbers, or the comparison is void
        for m in metrics:
            assert abs(b[m] - o[m]) < 1e-4, (m, b[m], o[m])
    n = args.images * args.runs
    print(f"{args.runs} runs x {args.images} images, networks {args.networks}, device {args.device}")
    print(f"{'method':<44}{'images/s':>10}{'vs baseline':>13}")
    print(f"{'MindEye reference loop (baseline)':<44}{n / t_base:>10.2f}{1.0:>12.2f}x")
    print(f"{'BRAID (stimulus features once, shared passes)':<44}{n / t_braid:>10.2f}{t_base / t_braid:>12.2f}x")
    print(f"time for 1,000 images at BRAID's rate: {1000 / (n / t_braid):.0f} s (stimulus features amortised over {args.runs} runs)")


if __name__ == "__main__":
    main()
