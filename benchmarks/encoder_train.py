"""Benchmark: training the seed MLP, BRAID's loop vs the plain DataLoader script a typical project writes;
and closed-form ridge for a whole alpha grid.

    .venv/bin/python benchmarks/encoder_train.py [--samples 2048] [--epochs 2] [--device auto]
                                                 [--voxels 4657] [--latents 16384] [--seed-run]

At the seed's sizes (4,657 voxels -> 2,048 -> 4,096 -> 16,384 latents, 85,069,824 parameters,
batch 512, Adam 1e-4, Dropout 0.5), on random data:

  dataloader  TensorDataset + DataLoader(shuffle=True, batch 512) on the CPU, each batch copied to
              the device, float32, loss.item() after every step                     <- baseline
  braid       braid.encoder.fit_gradient: data resident on the device, shuffled index batches,
              bf16 autocast on CUDA, one host sync per epoch, validation every epoch (on 5 %
              more samples, included in its time)

Each runs one untimed warm-up epoch, then ``--epochs`` timed epochs. Prints training samples/s,
the ratio to the baseline and the achieved FLOP/s (6 x parameters per sample: forward 2N,
backward 4N), against the device's peak where it is known (``--peak-tflops`` to give it).
Then ridge: one eigendecomposition, the validation predictions of 19 alphas and the weights
(``braid.encoder.fit_closed_form``) at ``--ridge-samples`` x ``--ridge-voxels``. ``--seed-run`` also
times the seed's whole run with BRAID's loop (6,750 samples x 200 epochs; meant for a GPU).
Timings depend on the machine; the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks (SXM)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seed_spec(epochs: int) -> dict:
    from braid.encoder import spec

    return spec({"kind": "mlp", "hidden": [2048, 4096], "dropout": 0.5, "lr": 1e-4, "batch_size": 512,
                 "epochs": epochs, "keep": "last"})


def dataloader_epochs(x, z, sp, device: str, epochs: int) -> float:
    """The baseline: the loop most training scripts start from. Returns seconds for ``epochs``."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from braid.encoder import build_mlp

    torch.manual_seed(0)
    model = build_mlp(x.shape[1], z.shape[1], sp["hidden"], sp["dropout"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=sp["lr"])
    loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(z)), batch_size=sp["batch_size"], shuffle=True)

    def epoch():
        model.train()
        total = 0.0
        for xb, zb in loader:
            xb, zb = xb.to(device), zb.to(device)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(xb), zb)
            loss.backward()
            opt.step()
            total += loss.item()
        return total

    epoch()  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        epoch()
    sync(device)
    return time.perf_counter() - start


def braid_epochs(x, z, xv, zv, sp, device: str, epochs: int) -> float:
    import torch

    from braid.encoder import build_mlp, fit_gradient

    torch.manual_seed(0)
    model = build_mlp(x.shape[1], z.shape[1], sp["hidden"], sp["dropout"]).to(device)
    t = [torch.from_numpy(a).to(device) for a in (x, z, xv, zv)]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "c.checkpoint"
        fit_gradient(sp | {"epochs": 1}, model, *t, device, ckpt, "warm-up", checkpoint_minutes=1e9)
        sync(device)
        start = time.perf_counter()
        fit_gradient(sp | {"epochs": epochs}, model, *t, device, ckpt, "timed", checkpoint_minutes=1e9)
        sync(device)
        return time.perf_counter() - start


def ridge_seconds(n: int, p: int, q: int, device: str) -> float:
    """``braid.encoder.fit_closed_form`` with the default 19-alpha grid, validation on n/20 rows."""
    import torch

    from braid.encoder import build_mlp, fit_closed_form, spec

    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((n, p), dtype=np.float32)).to(device)
    z = torch.from_numpy(rng.standard_normal((n, q), dtype=np.float32)).to(device)
    nv = max(2, n // 20)
    model = build_mlp(p, q, [], 0.0).to(device)
    sync(device)
    start = time.perf_counter()
    table = fit_closed_form(spec({"kind": "ridge"}), x, z, x[:nv], z[:nv], model)
    sync(device)
    assert np.isfinite(table["val_loss"]).all()
    return time.perf_counter() - start


def main() -> None:
    import torch

    from braid.device import resolve_device

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2048, help="training samples (the seed: 6750)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--voxels", type=int, default=4657)
    ap.add_argument("--latents", type=int, default=16384)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--ridge-samples", type=int, default=None, help="default: --samples")
    ap.add_argument("--ridge-voxels", type=int, default=None, help="default: --voxels (subj01 nsdgeneral: 15724)")
    ap.add_argument("--seed-run", action="store_true", help="also time 6,750 samples x 200 epochs with BRAID's loop")
    args = ap.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.samples, args.voxels), dtype=np.float32)
    z = rng.standard_normal((args.samples, args.latents), dtype=np.float32)
    n_val = max(1, args.samples // 20)
    xv, zv = x[:n_val].copy(), z[:n_val].copy()
    sp = seed_spec(args.epochs)
    n_params = args.voxels * 2048 + 2048 + 2048 * 4096 + 4096 + 4096 * args.latents + args.latents + 2 * (2048 + 4096)
    print(f"device: {name}; torch {torch.__version__}; {args.samples} samples x {args.voxels} voxels -> "
          f"{args.latents} latents; {n_params:,} parameters; {args.epochs} timed epochs")

    results = {}
    results["dataloader"] = dataloader_epochs(x, z, sp, device, args.epochs)
    results["braid"] = braid_epochs(x, z, xv, zv, sp, device, args.epochs)
    base = args.samples * args.epochs / results["dataloader"]
    print(f"{'method':<12}{'samples/s':>12}{'x baseline':>12}{'TFLOP/s':>10}{'of peak':>9}")
    for method, seconds in results.items():
        rate = args.samples * args.epochs / seconds
        tflops = 6 * n_params * rate / 1e12
        of_peak = f"{tflops / peak:>8.1%}" if peak else f"{'n/a':>8}"
        print(f"{method:<12}{rate:>12.1f}{rate / base:>12.2f}{tflops:>10.3f} {of_peak}")

    n, p = args.ridge_samples or args.samples, args.ridge_voxels or args.voxels
    print(f"ridge, 19 alphas, {n} x {p} -> {args.latents}: {ridge_seconds(n, p, args.latents, device):.2f} s")

    if args.seed_run:
        x = rng.standard_normal((6750, args.voxels), dtype=np.float32)
        z = rng.standard_normal((6750, args.latents), dtype=np.float32)
        seconds = braid_epochs(x, z, x[:375].copy(), z[:375].copy(), seed_spec(200), device, 200)
        print(f"seed run, 6,750 x 200 epochs with BRAID's loop: {seconds:.1f} s "
              f"({6 * n_params * 6750 * 200 / seconds / 1e12:.1f} TFLOP/s)")


if __name__ == "__main__":
    main()
