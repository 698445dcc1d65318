"""The quality-vs-parameters frontier of one subject's encoders: the seed's question, answered.

For every trained encoder (the named ones and the sweep's) the latent scores of its validation
and test predictions, its parameter count and voxel count; the mean predictor (the training
latents' mean for every trial, 0 parameters) as the baseline; and the Pareto front: the encoders
that no encoder with as few or fewer parameters beats.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd

from .common import atomic_output
from .figures import label_apart, save_figure, stamped
from .scores import latent_metrics

log = logging.getLogger(__name__)

QUALITY = "test_latent_r"


def pareto_front(n_parameters, quality) -> np.ndarray:
    """True where no other point has ≤ parameters and ≥ quality with one of them strict."""
    n = np.asarray(n_parameters, np.float64)
    q = np.asarray(quality, np.float64)
    dominated = ((n[None, :] <= n[:, None]) & (q[None, :] >= q[:, None])
                 & ((n[None, :] < n[:, None]) | (q[None, :] > q[:, None]))).any(1)
    return ~dominated & np.isfinite(q)


def _scores(pred, true, z_mean, z_std, ids, prefix: str) -> dict:
    m = latent_metrics(pred, true, z_mean, z_std, ids)
    mse_z = float(np.mean(((pred - true) / z_std) ** 2))
    return {f"{prefix}_latent_r": m["latent_r"], f"{prefix}_latent_two_way": m["latent_two_way"],
            f"{prefix}_mse_z": mse_z, f"{prefix}_latent_mse": m["latent_mse"]}


def table(subject: str, predictions: dict[str, str | os.PathLike], latents, reference: str | None) -> pd.DataFrame:
    """One row per encoder plus the mean predictor; sorted by parameter count."""
    from .encoder import load_predictions
    from .latents import LatentCache

    cache = LatentCache(latents)
    rows = []
    for name in sorted(predictions):
        row = {"subject": subject, "encoder": name}
        for split in ("val", "test"):
            p = load_predictions(predictions[name], split)
            row |= _scores(p["pred"], cache.get(p["nsd_id"]), p["z_mean"], p["z_std"], p["nsd_id"], split)
        row |= {"kind": p["spec"].get("kind", ""), "n_parameters": p["n_parameters"], "n_voxels": p["n_voxels"]}
        rows.append(row)
    # the mean predictor: the training latents' mean for every trial (every encoder has the same
    # training rows, so any store's z_mean is it); a constant correlates with nothing: r 0, 2-way at chance
    row = {"subject": subject, "encoder": "mean latent (baseline)", "kind": "baseline", "n_parameters": 0, "n_voxels": 0}
    for split in ("val", "test"):
        p = load_predictions(predictions[min(predictions)], split)
        true = cache.get(p["nsd_id"])
        error = np.broadcast_to(p["z_mean"], true.shape) - true
        row |= {f"{split}_latent_r": 0.0, f"{split}_latent_two_way": 0.5,
                f"{split}_mse_z": float(np.mean((error / p["z_std"]) ** 2)), f"{split}_latent_mse": float(np.mean(error**2))}
    rows.append(row)
    out = pd.DataFrame(rows)
    out["weights"] = cache.weights
    ref = out.loc[out["encoder"] == reference, "n_parameters"]
    out["fraction_of_reference"] = out["n_parameters"] / ref.iloc[0] if len(ref) else np.nan
    out["is_reference"] = out["encoder"] == reference
    out["pareto"] = pareto_front(out["n_parameters"], out[QUALITY])
    out["pareto_two_way"] = pareto_front(out["n_parameters"], out["test_latent_two_way"])
    first = ["subject", "encoder", "kind", "n_parameters", "n_voxels", "fraction_of_reference", "is_reference",
             "pareto", "pareto_two_way"]
    out = out[first + [c for c in out.columns if c not in first]]
    return out.sort_values(["n_parameters", "encoder"]).reset_index(drop=True)


def write(subject: str, predictions: dict, latents, reference: str | None, out_csv, out_png) -> pd.DataFrame:
    t = table(subject, predictions, latents, reference)
    with atomic_output(out_csv) as tmp:
        t.to_csv(tmp, index=False)
    plot(t, out_png, subject, reference)
    front = t[t["pareto"] & (t["kind"] != "baseline")]
    for r in front.itertuples():
        log.info("front: %s %s parameters (%.3g of the reference), test latent r %.3f", r.encoder,
                 f"{r.n_parameters:,}", r.fraction_of_reference, r.test_latent_r)
    return t


KIND_COLOURS = {"mlp": "tab:blue", "ridge": "tab:orange", "lowrank": "tab:green", "student": "tab:purple"}


def plot(t: pd.DataFrame, path, subject: str, reference: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    enc = t[t["kind"] != "baseline"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for ax, metric, front_col, label, chance in (
        (axes[0], "test_latent_r", "pareto", "test latent r (z-scored, per trial)", 0.0),
        (axes[1], "test_latent_two_way", "pareto_two_way", "test latent 2-way identification", 0.5),
    ):
        for kind, group in enc.groupby("kind"):
            ax.scatter(group["n_parameters"], group[metric], s=28, color=KIND_COLOURS.get(kind, "gray"), label=kind, zorder=3)
        front = enc[enc[front_col]].sort_values("n_parameters")
        ax.step(front["n_parameters"], front[metric], where="post", color="k", lw=1, alpha=0.6, label="Pareto front")
        ref = enc[enc["is_reference"]]
        if len(ref):
            ax.scatter(ref["n_parameters"], ref[metric], marker="*", s=220, facecolor="none", edgecolor="red",
                       lw=1.5, zorder=4, label=f"seed design ({reference})")
        ax.axhline(chance, color="gray", ls=":", lw=1, label=f"mean latent / chance ({chance:g})")
        ax.set_xscale("log")
        ax.set_xlabel("encoder parameters")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both", lw=0.5)
    axes[0].legend(fontsize=7, loc="lower right")
    title = f"{subject}: reconstruction-latent quality against encoder size ({len(enc)} encoders)"
    if reference and not (enc["is_reference"]).any():
        title += f" — reference {reference!r} not trained"
    fig.suptitle(stamped(title, [t["weights"].iloc[0]]), fontsize=9)
    fig.tight_layout()
    front = enc[enc["pareto"]]  # the front's names once, on the left, placed once the layout is final
    label_apart(axes[0], list(zip(front["encoder"], front["n_parameters"], front[QUALITY])), fontsize=7, offset=(3, 3),
                gap=7)
    save_figure(fig, path)


# --- the frontier of image quality: every reconstructed run against its brain-side parameters ---

IMAGE_PANELS = [("pixcorr", "PixCorr"), ("ssim", "SSIM"), ("alexnet5", "AlexNet(5) 2-way"),
                ("inception", "Inception 2-way"), ("clip", "CLIP 2-way"), ("category", "category readout (synthetic)")]
CONDITIONING_MARKERS = {"none": "o", "predicted": "s", "retrieved": "D", "true-caption": "^"}


def image_points(summary: pd.DataFrame) -> tuple[pd.DataFrame, float, float]:
    """The img2img runs at the highest strength the conditionings on meaning ran at (the highest of
    all without them) and the lowest guidance scale, averaged over seeds: one point per (subject,
    latent source, conditioning); and that strength and guidance."""
    from .conditioning import parse

    runs = summary[summary["mode"] == "img2img"]
    conditioned = runs[runs["conditioning"] != "none"]
    strength = float((conditioned if len(conditioned) else runs)["strength"].max())
    guidance = float(runs["guidance"].min())
    points = runs[(runs["strength"] == strength) & (runs["guidance"] == guidance)].copy()
    points["conditioning_mode"] = [parse(c)[0] for c in points["conditioning"]]
    # a point on the front is a brain-side model: references and the true caption (a ceiling) are not
    points["on_front"] = ~points["encoder"].isin(["true-latent", "mean-latent"]) & (points["conditioning_mode"] != "true-caption")
    return points, strength, guidance


def plot_images(summary: pd.DataFrame, path, reference: str | None = None) -> None:
    """Image quality against brain-side parameters (latent encoder + semantic encoder): each
    reconstructed run (marker: conditioning), the Pareto front of the brain-side models, the seed
    design, the latent ceiling (true z0) and chance (mean z0) as lines, the true caption hollow,
    and the published methods whose parameter counts are known (:data:`braid.published.PARAMETERS`;
    hollow where the count is an estimate). Percent metrics are drawn as fractions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    from .figures import not_a_result
    from .published import BRAID_COLUMNS, PARAMETERS, published_table

    points, strength, guidance = image_points(summary)
    panels = [(m, label) for m, label in IMAGE_PANELS if m in points and points[m].notna().any()]
    published = published_table().set_index("model")
    column = {metric: (col, pct) for col, (metric, pct) in BRAID_COLUMNS.items()}
    ncol = min(3, len(panels))
    nrow = -(-len(panels) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.8 * nrow + 0.9), squeeze=False)
    subjects = sorted(points["subject"].unique())
    names = {}  # axes -> the published methods' labels, placed once the layout is final
    for ax, (metric, label) in zip(axes.ravel(), panels):
        for subject in subjects:
            pts = points[points["subject"] == subject]
            models = pts[pts["on_front"]]
            for mode, g in models.groupby("conditioning_mode"):
                ax.scatter(g["n_parameters"], g[metric], marker=CONDITIONING_MARKERS.get(mode, "o"), s=30, zorder=3,
                           color=[KIND_COLOURS.get(k, "gray") for k in g["kind"]],
                           label=f"{mode} conditioning" if subject == subjects[0] else None)
            front = models[pareto_front(models["n_parameters"], models[metric])].sort_values("n_parameters")
            ax.step(front["n_parameters"], front[metric], where="post", color="k", lw=1, alpha=0.6,
                    label="Pareto front" if subject == subjects[0] else None)
            seed = models[(models["encoder"] == reference) & (models["conditioning"] == "none")]
            if len(seed):
                ax.scatter(seed["n_parameters"], seed[metric], marker="*", s=220, facecolor="none", edgecolor="red",
                           lw=1.5, zorder=4, label=f"seed design ({reference})" if subject == subjects[0] else None)
            true_caption = pts[(pts["conditioning_mode"] == "true-caption") & ~pts["encoder"].isin(["true-latent",
                                                                                                     "mean-latent"])]
            if len(true_caption):
                ax.scatter(true_caption["n_parameters"], true_caption[metric], marker="^", s=40, facecolor="none",
                           edgecolor="k", zorder=3, label="true caption (ceiling)" if subject == subjects[0] else None)
            for source, style, name in (("true-latent", "--", "true z0 (ceiling)"), ("mean-latent", ":", "mean z0 (chance)")):
                ref = pts[(pts["encoder"] == source) & (pts["conditioning"] == "none")]
                if len(ref):
                    ax.axhline(float(ref[metric].iloc[0]), color="k" if source == "true-latent" else "gray", ls=style,
                               lw=1, label=name if subject == subjects[0] else None)
        col, pct = column.get(metric, (None, False))
        if col is not None:
            for model, (count, estimate, _) in PARAMETERS.items():
                value = published.loc[model, col] if model in published.index else None
                if value is None or pd.isna(value):
                    continue
                y = float(value) / 100 if pct else float(value)
                ax.scatter([count], [y], marker="P", s=55, color="tab:red" if not estimate else "none",
                           edgecolor="tab:red", zorder=3)
                names.setdefault(ax, []).append((model + (" (est.)" if estimate else ""), count, y))
        ax.set_xscale("log")
        ax.set_xlabel("brain-side parameters (latent + semantic encoder)")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3, which="both", lw=0.5)
    # one parameter axis for every panel (BRAID's models and the published methods), major ticks only
    counts = [c for c, _, _ in PARAMETERS.values()] + [float(v) for v in points["n_parameters"] if v > 0]
    for ax in axes.ravel()[: len(panels)]:
        ax.set_xlim(min(counts) / 3, max(counts) * 3)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], marker="P", color="tab:red", ls="", label="published (hollow: count estimated)"))
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=False)
    stamps = not_a_result(summary.get("weights", []), summary.get("metric_weights", []))
    title = (f"Image quality against brain-side parameters (img2img strength {strength:g}, guidance {guidance:g}; "
             "colour: latent encoder kind; published: their own test sets and metric weights)")
    fig.suptitle("\n".join([*stamps, title]), fontsize=9, color="tab:red" if stamps else "k")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    for ax, labels in names.items():
        label_apart(ax, labels, fontsize=6, color="tab:red")
    save_figure(fig, path, dpi=100)
