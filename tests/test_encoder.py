"""The encoder: architecture of the seed design, training outputs, and what is saved."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

from braid import betas, encoder, nsd
from braid.evaluate import latent_metrics
from braid.latents import LatentCache, cache_latents


def test_seed_architecture_parameter_count():
    with torch.device("meta"):
        model = encoder.build_mlp(4657, 16384, [2048, 4096], 0.5)
    linear = 4657 * 2048 + 2048 + 2048 * 4096 + 4096 + 4096 * 16384 + 16384
    norms = 2 * 2048 + 2 * 4096
    assert encoder.n_parameters(model) == linear + norms
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Linear", "LayerNorm", "ReLU", "Dropout"] * 2 + ["Linear"]
    assert model[3].p == 0.5
    with torch.device("meta"):
        assert encoder.n_parameters(encoder.build_mlp(10, 4, [], 0.0)) == 44


@pytest.fixture(scope="module")
def stage_inputs(mirror, tiny_model, tmp_path_factory):
    root, _ = mirror
    out = tmp_path_factory.mktemp("stage")
    betas.build(1, {s: root / nsd.betas_key(1, s) for s in (1, 2)}, {"nsdgeneral": root / nsd.roi_key(1, "nsdgeneral")},
                {"nsdgeneral": [1]}, root / nsd.EXPDESIGN, out / "betas.zarr", out / "trials.parquet",
                {"rule": "seed", "train": 0.6, "val": 0.2, "test": 0.2, "seed": 0})
    ids = pd.read_parquet(out / "trials.parquet")["nsd_id"].unique()
    cache_latents(root / nsd.STIMULI, tiny_model, ids, out / "latents.zarr", image_size=64)
    return out


def test_training_writes_everything_and_learns(stage_inputs, tmp_path):
    d = stage_inputs
    hp = {"hidden": [], "dropout": 0.0, "lr": 1e-3, "weight_decay": 1e-2, "batch_size": 16, "epochs": 30, "seed": 0}
    out = {k: tmp_path / v for k, v in dict(model="e.safetensors", history="h.csv", plot="loss.png", predictions="p.zarr").items()}
    info = encoder.train(d / "betas.zarr", d / "trials.parquet", d / "latents.zarr", hp, out["model"], out["history"],
                         out["plot"], out["predictions"])
    hist = pd.read_csv(out["history"])
    assert len(hist) == 30 and hist["train_loss"].iloc[-1] < 0.5 * hist["train_loss"].iloc[0]
    assert out["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    preds = encoder.load_predictions(out["predictions"])
    trials = pd.read_parquet(d / "trials.parquet")
    test = trials[trials["split"] == "test"]
    assert preds["pred"].shape == (len(test), 4, 8, 8)
    assert preds["nsd_id"].tolist() == test["nsd_id"].tolist()
    assert preds["n_parameters"] == info["n_parameters"]
    # the saved weights and standardiser reproduce the predictions
    with safe_open(str(out["model"]), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        assert int(f.metadata()["n_parameters"]) == info["n_parameters"]
    model = encoder.build_mlp(state["0.weight"].shape[1], 256, [], 0.0)
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("standardiser.")})
    x_te, _, _, _ = encoder.load_split(d / "betas.zarr", d / "trials.parquet", d / "latents.zarr", "test")
    xs = (x_te - state["standardiser.x_mean"].numpy()) / state["standardiser.x_std"].numpy()
    with torch.no_grad():
        z = model(torch.from_numpy(xs)).numpy() * state["standardiser.z_std"].numpy() + state["standardiser.z_mean"].numpy()
    np.testing.assert_allclose(z.reshape(preds["pred"].shape), preds["pred"], rtol=1e-4, atol=1e-5)
    # and on held-out images they correlate with the truth (the signal is planted; ~24 training images)
    true = LatentCache(d / "latents.zarr").get(preds["nsd_id"])
    scores = latent_metrics(preds["pred"], true, preds["z_mean"], preds["z_std"], preds["nsd_id"])
    assert scores["latent_r"] > 0.1 and scores["latent_two_way"] > 0.7


def test_training_is_deterministic(stage_inputs, tmp_path):
    d = stage_inputs
    hp = {"hidden": [16], "dropout": 0.5, "lr": 1e-3, "weight_decay": 0.0, "batch_size": 8, "epochs": 3, "seed": 7}
    runs = []
    for k in range(2):
        o = tmp_path / str(k)
        encoder.train(d / "betas.zarr", d / "trials.parquet", d / "latents.zarr", hp, o / "m.safetensors", o / "h.csv",
                      o / "l.png", o / "p.zarr")
        runs.append(encoder.load_predictions(o / "p.zarr")["pred"])
    np.testing.assert_array_equal(runs[0], runs[1])
