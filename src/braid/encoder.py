"""The fMRI encoders f_θ: voxels -> the VAE latent z0, and how each is fitted.

Every kind works in z-scored space: inputs z-scored per voxel and targets per latent element with
the training split's statistics (stored with the weights), so that predictions go back to the
VAE's scale by the inverse map. Kinds (``encoders.<name>.kind`` in the config):

- ``mlp``: the seed design, Linear -> LayerNorm -> ReLU -> Dropout per hidden layer and a linear
  output, MSE, Adam; at 4,657 inputs and hidden [2048, 4096] it has 85,069,824 parameters.
- ``ridge``: closed-form ridge regression (Takagi's and Brain-Diffuser's baseline). One
  eigendecomposition gives the validation predictions of every alpha in the grid at once; the
  alpha with the lowest validation MSE is kept.
- ``lowrank``: reduced-rank ridge: voxels -> rank r -> latents, the rank-r truncation of ridge's
  fitted values (closed form; alpha chosen on validation for that rank). Sweeping r sweeps the
  parameter count.
- ``student``: a small network (``rank`` -> low-rank, else an MLP of ``hidden``) trained by
  gradient descent to match a trained teacher encoder's predictions on the training trials
  (``distill_weight`` 1 = teacher only, 0 = ground truth only).

Which voxels an encoder reads is part of it (``voxels``: all, or the top ``k`` by split-half
reliability on training trials only, or NSD's ``ncsnr``). Parameter counts are those of the network (weights and
biases), not of the standardiser, as in the seed's count.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .common import BraidError, atomic_output
from .figures import save_figure, stamped
from .integrity import file_sha256, new_array, new_group, open_store
from .scores import rowwise_pearson, standardiser

log = logging.getLogger(__name__)

KINDS = ("mlp", "ridge", "lowrank", "student")
_SELECTION = ("kind", "voxels", "k", "restandardise")
_GRADIENT = ("lr", "weight_decay", "batch_size", "epochs", "seed", "keep", "patience", "autocast")
KIND_KEYS = {
    "mlp": (*_SELECTION, *_GRADIENT, "hidden", "dropout"),
    "ridge": (*_SELECTION, "alphas"),
    "lowrank": (*_SELECTION, "alphas", "rank"),
    "student": (*_SELECTION, *_GRADIENT, "teacher", "hidden", "dropout", "rank", "distill_weight"),
}
DEFAULTS = {
    "kind": "mlp", "voxels": "all", "k": None, "restandardise": False,
    "hidden": [2048, 4096], "dropout": 0.5, "lr": 1.0e-4, "weight_decay": 0.0, "batch_size": 512, "epochs": 200,
    "seed": 0, "keep": "best", "patience": None, "autocast": True,
    "alphas": [float(f"{10 ** (e / 2):.4g}") for e in range(-4, 15)],  # 0.01 ... 1e7, half decades
    "rank": None, "teacher": None, "distill_weight": 1.0,
}


def spec(cfg: dict) -> dict:
    """The settings that define an encoder of ``cfg['kind']``, defaults filled in, nothing else:
    a setting another kind uses (an MLP's lr for ridge) is not part of it, so it reruns nothing."""
    kind = cfg.get("kind", "mlp")
    if kind not in KINDS:
        raise BraidError(f"encoder kind {kind!r} is not one of {', '.join(KINDS)}")
    out = {key: cfg.get(key, DEFAULTS[key]) for key in KIND_KEYS[kind]}
    if kind == "student" and not out["teacher"]:
        raise BraidError("a student encoder needs `teacher`: the name of the encoder it learns from")
    if kind == "lowrank" and not out["rank"]:
        raise BraidError("a lowrank encoder needs `rank` (>= 1)")
    if out["voxels"] == "all" and out["k"] is not None:
        raise BraidError(f"encoder setting k={out['k']} needs voxels: reliability or ncsnr (voxels: all uses every ROI voxel)")
    if out["voxels"] != "all" and not out["k"]:
        raise BraidError(f"voxels: {out['voxels']} needs k, the number of voxels to keep")
    return out


# ---------------------------------------------------------------------------------------------
# Networks


def build_mlp(n_in: int, n_out: int, hidden: list[int], dropout: float):
    import torch.nn as nn

    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        layers += [nn.Linear(width, h), nn.LayerNorm(h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


def build_lowrank(n_in: int, n_out: int, rank: int):
    """voxels -> rank (no bias) -> latents: n_in*rank + rank*n_out + n_out parameters."""
    import torch.nn as nn

    return nn.Sequential(nn.Linear(n_in, rank, bias=False), nn.Linear(rank, n_out))


def architecture(sp: dict) -> dict:
    """The network an encoder spec fits: what :func:`build` needs besides the sizes."""
    if sp["kind"] == "ridge":
        return {"type": "mlp", "hidden": [], "dropout": 0.0}
    if sp["kind"] == "lowrank" or (sp["kind"] == "student" and sp["rank"]):
        return {"type": "lowrank", "rank": int(sp["rank"])}
    return {"type": "mlp", "hidden": [int(h) for h in sp["hidden"]], "dropout": float(sp["dropout"])}


def build(arch: dict, n_in: int, n_out: int):
    if arch["type"] == "lowrank":
        return build_lowrank(n_in, n_out, arch["rank"])
    return build_mlp(n_in, n_out, arch["hidden"], arch["dropout"])


def n_parameters(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# ---------------------------------------------------------------------------------------------
# Data and voxel selection


def load_rows(betas_path, trials_path, split: str):
    """Betas rows (every ROI voxel) and table rows of one split; only that split's rows are read."""
    from .betas import open_betas

    table = pd.read_parquet(trials_path)
    rows = np.flatnonzero(table["split"].to_numpy() == split)
    if rows.size == 0:
        raise BraidError(f"{trials_path}: no '{split}' trials; check config split")
    store = open_betas(betas_path)["betas"]
    if len(table) != store.shape[0]:
        raise BraidError(f"{trials_path} and {betas_path} disagree on the number of trials; rerun the betas rule")
    betas = np.asarray(store.get_orthogonal_selection((rows, slice(None))), np.float32)
    return betas, table.iloc[rows].reset_index(drop=True)


def targets_of(latents):
    """The targets an encoder fits: ``latents`` itself when it has ``get``/``shape``/``weights`` (a
    :class:`braid.latents.LatentCache`, a :class:`braid.semantic.SemanticTargets`), else the latent
    cache at that path."""
    from .latents import LatentCache

    return latents if hasattr(latents, "get") else LatentCache(latents)


def load_split(betas_path, trials_path, latents, split: str):
    """Betas rows, targets (flattened), trial rows and target shape of one split (``latents``: see
    :func:`targets_of`)."""
    betas, sub = load_rows(betas_path, trials_path, split)
    cache = targets_of(latents)
    latents = cache.get(sub["nsd_id"].to_numpy()).reshape(len(sub), -1)
    return betas, latents, sub, cache.shape


def reliability(betas: np.ndarray, table: pd.DataFrame) -> np.ndarray:
    """Split-half reliability per voxel from the rows given (the caller passes training rows only).

    Each image seen at least twice contributes the mean of its even-numbered presentations
    (1st, 3rd) and the mean of its odd-numbered ones (2nd); the score is the Pearson r across
    images of those two halves. NaN scores (constant voxels) become -1, so they are chosen last.
    """
    order = table.reset_index(drop=True).sort_values(["nsd_id", "global_trial"]).index.to_numpy()
    ids = table["nsd_id"].to_numpy()[order]
    presentation = pd.Series(ids).groupby(ids).cumcount().to_numpy()
    counts = pd.Series(ids).map(pd.Series(ids).value_counts()).to_numpy()
    keep = counts >= 2
    if np.unique(ids[keep]).size < 3:
        raise BraidError(
            f"voxels: reliability needs training images seen at least twice (found {np.unique(ids[keep]).size}); "
            "use betas.trials: single or average_test, more sessions, or voxels: all"
        )
    ids, presentation, x = ids[keep], presentation[keep], betas[order][keep].astype(np.float64)
    images, inverse = np.unique(ids, return_inverse=True)
    halves = []
    for parity in (0, 1):
        sel = presentation % 2 == parity
        total = np.zeros((images.size, x.shape[1]))
        np.add.at(total, inverse[sel], x[sel])
        halves.append(total / np.bincount(inverse[sel], minlength=images.size)[:, None])
    a, b = (h - h.mean(0) for h in halves)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))
    return np.where(np.isfinite(r), r, -1.0)


def ncsnr_scores(ncsnr_path, betas_path) -> np.ndarray:
    """NSD's ncsnr at each column of the betas store (its ``voxel_ijk``); NaN scores become -1."""
    import nibabel as nib

    from .betas import open_betas

    try:
        volume = np.asarray(nib.load(str(ncsnr_path)).dataobj, dtype=np.float64)
    except Exception as err:
        raise BraidError(f"{ncsnr_path}: not a readable NIfTI volume ({err}); delete it and rerun nsd_fetch") from err
    ijk = np.asarray(open_betas(betas_path)["voxel_ijk"][:])
    if volume.ndim != 3 or (ijk >= np.array(volume.shape)).any():
        raise BraidError(f"{ncsnr_path}: shape {volume.shape} does not hold the ROI voxels of {betas_path}; "
                         "check nsd.resolution and nsd.beta_version")
    scores = volume[tuple(ijk.T)]
    return np.where(np.isfinite(scores), scores, -1.0)


def select_voxels(sp: dict, x_train: np.ndarray, train_rows: pd.DataFrame,
                  ncsnr: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Column indices (sorted) an encoder reads, and the scores they were chosen by (None for all).

    ``reliability`` is computed here from training rows only (no validation or test trial
    reaches this function). ``ncsnr`` takes NSD's precomputed scores (``ncsnr``, one per column),
    which NSD derived from all of the subject's trials, test images included.
    """
    n = x_train.shape[1]
    if sp["voxels"] == "all":
        return np.arange(n), None
    if sp["k"] > n:
        raise BraidError(f"encoder k={sp['k']} exceeds the {n} voxels of the ROI; lower k")
    if sp["voxels"] == "ncsnr":
        if ncsnr is None:
            raise BraidError("voxels: ncsnr needs NSD's ncsnr.nii.gz of the subject (the encoder_train rule fetches it)")
        log.warning("voxels: ncsnr ranks voxels by NSD's ncsnr, which NSD computed from all trials, the test "
                    "images' repeats included; voxels: reliability uses training trials only")
        scores = np.asarray(ncsnr, np.float64)
    else:
        scores = reliability(x_train, train_rows)
    top = np.sort(np.argsort(-scores, kind="stable")[: sp["k"]])
    return top, scores


# ---------------------------------------------------------------------------------------------
# Closed-form fits


class RidgePath:
    """Ridge regression of z-scored Z on z-scored X for many alphas from one eigendecomposition.

    With X = L diag(sqrt(λ)) Vᵀ (L orthonormal, n x k; k = min(n, p)), the ridge weights are
    B_α = W0 diag(1/(λ+α)) C with W0 = Xᵀ L and C = Lᵀ Z, and the training fit is
    L diag(λ/(λ+α)) C. L and λ come from ``eigh`` of the smaller Gram matrix (X Xᵀ when n ≤ p,
    else XᵀX), computed in float64 on the device. X and Z are centred (z-scored with their own
    statistics), so there is no intercept.
    """

    def __init__(self, x, z):
        import torch

        x = x.double()
        n, p = x.shape
        if n <= p:
            lam, L = torch.linalg.eigh(x @ x.T)
        else:
            lam, V = torch.linalg.eigh(x.T @ x)
        keep = lam > lam.max() * 1e-10
        lam = lam[keep]
        if n <= p:
            L = L[:, keep]
        else:
            L = (x @ V[:, keep]) / lam.sqrt()
        self.lam, self.W0, self.C = lam, x.T @ L, L.T @ z.double()
        self._G = None

    def coefficients(self, alpha: float):
        """k x q: the ridge weights are ``W0 @ coefficients`` and the predictions for X' are
        ``(X' W0) @ coefficients``, so ``X' W0`` is computed once for every alpha."""
        return self.C / (self.lam + alpha)[:, None]

    def lowrank(self, alpha: float, rank: int):
        """(k x r, r x q) factors of reduced-rank ridge: B_α projected on the top-r right singular
        vectors Vr of the training fit F = L D C (D = λ/(λ+α)), so that X (W0 M) W2 is the best
        rank-r approximation of F; the p x r first layer is ``W0 @ M``."""
        import torch

        if self._G is None:
            self._G = self.C @ self.C.T
        d = self.lam / (self.lam + alpha)
        s2, E = torch.linalg.eigh(d[:, None] * self._G * d[None, :])
        top = torch.argsort(s2, descending=True)[:rank]
        E, s = E[:, top], s2[top].clamp_min(1e-30).sqrt()
        w2 = (E.T * d[None, :]) @ self.C / s[:, None]  # r x q: Vrᵀ, orthonormal rows
        return self.coefficients(alpha) @ w2.T, w2


def fit_closed_form(sp: dict, xt, zt, xv, zv, model):
    """Fit a ridge or lowrank ``model`` in place; returns the per-alpha validation table."""
    import torch

    path = RidgePath(xt, zt)
    xv_w0 = xv.double() @ path.W0  # nv x k, shared by every alpha
    rows, kept = [], None  # only the best fit so far is kept (a ridge fit is k x q doubles)
    for alpha in sp["alphas"]:
        fit = (path.coefficients(alpha),) if sp["kind"] == "ridge" else path.lowrank(alpha, sp["rank"])
        pred = xv_w0 @ fit[0] if len(fit) == 1 else (xv_w0 @ fit[0]) @ fit[1]
        rows.append({"alpha": float(alpha), "val_loss": float(torch.mean((pred - zv.double()) ** 2))})
        if kept is None or rows[-1]["val_loss"] < kept[0]:
            kept = (rows[-1]["val_loss"], fit)
    table = pd.DataFrame(rows)
    best = int(np.argmin(table["val_loss"].to_numpy()))  # the first minimum, as the loop keeps it
    alpha = float(table["alpha"].iloc[best])
    fit = kept[1]
    if best in (0, len(table) - 1) and len(table) > 1:
        log.warning("alpha %g is at the edge of the grid %s; widen encoders.<name>.alphas", alpha, sp["alphas"])
    first = (path.W0 @ fit[0]).T.float()  # ridge: q x p; lowrank: r x p
    with torch.no_grad():
        model[0].weight.copy_(first)
        if sp["kind"] == "ridge":
            model[0].bias.zero_()
        else:
            model[1].weight.copy_(fit[1].T.float())
            model[1].bias.zero_()
    table["chosen"] = np.arange(len(table)) == best
    log.info("%s: alpha %g chosen on validation (MSE %.4f)", sp["kind"], alpha, table["val_loss"].iloc[best])
    return table


# ---------------------------------------------------------------------------------------------
# Gradient training: data on the device, index batches, checkpoints that resume exactly


def _write_checkpoint(path: Path, state: dict) -> None:
    import torch

    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def _read_checkpoint(path: Path, fingerprint: str):
    """The checkpoint's state, loaded to the CPU (the model and the optimiser place their tensors:
    Adam's ``step`` counters stay on the host, as a fresh run keeps them, so that a resumed run
    does not synchronise with the GPU per parameter per step); None if absent or of another run."""
    import torch

    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a checkpoint that cannot be read is not trusted; training restarts
        log.warning("%s: unreadable checkpoint (%s); training starts from epoch 0", path, err)
        return None
    if state.get("fingerprint") != fingerprint:
        log.warning("%s: checkpoint of other settings or data; training starts from epoch 0", path)
        return None
    return state


def fit_gradient(sp: dict, model, xt, tt, xv, zv, device: str, checkpoint: Path, fingerprint: str,
                 checkpoint_minutes: float = 10.0) -> pd.DataFrame:
    """Adam on MSE to targets ``tt`` (z-scored), validated against ``zv`` every epoch.

    Keeps the best validation epoch (``keep: best``) or the last; stops early after ``patience``
    epochs without improvement. Every ``checkpoint_minutes`` (0 = every epoch) the model, the
    optimiser, the best state and every random state go to ``checkpoint``; a rerun with the same
    fingerprint (:func:`run_identity`: settings, data, device type, precision, teacher file)
    continues from there and ends with the weights an uninterrupted run ends with: bit for bit on
    a CPU (tested), and on a GPU when it is the same GPU model, driver and software
    (``make gpu-check`` checks it there).
    bf16 autocast is used on CUDA when ``autocast`` is set.
    """
    import torch
    from .progress import progress

    from .device import precision

    opt = torch.optim.Adam(model.parameters(), lr=sp["lr"], weight_decay=sp["weight_decay"])
    gen = torch.Generator().manual_seed(sp["seed"])
    cuda = device.startswith("cuda")
    bf16 = precision(device, sp["autocast"]) != "float32"

    def amp():  # a fresh context per use
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)

    history: list[dict] = []
    best = {"epoch": 0, "val_loss": float("inf"), "state": None}
    start = 0
    saved = _read_checkpoint(checkpoint, fingerprint)
    if saved is not None:
        history, start, best = _resume(saved, model, opt, gen, device)
        log.info("resumed from %s at epoch %d", checkpoint, start)
    zv_host = zv.cpu().numpy()
    last_save = time.monotonic()
    bar = progress(range(start + 1, sp["epochs"] + 1), desc="epochs", unit="epoch", mininterval=2, initial=start, total=sp["epochs"])
    for epoch in bar:
        if sp["patience"] and epoch - best["epoch"] > sp["patience"] and best["epoch"] > 0:
            log.info("early stop at epoch %d: no improvement since epoch %d", epoch - 1, best["epoch"])
            break
        train_loss = _train_epoch(model, opt, xt, tt, torch.randperm(len(xt), generator=gen).to(device),
                                  sp["batch_size"], amp)
        if not np.isfinite(train_loss):
            raise BraidError(f"training diverged at epoch {epoch} (loss {train_loss}); lower encoders.<name>.lr")
        model.eval()
        with torch.no_grad(), amp():
            pv = torch.cat([model(xv[s : s + 4096]).float() for s in range(0, len(xv), 4096)])
        val_loss = float(torch.mean((pv - zv) ** 2))
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                        "val_latent_r": float(np.mean(rowwise_pearson(pv.cpu().numpy(), zv_host)))})
        if val_loss < best["val_loss"]:
            best = {"epoch": epoch, "val_loss": val_loss,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}", best=best["epoch"], refresh=False)
        if epoch < sp["epochs"] and time.monotonic() - last_save >= 60 * checkpoint_minutes:
            state = {"fingerprint": fingerprint, "epoch": epoch, "model": model.state_dict(),
                     "optimizer": opt.state_dict(), "generator": gen.get_state(), "cpu_rng": torch.get_rng_state(),
                     "history": history, "best_epoch": best["epoch"], "best_val_loss": best["val_loss"],
                     "best_state": best["state"]}
            if cuda:
                state["cuda_rng"] = torch.cuda.get_rng_state(device)
            _write_checkpoint(checkpoint, state)
            last_save = time.monotonic()
    if sp["keep"] == "best" and best["state"] is not None:
        model.load_state_dict(best["state"])
    hist = pd.DataFrame(history)
    hist["kept"] = hist["epoch"] == (best["epoch"] if sp["keep"] == "best" else hist["epoch"].iloc[-1])
    return hist


def _resume(saved: dict, model, opt, gen, device: str) -> tuple[list[dict], int, dict]:
    """Put a checkpoint's model, optimiser and random states back; return its history, epoch and best."""
    import torch

    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])  # moves moment estimates to the parameters' device
    gen.set_state(saved["generator"])
    torch.set_rng_state(saved["cpu_rng"])
    if device.startswith("cuda") and "cuda_rng" in saved:
        torch.cuda.set_rng_state(saved["cuda_rng"], device)
    best = {"epoch": int(saved["best_epoch"]), "val_loss": float(saved["best_val_loss"]), "state": saved["best_state"]}
    return list(saved["history"]), int(saved["epoch"]), best


def _train_epoch(model, opt, xt, tt, perm, batch_size: int, amp) -> float:
    """One pass over the training rows in the order ``perm``; the mean MSE of its batches, per row."""
    import torch

    model.train()
    total = torch.zeros((), device=xt.device)
    for s in range(0, len(xt), batch_size):
        idx = perm[s : s + batch_size]
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = torch.nn.functional.mse_loss(model(xt[idx]).float(), tt[idx])
        loss.backward()
        opt.step()
        total += loss.detach() * len(idx)
    return float(total) / len(xt)


# ---------------------------------------------------------------------------------------------
# Saved encoders


class Encoder:
    """A trained encoder read back from its safetensors file: network, voxels, standardiser."""

    def __init__(self, path, device: str = "cpu"):
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            self.spec, self.arch = json.loads(meta["spec"]), json.loads(meta["architecture"])
            self.latent_shape = tuple(json.loads(meta["latent_shape"]))
        except Exception as err:
            raise BraidError(f"{path}: not a BRAID encoder file ({err}); rerun the encoder_train rule") from err
        self.voxels = tensors.pop("selection.voxels").numpy()
        scores = tensors.pop("selection.scores", None)
        self.scores = None if scores is None else scores.numpy()
        self.std = {k: tensors.pop(f"standardiser.{k}").numpy() for k in ("x_mean", "x_std", "z_mean", "z_std")}
        self.model = build(self.arch, self.voxels.size, int(np.prod(self.latent_shape)))
        self.model.load_state_dict(tensors)
        self.model.to(device).eval()
        self.device, self.meta = device, meta

    def predict_z(self, betas: np.ndarray):
        """Predictions in z-scored latent space for rows of betas (every ROI voxel)."""
        import torch

        x = (betas[:, self.voxels] - self.std["x_mean"]) / self.std["x_std"]
        with torch.no_grad():
            return self.model(torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.device)).float()


def fingerprint_of(sp: dict, *arrays) -> str:
    """Settings and a checksum of the data: a checkpoint resumes only the run it came from."""
    import hashlib

    h = hashlib.sha256(json.dumps(sp, sort_keys=True).encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def run_identity(sp: dict, device: str, teacher=None) -> dict:
    """What a checkpoint must share with the run that resumes it, besides the data: the settings,
    the device type and the arithmetic (an attempt that fell back to the CPU trains in float32, one on
    a GPU in bf16 autocast), and for a student its teacher's file (a retrained teacher changes it;
    the teacher's predictions are not hashed: their last bits differ between GPU models and drivers)."""
    import torch

    from .device import precision

    out = {**sp, "device_type": torch.device(device).type, "precision": precision(device, sp["autocast"])}
    if teacher is not None:
        out["teacher_sha256"] = file_sha256(teacher)
    return out


def train(betas_path, trials_path, latents_path, params: dict, out_model, out_history, out_plot, out_predictions,
          device: str = "cpu", teacher=None, checkpoint_minutes: float = 10.0, ncsnr=None) -> dict:
    """Fit one encoder; write weights, history, loss curve and validation + test predictions.

    ``teacher`` is the safetensors file of the teacher (students only), ``ncsnr`` NSD's ncsnr
    volume of the subject (``voxels: ncsnr`` only). The checkpoint lives
    next to ``out_model`` (``<name>.checkpoint``) and is removed once the outputs are written.
    """
    import torch

    sp = spec(params)
    if sp["kind"] == "student" and teacher is None:
        raise BraidError(f"student encoder: the teacher {sp['teacher']!r}'s encoder file is required")
    cache = targets_of(latents_path)
    x_all, z_tr, rows_tr, latent_shape = load_split(betas_path, trials_path, cache, "train")
    xv_all, z_va, rows_va, _ = load_split(betas_path, trials_path, cache, "val")
    for name, arr in (("betas (train)", x_all), ("latents (train)", z_tr), ("betas (val)", xv_all)):
        if not np.isfinite(arr).all():
            raise BraidError(f"{name} contain NaN or inf values; rerun the betas/latents rules")
    ncsnr_values = ncsnr_scores(ncsnr, betas_path) if sp["voxels"] == "ncsnr" and ncsnr else None
    voxels, scores = select_voxels(sp, x_all, rows_tr, ncsnr_values)
    x_tr, x_va = x_all[:, voxels], xv_all[:, voxels]
    x_mean, x_std = standardiser(x_tr)
    z_mean, z_std = standardiser(z_tr)

    def dev(a):
        return torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(device)

    xt, zt = dev((x_tr - x_mean) / x_std), dev((z_tr - z_mean) / z_std)
    xv, zv = dev((x_va - x_mean) / x_std), dev((z_va - z_mean) / z_std)
    arch = architecture(sp)
    torch.manual_seed(sp.get("seed", 0))
    model = build(arch, xt.shape[1], zt.shape[1]).to(device)
    n_params = n_parameters(model)
    log.info("encoder %s %s: %d parameters, %d of %d voxels, %d train / %d val trials", sp["kind"], arch, n_params,
             voxels.size, x_all.shape[1], len(xt), len(xv))
    checkpoint = Path(out_model).with_suffix(".checkpoint")
    if sp["kind"] in ("ridge", "lowrank"):
        hist = fit_closed_form(sp, xt, zt, xv, zv, model)
    else:
        targets = _distillation_targets(sp, teacher, x_all, zt, z_mean, z_std, device) if sp["kind"] == "student" else zt
        fingerprint = fingerprint_of(run_identity(sp, device, teacher), x_tr, z_tr, x_va, z_va, voxels)
        hist = fit_gradient(sp, model, xt, targets, xv, zv, device, checkpoint, fingerprint, checkpoint_minutes)
    model.eval()
    standardisers = {"x_mean": x_mean, "x_std": x_std, "z_mean": z_mean, "z_std": z_std}
    _save_encoder(out_model, model, standardisers, voxels, scores, sp, arch, cache.weights, latent_shape)
    with atomic_output(out_history) as tmp:
        hist.to_csv(tmp, index=False)
    shape = f"rank {arch['rank']}" if arch["type"] == "lowrank" else f"hidden {arch['hidden']}" if arch["hidden"] else "linear"
    plot_history(hist, out_plot, stamped(f"{sp['kind']}, {shape}: {n_params:,} parameters, {voxels.size} voxels",
                                         [cache.weights]),
                 train_label=f"train (to {sp['teacher']}'s predictions)" if sp["kind"] == "student" else "train")
    enc = Encoder(out_model, device)
    write_predictions(enc, sp, {"val": (xv_all, rows_va), "test": load_rows(betas_path, trials_path, "test")},
                      out_predictions, n_params, getattr(cache, "predictions_arrays", {}),
                      getattr(cache, "predictions_attrs", {}))
    checkpoint.unlink(missing_ok=True)
    kept = hist["kept"] if "kept" in hist else hist["chosen"]
    return {"n_parameters": n_params, "n_voxels": int(voxels.size), "val_loss": float(hist.loc[kept, "val_loss"].iloc[0])}


def _distillation_targets(sp: dict, teacher, x_all, zt, z_mean, z_std, device: str):
    """A student's targets: the teacher's predictions (z-scored with the student's statistics)
    mixed with the truth ``zt`` by ``distill_weight``."""
    import torch

    t = Encoder(teacher, device)
    raw = t.predict_z(x_all) * torch.from_numpy(t.std["z_std"]).to(device) + torch.from_numpy(t.std["z_mean"]).to(device)
    teacher_z = (raw - torch.from_numpy(z_mean).to(device)) / torch.from_numpy(z_std).to(device)
    w = sp["distill_weight"]
    log.info("student of %s (%s parameters)", sp["teacher"], t.meta.get("n_parameters"))
    return w * teacher_z + (1 - w) * zt  # the MSE to this mix = w·MSE(teacher) + (1-w)·MSE(truth) + const


def _save_encoder(out_model, model, standardisers: dict, voxels: np.ndarray, scores, sp: dict, arch: dict,
                  model_weights: str, latent_shape) -> None:
    """The encoder file (weights, standardisers, voxel selection; settings in its metadata) and
    its JSON description beside it."""
    import torch
    from safetensors.torch import save_file

    n_params = n_parameters(model)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, arr in standardisers.items():
        state[f"standardiser.{name}"] = torch.from_numpy(arr)
    state["selection.voxels"] = torch.from_numpy(voxels.astype(np.int64))
    if scores is not None:
        state["selection.scores"] = torch.from_numpy(scores.astype(np.float32))
    meta = {"spec": json.dumps(sp, sort_keys=True), "architecture": json.dumps(arch, sort_keys=True),
            "n_parameters": str(n_params), "model_weights": model_weights,
            "latent_shape": json.dumps(list(latent_shape)), "n_voxels": str(voxels.size)}
    with atomic_output(out_model) as tmp:
        save_file(state, str(tmp), metadata=meta)
    with atomic_output(Path(out_model).with_suffix(".json")) as tmp:
        Path(tmp).write_text(json.dumps({"spec": sp, "architecture": arch, "n_parameters": n_params,
                                         "n_voxels": int(voxels.size), "latent_shape": list(latent_shape),
                                         "model_weights": model_weights}, indent=2, sort_keys=True) + "\n")


def write_predictions(enc: Encoder, sp: dict, splits: dict, out_path, n_params: int, arrays: dict | None = None,
                      attrs: dict | None = None) -> None:
    """Predicted latents in the VAE's scale (as img2img consumes them) for the validation and test
    trials (``splits``: split -> (betas rows, trial rows)): the test split at the root (``pred``,
    ``nsd_id``, ``global_trial``), validation under ``val/``.

    With ``restandardise`` each latent element's predictions are re-standardised across the split
    and rescaled to the training latents' mean/std (Brain-Diffuser's post-processing). ``arrays``
    and ``attrs``: what the targets add (a semantic target's token components)."""

    with atomic_output(out_path) as tmp:
        root = new_group(tmp)
        for split, group in (("test", root), ("val", root.create_group("val"))):
            x, rows = splits[split]  # every ROI voxel, and the trial rows
            z = enc.predict_z(x).cpu().numpy().astype(np.float64)
            if sp["restandardise"]:
                sd = z.std(0)
                z = (z - z.mean(0)) / np.where(sd > 0, sd, 1.0)
            pred = z * enc.std["z_std"] + enc.std["z_mean"]
            new_array(group, "pred", data=pred.reshape(len(pred), *enc.latent_shape).astype(np.float32))
            new_array(group, "nsd_id", data=rows["nsd_id"].to_numpy().astype(np.int64))
            new_array(group, "global_trial", data=rows["global_trial"].to_numpy().astype(np.int64))
        new_array(root, "z_mean", data=enc.std["z_mean"].reshape(enc.latent_shape))
        new_array(root, "z_std", data=enc.std["z_std"].reshape(enc.latent_shape))
        for name, value in (arrays or {}).items():
            new_array(root, name, data=np.asarray(value, np.float32))
        root.attrs.update({**(attrs or {}), "n_parameters": n_params, "n_voxels": int(enc.voxels.size), "spec": sp,
                           "model_weights": enc.meta.get("model_weights", "")})


REFERENCES = ("true-latent", "mean-latent")  # reference rows scored beside the encoders (config evaluate.references)


def write_reference_predictions(reference: str, trials_path, latents_path, out_path) -> None:
    """A predictions store, like an encoder's, for a reference row: ``true-latent`` predicts every
    validation and test trial's own latent z0 (a perfect encoder: decoded it is the autoencoder's
    ceiling, through img2img this design's), ``mean-latent`` the training trials' mean latent
    (no information: chance level). 0 parameters; ``z_mean``/``z_std`` are the training trials'
    statistics, as an encoder's are."""

    from .latents import LatentCache

    if reference not in REFERENCES:
        raise BraidError(f"reference {reference!r} is not one of {', '.join(REFERENCES)} (config evaluate.references)")
    table = pd.read_parquet(trials_path)
    cache = LatentCache(latents_path)
    train = cache.get(table.loc[table["split"] == "train", "nsd_id"].to_numpy())
    if not len(train):
        raise BraidError(f"{trials_path}: no training trials; check config split")
    z_mean, z_std = standardiser(train.reshape(len(train), -1))
    with atomic_output(out_path) as tmp:
        root = new_group(tmp)
        for split, group in (("test", root), ("val", root.create_group("val"))):
            rows = table[table["split"] == split]
            if reference == "true-latent":
                pred = cache.get(rows["nsd_id"].to_numpy())
            else:
                pred = np.broadcast_to(z_mean.reshape(cache.shape), (len(rows), *cache.shape))
            new_array(group, "pred", data=np.ascontiguousarray(pred, np.float32))
            new_array(group, "nsd_id", data=rows["nsd_id"].to_numpy().astype(np.int64))
            new_array(group, "global_trial", data=rows["global_trial"].to_numpy().astype(np.int64))
        new_array(root, "z_mean", data=z_mean.reshape(cache.shape))
        new_array(root, "z_std", data=z_std.reshape(cache.shape))
        root.attrs.update({"n_parameters": 0, "n_voxels": 0, "spec": {"kind": reference},
                           "model_weights": cache.weights})


def plot_history(hist: pd.DataFrame, path, title: str, train_label: str = "train") -> None:
    """Gradient training: losses and validation r per epoch, the kept epoch marked. Closed form:
    validation MSE against alpha, the chosen alpha marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "epoch" in hist:
        fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
        a.plot(hist["epoch"], hist["train_loss"], label=train_label)
        a.plot(hist["epoch"], hist["val_loss"], label="val")
        kept = hist[hist["kept"]]
        a.scatter(kept["epoch"], kept["val_loss"], color="k", zorder=3, s=18, label="kept")
        a.set_xlabel("epoch")
        b.plot(hist["epoch"], hist["val_latent_r"], color="tab:green")
        b.set_xlabel("epoch")
        b.set_ylabel("val latent r")
    else:
        fig, a = plt.subplots(figsize=(5, 3.2))
        a.semilogx(hist["alpha"], hist["val_loss"], marker="o", label="val")
        chosen = hist[hist["chosen"]]
        a.scatter(chosen["alpha"], chosen["val_loss"], color="k", zorder=3, s=30, label="chosen")
        a.set_xlabel("ridge alpha")
    a.set_ylabel("MSE (z-scored latents)")
    a.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def load_predictions(path, split: str = "test"):
    try:
        root = open_store(path, rule="encoder_train")
        group = root if split == "test" else root[split]
        out = {k: np.asarray(group[k][:]) for k in ("pred", "nsd_id", "global_trial")}
        out |= {k: np.asarray(root[k][:]) for k in ("z_mean", "z_std")}
        out |= {k: np.asarray(root[k][:]) for k in ("token_mean", "token_basis") if k in root}
        attrs = dict(root.attrs)
        return out | {"n_parameters": int(attrs["n_parameters"]), "n_voxels": int(attrs.get("n_voxels", 0)),
                      "spec": attrs.get("spec", {}), "attrs": attrs}
    except KeyError as err:
        raise BraidError(f"{path}: incomplete predictions store ({err}); rerun the encoder_train rule") from err
