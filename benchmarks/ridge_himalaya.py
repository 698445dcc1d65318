"""Benchmark: BRAID's closed-form ridge (one alpha for all targets) vs himalaya's RidgeCV (an alpha per target),
on the same data, the same train/validation split and the same alpha grid.

    .venv/bin/python benchmarks/ridge_himalaya.py [--case a|b|c] [--samples 6750] [--val 750] [--test 750]
        [--voxels 15724] [--targets N] [--methods braid,hm-numpy,...] [--mem-gb 2] [--check-targets 2048]

Data: NSD-sized by default (6,750 training, 750 validation, 750 test trials x 15,724 voxels, subj01's
nsdgeneral) with a planted linear signal: a few hundred latent factors (power-law variances) drive every
voxel at a signal fraction that varies over voxels (log-normal, median 3 %); the targets are a rank-32
random map of the voxels' signal plus noise, at a signal fraction log-uniform in 1 %...60 % over targets,
so that per-target alphas can matter. Cases: (a) 1,280 targets (SDXL's pooled text embedding),
(b) 256 (PCA coefficients of the 77 x 2048 token embedding), (c) 16,384 (the VAE latent, 4 x 64 x 64).
X and Y are z-scored with the training rows' statistics (``braid.scores.standardiser``), as
``braid.encoder.train`` does; every method sees those arrays, no intercept. Grid: ``spec({"kind":
"ridge"})["alphas"]`` (0.01 ... 1e7, half decades).

  hm-numpy       himalaya.ridge.RidgeCV, numpy backend, cv=[(train, val)] on the train+val rows: an alpha
                 per target by validation MSE, then refit on ALL rows passed (train+val) <- baseline
  hm-torch       the same, himalaya's torch backend on the CPU (hm-torch_cuda too when CUDA is available)
  hm-kernel      himalaya.kernel_ridge.KernelRidgeCV(kernel="linear"): the same model, per-target alphas,
                 what himalaya itself advises when samples < features (run by default only then)
  braid          braid.encoder.fit_closed_form: one eigendecomposition, one alpha by validation MSE,
                 weights from the training rows only
  braid-1a/t     from BRAID's own RidgePath (recorded during its fit): an alpha per target by validation
                 MSE, weights from the training rows only; time = braid's + the extra selection
  hm-fixed       himalaya with one fixed alpha = BRAID's, on the training rows only: the cross-check
                 (test predictions and weights against BRAID's, on at most --check-targets targets; the
                 relative difference is printed). Ridge (primal SVD) when samples >= features, else
                 KernelRidge (weights X'dual); hm-fixed-primal / hm-fixed-kernel force one
  hm-1a          RidgeCV with solver_params local_alpha=False (hm-kernel-1a: KernelRidgeCV): one alpha for
                 all targets, refit on train+val; not run by default (separates the refit's extra rows
                 from the per-target alphas)

Per method: fit time (wall seconds of ``fit``, and the process's CPU seconds in it: steadier on a shared
machine), peak resident memory during it (VmHWM after a reset; the process's data included), validation
MSE of the alpha(s) chosen (fit on train, scored on val: himalaya's cv_scores_), validation MSE of the
returned model (lower than the former when the refit saw the validation rows), test MSE, mean test Pearson
r per target (across test trials) and per trial (across targets, ``latent_r`` style), the alpha(s). Time
ratios are against hm-numpy; quality differences are BRAID minus himalaya. Timings depend on the machine
(and on its other users); run heavy sizes with ``nice``. At full NSD size (15,724 voxels > 6,750 trials)
RidgeCV's primal solver forms a features x samples matrix per alpha (19 x 15,724 x 6,750 x 6,750 multiply-
adds): on 2 CPU cores that is several minutes per backend, more than BRAID's whole fit.
"""

from __future__ import annotations

import argparse
import re
import resource
import time
import warnings
from pathlib import Path

import numpy as np

CASES = {"a": 1280, "b": 256, "c": 16384}
CASE_NAMES = {"a": "pooled text embedding", "b": "token-embedding PCA", "c": "VAE latent 4x64x64"}
ORDER = ("braid", "braid-1a/t", "hm-fixed", "hm-fixed-primal", "hm-fixed-kernel", "hm-1a", "hm-kernel-1a",
         "hm-kernel", "hm-numpy", "hm-torch", "hm-torch_cuda")
DEFAULT_METHODS = ("braid", "braid-1a/t", "hm-fixed", "hm-kernel", "hm-numpy", "hm-torch", "hm-torch_cuda")
BASELINE = "hm-numpy"


# ---------------------------------------------------------------------------------------------
# Data


def make_data(n_tr: int, n_va: int, n_te: int, p: int, q: int, seed: int, factors: int = 256, rank: int = 32):
    """Voxels (float32, n x p) and targets (n x q) with a planted linear signal; rows: train, val, test."""
    rng = np.random.default_rng(seed)
    n = n_tr + n_va + n_te
    f = rng.standard_normal((n, factors), dtype=np.float32) * (1.0 + np.arange(factors, dtype=np.float32)) ** -0.75
    a = rng.standard_normal((factors, p), dtype=np.float32)
    sig_sd = np.sqrt(((1.0 + np.arange(factors)) ** -1.5) @ (a.astype(np.float64) ** 2))  # per-voxel signal sd
    frac_v = np.clip(np.exp(rng.normal(np.log(0.03), 1.0, p)), 0.002, 0.5)  # voxel signal fraction
    a *= (np.sqrt(frac_v) / sig_sd).astype(np.float32)
    x = f @ a
    noise_sd = np.sqrt(1 - frac_v).astype(np.float32)
    for s in range(0, n, 1024):  # noise in row blocks: no second n x p array
        x[s:s + 1024] += rng.standard_normal((min(1024, n - s), p), dtype=np.float32) * noise_sd
    u = rng.standard_normal((p, rank), dtype=np.float32)
    v = rng.standard_normal((rank, q), dtype=np.float32)
    w = (a @ u) @ v  # factors x q: the rank-`rank` map of the voxels' signal
    y = f @ w
    y /= y[:n_tr].std(0)
    frac_t = np.exp(rng.uniform(np.log(0.01), np.log(0.6), q)).astype(np.float32)  # target signal fraction
    y *= np.sqrt(frac_t)
    y += rng.standard_normal((n, q), dtype=np.float32) * np.sqrt(1 - frac_t)
    return x, y


def zscore(x: np.ndarray, n_tr: int) -> np.ndarray:
    """In place: z-score with the training rows' statistics (braid.scores.standardiser)."""
    from braid.scores import standardiser

    mean, std = standardiser(x[:n_tr])
    for s in range(0, len(x), 2048):
        x[s:s + 2048] -= mean
        x[s:s + 2048] /= std
    return x


# ---------------------------------------------------------------------------------------------
# Measuring


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
        return True
    except OSError:
        return False


def _peak_gb(reset_ok: bool) -> float:
    if reset_ok:
        m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        if m:
            return int(m.group(1)) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # never reset: the run's peak so far


def scores(pred_va, pred_te, yv, yte) -> dict:
    from braid.scores import rowwise_pearson

    return {"val_refit": float(np.mean((pred_va - yv) ** 2)), "test": float(np.mean((pred_te - yte) ** 2)),
            "r_target": float(np.mean(rowwise_pearson(pred_te.T, yte.T))),
            "r_trial": float(np.mean(rowwise_pearson(pred_te, yte)))}


class Timer:
    def __init__(self, cuda: bool = False):
        self.cuda = cuda

    def __enter__(self):
        self.reset = _reset_peak()
        self._sync()
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        self.peak = _peak_gb(self.reset)

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Methods


def run_braid(sp, xt, yt, xv, yv, xte, yte) -> tuple[dict, dict, object]:
    """fit_closed_form; also returns the RidgePath it built (recorded) for the per-target variant."""
    import torch

    import braid.encoder as enc

    original, seen = enc.RidgePath, []

    class Recorded(original):
        def __init__(self, x, z):
            super().__init__(x, z)
            seen.append(self)

    model = enc.build(enc.architecture(sp), xt.shape[1], yt.shape[1])
    t = [torch.from_numpy(a) for a in (xt, yt, xv, yv)]
    enc.RidgePath = Recorded  # this process only: lets the per-target variant reuse BRAID's decomposition
    try:
        with Timer() as tm:
            table = enc.fit_closed_form(sp, *t, model)
    finally:
        enc.RidgePath = original
    with torch.no_grad():
        pv, pte = (model(torch.from_numpy(a)).numpy() for a in (xv, xte))
    alpha = float(table.loc[table["chosen"], "alpha"].iloc[0])
    out = {"time": tm.seconds, "cpu": tm.cpu, "peak": tm.peak,
           "val": float(table.loc[table["chosen"], "val_loss"].iloc[0]),
           "alphas": np.array([alpha]), **scores(pv, pte, yv, yte), "pred_te": pte,
           "weight": model[0].weight.detach().numpy()}
    return out, table, seen[0]


def run_braid_per_target(path, alphas, xv, yv, xte, yte, braid: dict) -> dict:
    """An alpha per target from BRAID's RidgePath: validation MSE per target and alpha, weights from train."""
    import torch

    with Timer() as tm:
        xv_w0 = torch.from_numpy(xv).double() @ path.W0
        yv64 = torch.from_numpy(yv).double()
        mse = torch.stack([((xv_w0 @ path.coefficients(a) - yv64) ** 2).mean(0) for a in alphas])  # alphas x q
        best = torch.argmin(mse, 0)
        a_t = torch.tensor(alphas, dtype=torch.float64)[best]
        coef = path.C / (path.lam[:, None] + a_t[None, :])
        pv = (xv_w0 @ coef).float().numpy()
        pte = ((torch.from_numpy(xte).double() @ path.W0) @ coef).float().numpy()
    val = float(mse.gather(0, best[None]).mean())
    return {"time": braid["time"] + tm.seconds, "cpu": braid["cpu"] + tm.cpu, "extra": tm.seconds, "peak": tm.peak,
            "val": val,
            "alphas": a_t.numpy(), **scores(pv, pte, yv, yte), "pred_te": pte}


def _batches(p: int, n: int, q: int, nv: int, mem_gb: float, n_alphas: int) -> dict:
    """himalaya's batch sizes so that its largest temporaries stay near ``mem_gb``."""
    budget = mem_gb * 2**30 / 4  # float32 elements
    nab = int(max(1, min(n_alphas, budget // (p * n))))  # RidgeCV's (alphas, features, train samples) matrices
    return {"n_alphas_batch": nab, "n_targets_batch": int(max(1, min(q, budget // (nab * nv)))),
            "n_targets_batch_refit": int(max(1, min(q, budget // (nab * p))))}


def run_himalaya_cv(kind: str, backend_name: str, alphas, x_trva, y_trva, n_tr: int, xv, yv, xte, yte,
                    mem_gb: float, local_alpha: bool = True) -> dict:
    """RidgeCV (primal) or KernelRidgeCV (linear kernel) with cv = BRAID's split of the train+val rows."""
    from himalaya.backend import set_backend
    from himalaya.kernel_ridge import KernelRidgeCV
    from himalaya.ridge import RidgeCV

    backend = set_backend(backend_name)
    n, p = x_trva.shape
    q = y_trva.shape[1]
    cv = [(np.arange(n_tr), np.arange(n_tr, n))]
    params = _batches(p if kind == "primal" else n, n_tr, q, n - n_tr, mem_gb, len(alphas))
    if not local_alpha:
        params["local_alpha"] = False
    if kind == "primal":
        model = RidgeCV(alphas=alphas, cv=cv, fit_intercept=False, solver_params=params | {"warn": False})
    else:
        model = KernelRidgeCV(alphas=alphas, kernel="linear", cv=cv, fit_intercept=False, solver_params=params)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            with Timer(cuda=backend_name == "torch_cuda") as tm:
                model.fit(x_trva, y_trva)
            pv, pte = (backend.to_numpy(model.predict(a)) for a in (xv, xte))
    finally:
        set_backend("numpy")
    return {"time": tm.seconds, "cpu": tm.cpu, "peak": tm.peak,
            "val": float(-backend.to_numpy(model.cv_scores_).mean()),
            "alphas": backend.to_numpy(model.best_alphas_).astype(np.float64), **scores(pv, pte, yv, yte),
            "pred_te": pte, "batches": params}


def run_himalaya_fixed(alpha: float, primal: bool, xt, yt, xv, yv, xte, yte) -> dict:
    """himalaya with one fixed alpha (BRAID's) on the training rows only: the like-for-like cross-check
    (``yt``, ``yv``, ``yte``: the checked targets' columns)."""
    from himalaya.backend import set_backend
    from himalaya.kernel_ridge import KernelRidge
    from himalaya.ridge import Ridge

    set_backend("numpy")
    if primal:
        model = Ridge(alpha=alpha, fit_intercept=False, solver_params={"warn": False})
    else:
        model = KernelRidge(alpha=alpha, kernel="linear", fit_intercept=False)
    with Timer() as tm:
        model.fit(xt, yt)
    pv, pte = model.predict(xv), model.predict(xte)
    w = model.coef_ if primal else xt.T @ model.dual_coef_  # p x checked targets
    return {"time": tm.seconds, "cpu": tm.cpu, "peak": tm.peak, "val": float(np.mean((pv - yv) ** 2)),
            "alphas": np.array([alpha]),
            **scores(pv, pte, yv, yte), "pred_te": pte, "weight": np.asarray(w, np.float32).T}


# ---------------------------------------------------------------------------------------------
# Report


def memory_note(n_tr: int, n_va: int, n_te: int, p: int, q: int) -> tuple[float, float]:
    """Rough peaks (GB) of the data plus BRAID's fit (float64 copies) and of himalaya's refit weights."""
    n, k = n_tr + n_va + n_te, min(n_tr, p)
    data = 4 * n * (p + q)
    braid = 8 * (n_tr * p + k * k + p * k + n_tr * q + 3 * k * q + 1.5 * p * q)
    himalaya = 4 * (2 * p * q) + 8 * p * n_tr  # refit weights (two p x q) + its SVD / kernel work
    return (data + braid) / 1e9, (data + himalaya) / 1e9


def fmt_alphas(a: np.ndarray) -> str:
    if a.size == 1:
        return f"{a[0]:.3g}"
    return f"med {np.median(a):.3g} [{a.min():.3g}, {a.max():.3g}] {np.unique(a).size} values"


def main() -> None:
    import torch

    from braid.encoder import spec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=sorted(CASES), default="a",
                    help="a: 1,280 targets; b: 256; c: 16,384 (see the docstring)")
    ap.add_argument("--targets", type=int, default=None, help="override the case's number of targets")
    ap.add_argument("--samples", type=int, default=6750, help="training trials")
    ap.add_argument("--val", type=int, default=750, help="validation trials")
    ap.add_argument("--test", type=int, default=None, help="test trials (default: --val)")
    ap.add_argument("--voxels", type=int, default=15724)
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {', '.join(ORDER)}")
    ap.add_argument("--mem-gb", type=float, default=2.0, help="himalaya's batches keep its temporaries near this")
    ap.add_argument("--max-gb", type=float, default=16.0, help="warn when a method's estimated peak exceeds this")
    ap.add_argument("--check-targets", type=int, default=2048,
                    help="the fixed-alpha cross-check fits at most this many targets (a random subset)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(ORDER))
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {', '.join(ORDER)}")
    if "hm-torch_cuda" in methods and not torch.cuda.is_available():
        methods.remove("hm-torch_cuda")
    if args.methods == ap.get_default("methods") and args.samples >= args.voxels:
        methods.remove("hm-kernel")  # himalaya advises the kernel solver only when samples < features
    if "braid-1a/t" in methods and "braid" not in methods:
        methods.insert(0, "braid")
    if any(m.startswith("hm-fixed") for m in methods) and "braid" not in methods:
        methods.insert(0, "braid")
    q = args.targets or CASES[args.case]
    n_tr, n_va, n_te, p = args.samples, args.val, args.test or args.val, args.voxels
    sp = spec({"kind": "ridge"})
    alphas = np.asarray(sp["alphas"], np.float32)

    est_braid, est_hm = memory_note(n_tr, n_va, n_te, p, q)
    print(f"case ({args.case}) {CASE_NAMES[args.case]}: {n_tr} train / {n_va} val / {n_te} test trials x {p} voxels "
          f"-> {q} targets; {len(alphas)} alphas {alphas[0]:g}...{alphas[-1]:g}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; methods: {', '.join(methods)}")
    print(f"estimated peaks: braid {est_braid:.1f} GB, himalaya {est_hm:.1f} GB + its batches (--mem-gb "
          f"{args.mem_gb:g})")
    if max(est_braid, est_hm) > args.max_gb:
        print(f"WARNING: above --max-gb {args.max_gb:g}: himalaya's n_targets_batch / n_targets_batch_refit bound its "
              "temporaries; BRAID's fit_closed_form has no target batching")

    t0 = time.perf_counter()
    x, y = make_data(n_tr, n_va, n_te, p, q, args.seed)
    zscore(x, n_tr), zscore(y, n_tr)
    x_trva, y_trva = x[: n_tr + n_va], y[: n_tr + n_va]  # views: himalaya's input, cv = BRAID's split
    xt, yt, xv, yv = x[:n_tr], y[:n_tr], x[n_tr: n_tr + n_va], y[n_tr: n_tr + n_va]
    xte, yte = x[n_tr + n_va:], y[n_tr + n_va:]
    print(f"data made and z-scored (training statistics) in {time.perf_counter() - t0:.1f} s")

    res: dict[str, dict] = {}
    path = table = None
    chk = np.sort(np.random.default_rng(1).choice(q, size=min(q, args.check_targets), replace=False))
    sub = chk.size < q  # the fixed-alpha cross-check fits these targets (each target's ridge is independent)
    for m in ORDER:
        if m not in methods:
            continue
        t0 = time.perf_counter()
        if m == "braid":
            res[m], table, path = run_braid(sp, xt, yt, xv, yv, xte, yte)
        elif m == "braid-1a/t":
            res[m] = run_braid_per_target(path, sp["alphas"], xv, yv, xte, yte, res["braid"])
        elif m.startswith("hm-fixed"):
            primal = m == "hm-fixed-primal" or (m == "hm-fixed" and n_tr >= p)  # himalaya's advice for the shape
            ys = (yt[:, chk], yv[:, chk], yte[:, chk]) if sub else (yt, yv, yte)
            res[m] = run_himalaya_fixed(float(res["braid"]["alphas"][0]), primal, xt, ys[0], xv, ys[1], xte, ys[2])
        elif m in ("hm-kernel", "hm-kernel-1a"):
            res[m] = run_himalaya_cv("kernel", "numpy", alphas, x_trva, y_trva, n_tr, xv, yv, xte, yte, args.mem_gb,
                                     local_alpha=m == "hm-kernel")
        elif m == "hm-1a":
            res[m] = run_himalaya_cv("primal", "numpy", alphas, x_trva, y_trva, n_tr, xv, yv, xte, yte, args.mem_gb,
                                     local_alpha=False)
        else:
            res[m] = run_himalaya_cv("primal", m.removeprefix("hm-"), alphas, x_trva, y_trva, n_tr, xv, yv, xte, yte,
                                     args.mem_gb)
        extra = f" (batches {res[m]['batches']})" if "batches" in res[m] else ""
        fit = f"braid + {res[m]['extra']:.1f} s" if "extra" in res[m] else f"{res[m]['time']:.1f} s"
        print(f"  {m}: fit {fit}, {time.perf_counter() - t0:.1f} s with predictions{extra}", flush=True)
        if m == "braid":
            path_info = table.assign(val_loss=table["val_loss"].round(5))[["alpha", "val_loss", "chosen"]]
            print("  braid's validation MSE per alpha: " + ", ".join(
                f"{a:g}:{v:.4f}{'*' if c else ''}" for a, v, c in path_info.itertuples(index=False)))
        if m == "braid-1a/t":
            path = None  # frees BRAID's decomposition (W0, C)

    base = res.get(BASELINE, {}).get("time")
    cbase = res.get(BASELINE, {}).get("cpu")
    print(f"\n{'method':<16}{'fit s':>8}{'x faster':>9}{'cpu s':>8}{'x less':>7}{'peak GB':>8}{'val MSE':>9}"
          f"{'val refit':>10}{'test MSE':>9}"
          f"{'r target':>9}{'r trial':>8}  alpha(s)")
    for m, r in res.items():
        speed = f"{base / r['time']:>9.2f}" if base else f"{'n/a':>9}"
        cpu = f"{r['cpu']:>8.1f}" + (f"{cbase / r['cpu']:>7.2f}" if cbase else f"{'n/a':>7}")
        print(f"{m:<16}{r['time']:>8.1f}{speed}{cpu}{r['peak']:>8.2f}{r['val']:>9.4f}{r['val_refit']:>10.4f}"
              f"{r['test']:>9.4f}{r['r_target']:>9.4f}{r['r_trial']:>8.4f}  {fmt_alphas(r['alphas'])}")
    print(f"(x faster, x less: {BASELINE}'s fit wall / CPU time over the method's; "
          "val MSE: chosen alpha(s), fit on train, scored on val; "
          "val refit: the returned model on val)")

    print()
    if "braid" in res:
        b = res["braid"]
        bp, bw = (b["pred_te"][:, chk], b["weight"][chk]) if sub else (b["pred_te"], b["weight"])
        for m in ("hm-fixed", "hm-fixed-primal", "hm-fixed-kernel"):
            if m in res:
                h = res[m]
                d, dw = np.abs(h["pred_te"] - bp).max(), np.abs(h["weight"] - bw).max()
                on = f"{chk.size} of {q} targets (--check-targets)" if sub else f"all {q} targets"
                print(f"cross-check {m} (alpha {b['alphas'][0]:g}, train rows, {on}) vs braid: test predictions max "
                      f"|diff| {d:.3g} (relative to max |pred| {d / np.abs(bp).max():.2e}); weights max |diff| "
                      f"{dw:.3g} (relative {dw / np.abs(bw).max():.2e})")
                if sub:
                    print(f"  (its table row scores those {chk.size} targets; braid on them: test MSE "
                          f"{np.mean((bp - yte[:, chk]) ** 2):.4f})")
        for m in ("hm-1a", "hm-kernel-1a"):
            if m in res:
                print(f"single alpha chosen: braid {b['alphas'][0]:g}, himalaya {m} (local_alpha=False) "
                      f"{res[m]['alphas'][0]:g}")
        for m in (BASELINE, "hm-kernel", "braid-1a/t"):
            if m in res and m != "braid":
                h = res[m]
                print(f"braid minus {m}: test MSE {b['test'] - h['test']:+.5f} ({(b['test'] / h['test'] - 1):+.2%}), "
                      f"r target {b['r_target'] - h['r_target']:+.5f}, r trial {b['r_trial'] - h['r_trial']:+.5f}")
        if "braid-1a/t" in res:
            for m in (BASELINE, "hm-kernel"):
                if m in res:
                    same = np.isclose(res[m]["alphas"], res["braid-1a/t"]["alphas"], rtol=1e-3).mean()
                    print(f"per-target alphas: {m} and braid-1a/t agree on {same:.1%} of targets")
    for m in ("hm-torch", "hm-torch_cuda", "hm-kernel"):
        if m in res and BASELINE in res:
            d = np.abs(res[m]["pred_te"] - res[BASELINE]["pred_te"]).max()
            same = np.isclose(res[m]["alphas"], res[BASELINE]["alphas"], rtol=1e-3)
            d_same = np.abs(res[m]["pred_te"] - res[BASELINE]["pred_te"])[:, same].max(initial=0.0)
            rel = d_same / np.abs(res[BASELINE]["pred_te"]).max()
            print(f"{m} vs {BASELINE}: same alpha on {same.mean():.1%} of targets; test predictions max |diff| "
                  f"{d:.3g}, {d_same:.3g} on those targets (relative {rel:.2e})")


if __name__ == "__main__":
    main()
