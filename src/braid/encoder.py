"""The fMRI encoder f_θ: voxels -> the VAE latent z0, trained with MSE on z-scored data.

The seed design is an MLP 4,657 -> 2,048 -> 4,096 -> 16,384 with LayerNorm, ReLU and Dropout
0.5 after each hidden linear layer, Adam 1e-4, batch 512, 200 epochs, inputs z-scored per voxel
and targets z-scored per latent dimension with training-split statistics. ``hidden: []`` gives a
linear encoder — the smallest point of the parameter-count question.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pandas as pd

from .common import BraidError, atomic_output
from .evaluate import rowwise_pearson, standardiser

log = logging.getLogger(__name__)


def build_mlp(n_in: int, n_out: int, hidden: list[int], dropout: float):
    import torch.nn as nn

    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        layers += [nn.Linear(width, h), nn.LayerNorm(h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


def n_parameters(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def load_split(betas_path, trials_path, latents_path, split: str):
    """Betas rows, target latents (flattened) and trial rows of one split."""
    from .betas import open_betas
    from .latents import LatentCache

    table = pd.read_parquet(trials_path)
    rows = np.flatnonzero(table["split"].to_numpy() == split)
    if rows.size == 0:
        raise BraidError(f"{trials_path}: no '{split}' trials; check config split")
    store = open_betas(betas_path)["betas"]
    if len(table) != store.shape[0]:
        raise BraidError(f"{trials_path} and {betas_path} disagree on the number of trials; rerun the betas rule")
    betas = np.asarray(store.get_orthogonal_selection((rows, slice(None))), np.float32)
    cache = LatentCache(latents_path)
    sub = table.iloc[rows].reset_index(drop=True)
    latents = cache.get(sub["nsd_id"].to_numpy()).reshape(len(rows), -1)
    return betas, latents, sub, cache.shape


def train(
    betas_path,
    trials_path,
    latents_path,
    params: dict,
    out_model,
    out_history,
    out_plot,
    out_predictions,
    device: str = "cpu",
) -> dict:
    """Train one encoder; write weights, history, loss curve and the test split's predicted latents."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    torch.manual_seed(params["seed"])
    x_tr, z_tr, _, latent_shape = load_split(betas_path, trials_path, latents_path, "train")
    x_va, z_va, _, _ = load_split(betas_path, trials_path, latents_path, "val")
    x_mean, x_std = standardiser(x_tr)
    z_mean, z_std = standardiser(z_tr)
    for name, arr in (("betas (train)", x_tr), ("latents (train)", z_tr)):
        if not np.isfinite(arr).all():
            raise BraidError(f"{name} contain NaN or inf values; rerun the betas/latents rules")

    def prep(x, z):
        return (
            torch.from_numpy((x - x_mean) / x_std).to(device),
            torch.from_numpy((z - z_mean) / z_std).to(device),
        )

    xt, zt = prep(x_tr, z_tr)
    xv, zv = prep(x_va, z_va)
    model = build_mlp(xt.shape[1], zt.shape[1], params["hidden"], params["dropout"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=params["lr"], weight_decay=params["weight_decay"])
    loss_fn = torch.nn.MSELoss()
    n_params = n_parameters(model)
    log.info("encoder %s: %d parameters, %d train / %d val trials", params["hidden"], n_params, len(xt), len(xv))

    gen = torch.Generator().manual_seed(params["seed"])
    history = []
    bar = tqdm(range(1, params["epochs"] + 1), desc="epochs", mininterval=2)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(xt), generator=gen).to(device)
        total = 0.0
        for start in range(0, len(xt), params["batch_size"]):
            idx = perm[start : start + params["batch_size"]]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt[idx]), zt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            pv = model(xv)
            val_loss = loss_fn(pv, zv).item()
        val_r = float(np.mean(rowwise_pearson(pv.cpu().numpy(), zv.cpu().numpy())))
        history.append({"epoch": epoch, "train_loss": total / len(xt), "val_loss": val_loss, "val_latent_r": val_r})
        if not np.isfinite(total):
            raise BraidError(f"training diverged at epoch {epoch} (loss {total}); lower encoders.<name>.lr")
        bar.set_postfix(train=f"{total / len(xt):.3f}", val=f"{val_loss:.3f}", r=f"{val_r:.3f}")

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, arr in (("x_mean", x_mean), ("x_std", x_std), ("z_mean", z_mean), ("z_std", z_std)):
        state[f"standardiser.{name}"] = torch.from_numpy(arr)
    from .latents import LatentCache

    weights = LatentCache(latents_path).weights
    meta = {"params": json.dumps(params, sort_keys=True), "n_parameters": str(n_params), "model_weights": weights,
            "latent_shape": json.dumps(list(latent_shape)), "n_voxels": str(xt.shape[1])}
    with atomic_output(out_model) as tmp:
        save_file(state, str(tmp), metadata=meta)
    hist = pd.DataFrame(history)
    with atomic_output(out_history) as tmp:
        hist.to_csv(tmp, index=False)
    stamp = "" if weights == "pretrained" else f"NOT A RESULT: latents of a model with {weights.split()[0]} weights\n"
    plot_history(hist, out_plot, f"{stamp}{params['hidden']} ({n_params:,} parameters)")
    predict_test(model, x_mean, x_std, z_mean, z_std, latent_shape, betas_path, trials_path, latents_path,
                 out_predictions, n_params, device)
    return {"n_parameters": n_params, "final_val_loss": history[-1]["val_loss"]}


def predict_test(model, x_mean, x_std, z_mean, z_std, latent_shape, betas_path, trials_path, latents_path,
                 out_path, n_params: int, device: str) -> None:
    """Predicted latents (latent scale, as img2img consumes them) for every test trial."""
    import torch
    import zarr

    x_te, _, rows, _ = load_split(betas_path, trials_path, latents_path, "test")
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy((x_te - x_mean) / x_std).to(device)).cpu().numpy()
    pred = pred * z_std + z_mean
    shape = (len(pred), *latent_shape)
    with atomic_output(out_path) as tmp:
        root = zarr.open_group(tmp, mode="w")
        root.create_array("pred", data=pred.reshape(shape).astype(np.float32))
        root.create_array("nsd_id", data=rows["nsd_id"].to_numpy().astype(np.int64))
        root.create_array("global_trial", data=rows["global_trial"].to_numpy().astype(np.int64))
        root.create_array("z_mean", data=z_mean.reshape(latent_shape))
        root.create_array("z_std", data=z_std.reshape(latent_shape))
        root.attrs["n_parameters"] = n_params


def plot_history(hist: pd.DataFrame, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    a.plot(hist["epoch"], hist["train_loss"], label="train")
    a.plot(hist["epoch"], hist["val_loss"], label="val")
    a.set_xlabel("epoch")
    a.set_ylabel("MSE (z-scored latents)")
    a.legend()
    b.plot(hist["epoch"], hist["val_latent_r"], color="tab:green")
    b.set_xlabel("epoch")
    b.set_ylabel("val latent r")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def load_predictions(path):
    import zarr

    try:
        root = zarr.open_group(path, mode="r")
        return {k: np.asarray(root[k][:]) for k in ("pred", "nsd_id", "global_trial", "z_mean", "z_std")} | {
            "n_parameters": int(root.attrs["n_parameters"])
        }
    except KeyError as err:
        raise BraidError(f"{path}: incomplete predictions store ({err}); rerun the encoder rule") from err
