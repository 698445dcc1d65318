"""The encoder: architecture of the seed design, training outputs, and what is saved."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

from braid import betas, encoder, nsd
from braid.common import BraidError
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


def write_stores(root, x, z, split):
    """A betas store, trial table and latent cache written with zarr/pandas directly (not BRAID's writers)."""
    import zarr

    n = len(x)
    betas_root = zarr.open_group(root / "betas.zarr", mode="w")
    betas_root.create_array("betas", data=x.astype(np.float32))
    pd.DataFrame({"session": 1, "trial": np.arange(1, n + 1), "global_trial": np.arange(n), "nsd_id": np.arange(n) + 100,
                  "repeat": 0, "n_repeats": 1, "shared1000": False, "split": split}).to_parquet(root / "trials.parquet")
    lat = zarr.open_group(root / "latents.zarr", mode="w")
    lat.create_array("nsd_id", data=np.arange(n, dtype=np.int64) + 100)
    lat.create_array("latents", data=z.reshape(n, 4, 2, 2).astype(np.float32))
    return root / "betas.zarr", root / "trials.parquet", root / "latents.zarr"


def linear_problem(n=240, d=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(3.0, 2.0, (n, d)) * rng.uniform(0.5, 4, d)  # offsets and scales the standardiser must undo
    W = rng.standard_normal((d, 16))
    z = 0.1 * (x @ W) + 5.0
    split = np.array(["train"] * 160 + ["val"] * 40 + ["test"] * 40)
    return x, z, split


def test_linear_encoder_converges_to_least_squares_and_saves_training_statistics(tmp_path):
    """Noise-free linear targets: the trained linear encoder predicts the test latents as least squares
    (numpy's lstsq on the training rows) does, and stores the training rows' mean/std."""
    x, z, split = linear_problem()
    paths = write_stores(tmp_path, x, z, split)
    hp = {"hidden": [], "dropout": 0.0, "lr": 0.03, "weight_decay": 0.0, "batch_size": 32, "epochs": 150, "seed": 1}
    out = [tmp_path / n for n in ("m.safetensors", "h.csv", "l.png", "p.zarr")]
    info = encoder.train(*paths, hp, *out)
    tr, te = split == "train", split == "test"
    A = np.c_[x[tr], np.ones(tr.sum())]
    coef = np.linalg.lstsq(A, z[tr], rcond=None)[0]
    expected = np.c_[x[te], np.ones(te.sum())] @ coef
    preds = encoder.load_predictions(out[3])
    np.testing.assert_allclose(preds["pred"].reshape(te.sum(), -1), expected, atol=0.02 * z.std())
    assert preds["nsd_id"].tolist() == (np.flatnonzero(te) + 100).tolist()
    np.testing.assert_allclose(preds["z_mean"].ravel(), z[tr].mean(0), rtol=1e-5)
    np.testing.assert_allclose(preds["z_std"].ravel(), z[tr].std(0), rtol=1e-4)
    with safe_open(str(out[0]), "pt") as f:
        np.testing.assert_allclose(f.get_tensor("standardiser.x_mean").numpy(), x[tr].mean(0), rtol=1e-5)
        np.testing.assert_allclose(f.get_tensor("standardiser.x_std").numpy(), x[tr].std(0), rtol=1e-4)
        assert f.metadata()["n_voxels"] == "12" and int(f.metadata()["n_parameters"]) == 12 * 16 + 16
    hist = pd.read_csv(out[1])
    assert list(hist.columns) == ["epoch", "train_loss", "val_loss", "val_latent_r"]
    assert hist["epoch"].tolist() == list(range(1, 151))
    assert 0.2 < hist["train_loss"].iloc[0] < 5  # a mean over z-scored targets: order 1 before training
    assert hist["val_loss"].iloc[-1] < 1e-3 and hist["val_latent_r"].iloc[-1] > 0.999
    assert hist["train_loss"].iloc[-1] < 1e-3
    assert info == {"n_parameters": 12 * 16 + 16, "final_val_loss": pytest.approx(hist["val_loss"].iloc[-1])}


def test_weight_decay_and_learning_rate_reach_the_optimiser(tmp_path):
    x, z, split = linear_problem(seed=2)
    paths = write_stores(tmp_path, x, z, split)
    base = {"hidden": [], "dropout": 0.0, "lr": 0.03, "weight_decay": 0.0, "batch_size": 32, "epochs": 20, "seed": 1}
    norms, losses = {}, {}
    for name, change in {"base": {}, "decay": {"weight_decay": 1.0}, "slow": {"lr": 1e-5}}.items():
        out = [tmp_path / name / n for n in ("m.safetensors", "h.csv", "l.png", "p.zarr")]
        encoder.train(*paths, base | change, *out)
        with safe_open(str(out[0]), "pt") as f:
            norms[name] = float(f.get_tensor("0.weight").norm())
        losses[name] = pd.read_csv(out[1])["val_loss"].iloc[-1]
    assert norms["decay"] < 0.7 * norms["base"]
    assert losses["slow"] > 10 * losses["base"]


def test_training_refuses_non_finite_inputs(tmp_path):
    x, z, split = linear_problem()
    x[5, 3] = np.nan
    paths = write_stores(tmp_path, x, z, split)
    hp = {"hidden": [], "dropout": 0.0, "lr": 0.03, "weight_decay": 0.0, "batch_size": 32, "epochs": 1, "seed": 1}
    out = [tmp_path / n for n in ("m.safetensors", "h.csv", "l.png", "p.zarr")]
    with pytest.raises(BraidError, match=r"betas \(train\) contain NaN"):
        encoder.train(*paths, hp, *out)
    assert not any(p.exists() for p in out)


def test_a_split_without_trials_is_named(tmp_path):
    x, z, split = linear_problem()
    split[split == "val"] = "train"
    paths = write_stores(tmp_path, x, z, split)
    with pytest.raises(BraidError, match="no 'val' trials"):
        encoder.load_split(*paths, "val")
