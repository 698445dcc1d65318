"""The encoder: architecture of the seed design, training outputs, and what is saved."""

from __future__ import annotations

from pathlib import Path

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
    assert encoder.n_parameters(model) == linear + norms == 85_069_824
    with torch.device("meta"):  # the default spec is the seed design
        default = encoder.build(encoder.architecture(encoder.spec({})), 4657, 16384)
        assert encoder.n_parameters(default) == 85_069_824
        lowrank = encoder.build(encoder.architecture(encoder.spec({"kind": "lowrank", "rank": 8})), 4657, 16384)
        assert encoder.n_parameters(lowrank) == 4657 * 8 + 8 * 16384 + 16384
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
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(("standardiser.", "selection."))})
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
    assert list(hist.columns) == ["epoch", "train_loss", "val_loss", "val_latent_r", "kept"]
    assert hist["epoch"].tolist() == list(range(1, 151))
    assert 0.2 < hist["train_loss"].iloc[0] < 5  # a mean over z-scored targets: order 1 before training
    assert hist["val_loss"].iloc[-1] < 1e-3 and hist["val_latent_r"].iloc[-1] > 0.999
    assert hist["train_loss"].iloc[-1] < 1e-3
    assert info == {"n_parameters": 12 * 16 + 16, "n_voxels": 12, "val_loss": pytest.approx(hist["val_loss"].min())}


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


# ---- closed-form encoders against scikit-learn (a test-only reference) ----------------------


def noisy_problem(n=200, d=30, q=24, seed=0, noise=2.0, rank=None):
    """Latents linear in the voxels (through ``rank`` factors) plus noise, with offsets and scales
    the standardisers must undo."""
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 1.0, (n, d)) * rng.uniform(0.5, 3, d)
    w = rng.standard_normal((d, q)) if rank is None else rng.standard_normal((d, rank)) @ rng.standard_normal((rank, q))
    z = x @ w * 0.3 + noise * rng.standard_normal((n, q)) + rng.normal(0, 4, q)
    split = np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4))
    return x, z, split


def sklearn_path(x, z, split, alphas, rank=None):
    """Validation z-MSE per alpha and test predictions of the best alpha, by brute force with
    scikit-learn's StandardScaler + Ridge (reduced rank: numpy's SVD of the training fit)."""
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    tr, va, te = (split == s for s in ("train", "val", "test"))
    sx = StandardScaler().fit(x[tr])
    zm, zs = z[tr].mean(0), z[tr].std(0)

    def fit(alpha):
        ridge = Ridge(alpha=alpha).fit(sx.transform(x[tr]), (z[tr] - zm) / zs)
        if rank is None:
            return lambda xx: ridge.predict(sx.transform(xx)) * zs + zm
        coef = ridge.coef_.T
        vr = np.linalg.svd(sx.transform(x[tr]) @ coef, full_matrices=False)[2][:rank].T
        return lambda xx: sx.transform(xx) @ coef @ vr @ vr.T * zs + zm

    losses = [np.mean(((fit(a)(x[va]) - z[va]) / zs) ** 2) for a in alphas]
    best = int(np.argmin(losses))
    return np.array(losses), alphas[best], fit(alphas[best])(x[te])


@pytest.mark.parametrize("n,d", [(200, 30), (120, 90)])  # more trials than voxels, and fewer (the dual form)
@pytest.mark.parametrize("kind", ["ridge", "lowrank"])
def test_closed_form_encoders_equal_scikit_learn_and_pick_the_brute_force_alpha(tmp_path, kind, n, d):
    x, z, split = noisy_problem(n=n, d=d)
    paths = write_stores(tmp_path, x, z.reshape(n, -1)[:, :16], split)
    z = z[:, :16]
    alphas = [0.3, 3.0, 30.0, 300.0, 3000.0]
    hp = {"kind": kind, "alphas": alphas} | ({"rank": 3} if kind == "lowrank" else {})
    out = [tmp_path / n for n in ("m.safetensors", "h.csv", "l.png", "p.zarr")]
    info = encoder.train(*paths, hp, *out)
    losses, best, expected = sklearn_path(x, z, split, alphas, rank=hp.get("rank"))
    assert 0 < alphas.index(best) < len(alphas) - 1  # an interior optimum: the choice is really made
    hist = pd.read_csv(out[1])
    np.testing.assert_allclose(hist["val_loss"], losses, rtol=1e-4)
    assert hist.loc[hist["chosen"], "alpha"].item() == best
    pred = encoder.load_predictions(out[3])["pred"].reshape(len(expected), -1)
    np.testing.assert_allclose(pred, expected, rtol=1e-3, atol=1e-3 * z.std())
    q = z.shape[1]
    assert info["n_parameters"] == (d * q + q if kind == "ridge" else d * 3 + 3 * q + q)
    assert out[2].read_bytes()[:4] == b"\x89PNG"


def test_restandardise_gives_each_latent_element_the_training_mean_and_std(tmp_path):
    x, z, split = noisy_problem()
    z = z[:, :16]
    paths = write_stores(tmp_path, x, z, split)
    out = [tmp_path / n for n in ("m.safetensors", "h.csv", "l.png", "p.zarr")]
    encoder.train(*paths, {"kind": "ridge", "alphas": [3000.0], "restandardise": True}, *out)
    tr = split == "train"
    for which in ("test", "val"):
        pred = encoder.load_predictions(out[3], which)["pred"].reshape(-1, 16)
        assert len(pred) == (split == which).sum()
        np.testing.assert_allclose(pred.mean(0), z[tr].mean(0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(pred.std(0), z[tr].std(0), rtol=1e-3)


# ---- gradient training: best epoch, early stopping, distillation, resume ---------------------


def outputs(root):
    return [root / n for n in ("m.safetensors", "h.csv", "l.png", "p.zarr")]


def val_mse_z(pred_path, z, split):
    """z-scored MSE of the stored validation predictions, from the arrays themselves."""
    va, tr = split == "val", split == "train"
    pred = encoder.load_predictions(pred_path, "val")["pred"].reshape(va.sum(), -1)
    return np.mean(((pred - z[va]) / z[tr].std(0)) ** 2)


@pytest.mark.parametrize("keep", ["best", "last"])
def test_the_kept_weights_are_the_best_or_last_validation_epoch(tmp_path, keep):
    x, z, split = noisy_problem(noise=3.0)
    z = z[:, :16]
    paths = write_stores(tmp_path, x, z, split)
    hp = {"hidden": [64], "dropout": 0.0, "lr": 0.01, "batch_size": 16, "epochs": 25, "keep": keep}
    encoder.train(*paths, hp, *outputs(tmp_path))
    hist = pd.read_csv(tmp_path / "h.csv")
    assert hist["val_loss"].idxmin() != len(hist) - 1  # it overfits: best and last differ
    kept = hist["val_loss"].min() if keep == "best" else hist["val_loss"].iloc[-1]
    assert hist.loc[hist["kept"], "val_loss"].item() == kept
    assert val_mse_z(tmp_path / "p.zarr", z, split) == pytest.approx(kept, rel=1e-4)


def test_early_stopping_waits_patience_epochs_after_the_best(tmp_path):
    x, z, split = noisy_problem(noise=3.0)
    paths = write_stores(tmp_path, x, z[:, :16], split)
    hp = {"hidden": [64], "dropout": 0.0, "lr": 0.01, "batch_size": 16, "epochs": 60, "patience": 3}
    encoder.train(*paths, hp, *outputs(tmp_path))
    hist = pd.read_csv(tmp_path / "h.csv")
    best = hist["epoch"][hist["val_loss"].idxmin()]
    assert len(hist) == best + 3 < 60


def test_a_student_learns_its_teachers_predictions(tmp_path):
    """A deliberately bad teacher (ridge shrunk to the mean) pulls a distilled student to its
    predictions; with distill_weight 0 the same student fits the ground truth instead."""
    x, z, split = linear_problem()
    paths = write_stores(tmp_path, x, z, split)
    encoder.train(*paths, {"kind": "ridge", "alphas": [1e7]}, *outputs(tmp_path / "teacher"))
    teacher = encoder.load_predictions(tmp_path / "teacher" / "p.zarr")["pred"].reshape(-1, 16)
    student = {"kind": "student", "teacher": "t", "hidden": [], "dropout": 0.0, "lr": 0.03, "batch_size": 32,
               "epochs": 150, "seed": 1, "keep": "last"}  # best would be chosen against the truth
    preds = {}
    for w in (1.0, 0.0):
        out = outputs(tmp_path / f"student{w}")
        info = encoder.train(*paths, student | {"distill_weight": w}, *out, teacher=tmp_path / "teacher" / "m.safetensors")
        preds[w] = encoder.load_predictions(out[3])["pred"].reshape(-1, 16)
    te, sd = split == "test", z[split == "train"].std(0)
    assert np.abs((preds[1.0] - teacher) / sd).max() < 0.05  # matches the teacher...
    assert np.mean(((preds[1.0] - z[te]) / sd) ** 2) > 0.8  # ...which is as far from the truth as the mean
    assert np.mean(((preds[0.0] - z[te]) / sd) ** 2) < 1e-3  # without distillation: the truth
    assert info["n_parameters"] == 12 * 16 + 16
    with pytest.raises(BraidError, match="teacher 't'"):
        encoder.train(*paths, student, *outputs(tmp_path / "orphan"))


KILL_AFTER_CHECKPOINT = """
import os, signal, sys
from braid import encoder

writes = []
original = encoder._write_checkpoint

def write_then_die(path, state):
    original(path, state)
    writes.append(state["epoch"])
    if len(writes) == {n}:
        os.kill(os.getpid(), signal.SIGKILL)  # a SLURM kill: no cleanup, no exception handler

encoder._write_checkpoint = write_then_die
encoder.train(*{paths!r}, {hp!r}, *{out!r}, checkpoint_minutes=0)
"""


def test_a_killed_run_resumes_and_ends_with_the_uninterrupted_weights(tmp_path, caplog):
    import subprocess
    import sys

    x, z, split = noisy_problem(noise=3.0)
    paths = [str(p) for p in write_stores(tmp_path, x, z[:, :16], split)]
    hp = {"hidden": [32], "dropout": 0.5, "lr": 0.003, "batch_size": 16, "epochs": 12, "seed": 3}
    whole = outputs(tmp_path / "whole")
    encoder.train(*paths, hp, *whole, checkpoint_minutes=0)
    assert not (tmp_path / "whole" / "m.checkpoint").exists()  # removed once the outputs are written

    out = [str(p) for p in outputs(tmp_path / "killed")]
    code = KILL_AFTER_CHECKPOINT.replace("{n}", "5").format(paths=paths, hp=hp, out=out)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (tmp_path / "killed" / "m.checkpoint").is_file() and not any(Path(p).exists() for p in out)
    with caplog.at_level("INFO"):
        encoder.train(*paths, hp, *out, checkpoint_minutes=0)  # the rerun Snakemake would start
    assert "at epoch 5" in caplog.text  # it resumed: epochs 6..12 only

    with safe_open(str(whole[0]), "pt") as a, safe_open(out[0], "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    pd.testing.assert_frame_equal(pd.read_csv(whole[1]), pd.read_csv(out[1]))


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path, caplog):
    x, z, split = noisy_problem()
    paths = write_stores(tmp_path, x, z[:, :16], split)
    hp = {"hidden": [8], "dropout": 0.0, "lr": 0.003, "batch_size": 16, "epochs": 4}
    out = outputs(tmp_path)
    stale = {"fingerprint": "another run", "epoch": 3}
    encoder._write_checkpoint(tmp_path / "m.checkpoint", stale)
    with caplog.at_level("WARNING"):
        encoder.train(*paths, hp, *out, checkpoint_minutes=0)
    assert "checkpoint of other settings or data" in caplog.text
    assert pd.read_csv(out[1])["epoch"].tolist() == [1, 2, 3, 4]


def test_a_checkpoint_is_read_to_the_host_whatever_the_device(tmp_path, monkeypatch):
    """Checkpoints are loaded with map_location="cpu": the model and the optimiser place their
    tensors, and Adam's step counters stay on the host (on a GPU, map_location=device put them on
    the device: a host sync per parameter per step of the resumed run)."""
    seen = []
    real_load = torch.load

    def recording(*args, **kwargs):
        seen.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording)
    sp = encoder.spec({"hidden": [8]})
    fingerprint = encoder.fingerprint_of(encoder.run_identity(sp, "cpu"))
    model = encoder.build_mlp(4, 3, [8], 0.0)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    encoder._write_checkpoint(tmp_path / "c.checkpoint", {"fingerprint": fingerprint, "optimizer": opt.state_dict()})
    state = encoder._read_checkpoint(tmp_path / "c.checkpoint", fingerprint)
    assert seen == ["cpu"]
    steps = [s["step"] for s in state["optimizer"]["state"].values()]
    assert steps and all(t.device.type == "cpu" for t in steps)


def test_a_checkpoint_resumes_only_on_the_same_device_type_precision_and_teacher_file(tmp_path):
    """The run identity a checkpoint must match: the device type (not its index), the arithmetic
    (bf16 autocast on CUDA, float32 elsewhere) and a student's teacher file, by its bytes."""
    sp = encoder.spec({"hidden": [8]})
    cpu, gpu0, gpu1 = (encoder.run_identity(sp, d) for d in ("cpu", "cuda:0", "cuda:1"))
    assert gpu0 == gpu1 and cpu != gpu0
    assert (cpu["device_type"], cpu["precision"], gpu0["precision"]) == ("cpu", "float32", "bfloat16-autocast")
    no_amp = encoder.run_identity(encoder.spec({"hidden": [8], "autocast": False}), "cuda")
    assert no_amp["precision"] == "float32" and no_amp["device_type"] == "cuda"
    teacher = tmp_path / "t.safetensors"
    teacher.write_bytes(b"weights v1")
    student = encoder.spec({"kind": "student", "teacher": "t", "rank": 2})
    first = encoder.run_identity(student, "cpu", teacher)
    import hashlib

    assert first["teacher_sha256"] == hashlib.sha256(b"weights v1").hexdigest()
    teacher.write_bytes(b"weights v2")  # the teacher was retrained
    assert encoder.run_identity(student, "cpu", teacher) != first
    fingerprints = {encoder.fingerprint_of(i) for i in (cpu, gpu0, no_amp, first)}
    assert len(fingerprints) == 4


# ---- voxel selection: training trials only --------------------------------------------------


def test_reliability_is_the_split_half_correlation_of_repeats():
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(8), [3, 2, 1, 3, 2, 2, 3, 1])  # images seen 1-3 times
    order = rng.permutation(len(ids))
    table = pd.DataFrame({"nsd_id": ids[order] + 50, "global_trial": np.arange(len(ids)) * 3})
    x = rng.standard_normal((len(ids), 5))
    scores = encoder.reliability(x, table)
    # by hand: per image, presentations in time order; the 1st and 3rd against the 2nd
    first, second = [], []
    for image in np.unique(table["nsd_id"]):
        rows = np.flatnonzero(table["nsd_id"].to_numpy() == image)
        rows = rows[np.argsort(table["global_trial"].to_numpy()[rows])]
        if len(rows) >= 2:
            first.append(x[rows[::2]].mean(0))
            second.append(x[rows[1::2]].mean(0))
    from scipy.stats import pearsonr

    expected = [pearsonr(np.array(first)[:, v], np.array(second)[:, v]).statistic for v in range(5)]
    np.testing.assert_allclose(scores, expected, rtol=1e-10)


def test_selection_reads_training_trials_only(tmp_path):
    """Two data sets that differ only in their validation and test trials select the same voxels
    and learn the same weights; the selected voxels are the reliable ones."""
    import zarr

    rng = np.random.default_rng(1)
    n_img, d = 60, 40
    ids = np.repeat(np.arange(n_img), 3)
    signal = rng.standard_normal((n_img, d)) * np.r_[np.full(10, 2.0), np.full(30, 0.05)]  # voxels 0-9 reliable
    x = signal[ids] + rng.standard_normal((len(ids), d))
    z = signal[ids][:, :8] @ rng.standard_normal((8, 16))
    split = np.where(ids < 40, "train", np.where(ids < 50, "val", "test"))
    runs = []
    for k in range(2):
        x_k = x.copy()
        held_out = split != "train"
        x_k[held_out] = rng.standard_normal((held_out.sum(), d)) * (10 if k else 1)
        root = tmp_path / str(k)
        root.mkdir()
        paths = write_stores(root, x_k, z, split)
        table = pd.read_parquet(paths[1])
        table["nsd_id"] = ids + 100
        table.to_parquet(paths[1])
        lat = zarr.open_group(paths[2], mode="w")  # one latent per image
        lat.create_array("nsd_id", data=np.arange(n_img, dtype=np.int64) + 100)
        lat.create_array("latents", data=(signal[:, :8] @ np.ones((8, 16))).reshape(n_img, 4, 2, 2).astype(np.float32))
        # one alpha: the validation rows (which differ) may not choose anything here
        encoder.train(*paths, {"kind": "ridge", "voxels": "reliability", "k": 10, "alphas": [3.0]}, *outputs(root))
        with safe_open(str(root / "m.safetensors"), "pt") as f:
            runs.append({k: f.get_tensor(k) for k in f.keys()})
    assert runs[0]["selection.voxels"].tolist() == list(range(10))
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_ncsnr_selection_takes_the_k_highest_of_nsds_volume_at_the_roi_voxels(tmp_path, caplog):
    import nibabel as nib
    import zarr

    x, z, split = noisy_problem(d=30)
    paths = write_stores(tmp_path, x, z[:, :16], split)
    rng = np.random.default_rng(5)
    ijk = np.stack(np.unravel_index(rng.choice(6 * 7 * 5, 30, replace=False), (6, 7, 5)), axis=1)
    zarr.open_group(paths[0], mode="a").create_array("voxel_ijk", data=ijk.astype(np.int32))
    volume = rng.uniform(0, 2, (6, 7, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(tmp_path / "ncsnr.nii.gz"))
    hp = {"kind": "ridge", "voxels": "ncsnr", "k": 8, "alphas": [10.0]}
    with caplog.at_level("WARNING"):
        info = encoder.train(*paths, hp, *outputs(tmp_path), ncsnr=tmp_path / "ncsnr.nii.gz")
    assert "test images' repeats included" in caplog.text
    values = volume[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        assert f.get_tensor("selection.voxels").tolist() == sorted(np.argsort(-values)[:8].tolist())
    assert info["n_voxels"] == 8 and info["n_parameters"] == 8 * 16 + 16
    with pytest.raises(BraidError, match="voxels: ncsnr needs NSD's ncsnr.nii.gz"):
        encoder.train(*paths, hp, *outputs(tmp_path / "none"))
    (tmp_path / "bad.nii.gz").write_bytes(b"truncated")
    with pytest.raises(BraidError, match="bad.nii.gz: not a readable NIfTI"):
        encoder.train(*paths, hp, *outputs(tmp_path / "bad"), ncsnr=tmp_path / "bad.nii.gz")


def test_reference_rows_predict_the_true_latent_and_the_training_mean(stage_inputs, tmp_path):
    """true-latent predicts every test trial's own z0 (latent r 1, 2-way 1); mean-latent the mean of the
    training trials' latents, computed here with numpy (r 0); both in an encoder's predictions format."""
    d = stage_inputs
    trials = pd.read_parquet(d / "trials.parquet")
    cache = LatentCache(d / "latents.zarr")
    train = cache.get(trials.loc[trials["split"] == "train", "nsd_id"].to_numpy()).astype(np.float64)
    for name in encoder.REFERENCES:
        encoder.write_reference_predictions(name, d / "trials.parquet", d / "latents.zarr", tmp_path / f"{name}.zarr")
    for split in ("test", "val"):
        rows = trials[trials["split"] == split]
        true = encoder.load_predictions(tmp_path / "true-latent.zarr", split)
        np.testing.assert_array_equal(true["nsd_id"], rows["nsd_id"].to_numpy())
        np.testing.assert_array_equal(true["global_trial"], rows["global_trial"].to_numpy())
        np.testing.assert_array_equal(true["pred"], cache.get(rows["nsd_id"].to_numpy()))
        mean = encoder.load_predictions(tmp_path / "mean-latent.zarr", split)
        np.testing.assert_allclose(mean["pred"], np.broadcast_to(train.mean(0), mean["pred"].shape), rtol=1e-5, atol=1e-6)
    true = encoder.load_predictions(tmp_path / "true-latent.zarr")
    np.testing.assert_allclose(true["z_std"], train.std(0), rtol=1e-5)
    assert true["n_parameters"] == 0 and true["spec"] == {"kind": "true-latent"}
    z = cache.get(true["nsd_id"])
    flat = lambda a: a.reshape(len(a), -1)  # noqa: E731
    m = latent_metrics(flat(true["pred"]), flat(z), flat(true["z_mean"][None])[0], flat(true["z_std"][None])[0], true["nsd_id"])
    assert m["latent_r"] == pytest.approx(1) and m["latent_two_way"] == 1 and m["latent_mse"] == 0
    mean = encoder.load_predictions(tmp_path / "mean-latent.zarr")
    m = latent_metrics(flat(mean["pred"]), flat(z), flat(mean["z_mean"][None])[0], flat(mean["z_std"][None])[0], mean["nsd_id"])
    assert abs(m["latent_r"]) < 1e-5
    with pytest.raises(BraidError, match="evaluate.references"):
        encoder.write_reference_predictions("oracle", d / "trials.parquet", d / "latents.zarr", tmp_path / "x.zarr")
