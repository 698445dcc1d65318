"""Published NSD reconstruction metrics, printed beside BRAID's own table (never mixed into it).

Figures with their provenance tags: [P] read from the authors' code or saved notebook output
(MindEye: github.com/MedARC-AI/fMRI-reconstruction-NSD, ``Reconstruction_Metrics.ipynb``;
MindEye2: github.com/MedARC-AI/MindEyeV2, ``src/final_evaluations.ipynb``), [S] from third-party
summaries of the papers, [U] unverified. 2-way
identification and retrieval are percentages as the papers print them; EfficientNet-B1 and SwAV
are correlation distances (lower is better). BRAID's own table is written in the same columns
(:func:`html_table`), so that a run with ``config/nsd_literature.yaml`` lines up with them.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from .figures import not_a_result

COLUMNS = ["PixCorr ↑", "SSIM ↑", "Alex(2) ↑", "Alex(5) ↑", "Incep ↑", "CLIP ↑", "Eff ↓", "SwAV ↓",
           "Image ret. ↑", "Brain ret. ↑"]
# BRAID's column for each: metric name, and whether the papers print it as a percentage
BRAID_COLUMNS = {"PixCorr ↑": ("pixcorr", False), "SSIM ↑": ("ssim", False), "Alex(2) ↑": ("alexnet2", True),
                 "Alex(5) ↑": ("alexnet5", True), "Incep ↑": ("inception", True), "CLIP ↑": ("clip", True),
                 "Eff ↓": ("efficientnet", False), "SwAV ↓": ("swav", False),
                 "Image ret. ↑": ("retrieval_image", True), "Brain ret. ↑": ("retrieval_brain", True)}

# BRAID's columns that no paper has: the synthetic data's category readout (%), shown when present
EXTRA_COLUMNS = {"Category ↑": ("category", True)}

_ = None
# model, subjects, N, the ten columns, source tag
PUBLISHED = [
    ("MindEye1 (VD + img2img 0.85, best of 16)", "subj01", 982, .392, .347, 97.4, 98.7, 94.5, 94.3, .635, .358, 97.2, 94.7, "[P] ME1 Reconstruction_Metrics.ipynb; retrieval from src/Retrievals.py"),
    ("MindEye2, 40 sessions (0.75/0.25 blur blend)", "subj01", 1000, .374, .439, 97.9, 99.1, 96.0, 93.7, .607, .336, 99.96, 99.87, "[P] ME2 final_evaluations.ipynb"),
    ("MindEye2, 40 sessions, no blend", "subj01", 1000, .330, .386, 97.7, 99.3, 95.3, 94.1, .606, .332, _, _, "[P] ME2 final_evaluations.ipynb@8ae8d37 (GT at 224)"),
    ("MindEye2, 40 h", "mean 1,2,5,7", _, .322, .431, 96.1, 98.6, 95.4, 93.0, .619, .344, _, _, "[S]"),
    ("MindEye2, 1 h", "mean 1,2,5,7", _, .195, .419, 84.2, 90.6, 81.2, 79.2, _, _, 79.0, 57.4, "[S]"),
    ("MindEye1", "mean 1,2,5,7", _, .309, .323, 94.7, 97.8, 93.8, 94.1, .645, .367, 93.6, 90.1, "[S] first four; rest [U]"),
    ("MindEye1, low-level (blurry) only", "mean 1,2,5,7", _, .360, .479, 78.1, 74.8, 58.7, 59.2, .854, .589, _, _, "[U]"),
    ("Brain-Diffuser", "mean 1,2,5,7", 982, .254, .356, 94.2, 96.2, 87.2, 91.5, .775, .423, _, _, "[S] first four; rest [U]; SSIM likely column-wise (skimage 0.17)"),
    ("Takagi (re-evaluated in MindHier)", "mean 1,2,5,7", _, .246, .410, _, _, 83.8, 82.1, .811, .504, _, _, "[S]"),
    ("MindTuner, 40 h", "mean 1,2,5,7", _, .322, .421, 95.8, 98.8, 95.6, 93.8, .612, .340, _, _, "[S] Brain-IT's table"),
    ("Brain-IT, 40 h", "mean 1,2,5,7", _, .386, .486, 98.4, 99.5, 97.3, 96.4, .564, .320, _, _, "[S] Brain-IT (ICLR 2026) table 1"),
]

# Brain-side parameters (what is trained on fMRI) of the published rows, where known: (count, is an
# estimate, where it comes from). Rows without a count are not placed on the parameter axis.
PARAMETERS = {
    "MindEye2, 40 h": (729e6, False, "ridge 16.1 M + backbone 453 M + prior 260 M (hidden 1024; MindEyeV2 code)"),
    "MindEye2, 1 h": (729e6, False, "as MindEye2, 40 h"),
    "MindEye1": (968e6, True, "≈940–996 M in third-party counts; the middle"),
    "Brain-Diffuser": (3.1e9, True, "≈3.1 B: the CLIP-vision ridge alone, 15,724 voxels x 257 x 768 (arithmetic, "
                                    "not stated)"),
    "MindTuner, 40 h": (76.7e6, False, "as reported"),
}
NO_PARAMETERS = {"Takagi (re-evaluated in MindHier)": "ridge, count not stated", "Brain-IT, 40 h": "count not found"}


def published_table() -> pd.DataFrame:
    rows = [dict(zip(["model", "subjects", "N", *COLUMNS, "source"], r)) for r in PUBLISHED]
    return pd.DataFrame(rows)


def braid_table(summary: pd.DataFrame) -> pd.DataFrame:
    """BRAID's summary in the papers' columns and units (one row per subject, encoder and run)."""
    rows = []
    records = summary.to_dict("records")
    if summary["subject"].nunique() > 1:  # the papers' mean over subjects, per encoder and run
        keys = ["encoder", "mode", "conditioning", "guidance", "strength"]
        means = summary.groupby(keys, dropna=False)[[m for m, _ in BRAID_COLUMNS.values() if m in summary] + ["n_test_images", "n_seeds"]]
        for key, g in means:
            if len(g) == summary["subject"].nunique():
                records.append(dict(zip(keys, key)) | g.mean().to_dict() | {"subject": f"mean of {len(g)}"})
    for r in records:
        run = "decoded only" if r["mode"] == "decode" else f"img2img {r['strength']:g}, guidance {r['guidance']:g}"
        conditioning = "—" if r["mode"] == "decode" else r["conditioning"]
        params = r.get("n_parameters")
        row = {"subject": r["subject"], "encoder": r["encoder"], "conditioning": conditioning, "run": run,
               "parameters": "—" if params is None or pd.isna(params) else f"{int(params):,}",
               "N": int(r["n_test_images"]), "seeds": int(r["n_seeds"]) if r["mode"] == "img2img" else "—"}
        for col, (metric, percent) in {**BRAID_COLUMNS, **EXTRA_COLUMNS}.items():
            value = r.get(metric, np.nan)
            row[col] = value * 100 if percent and pd.notna(value) else value
        rows.append(row)
    out = pd.DataFrame(rows)
    # per subject: the encoders, then the references (ceiling, chance)
    rank = out["encoder"].map({"true-latent": 1, "mean-latent": 2}).fillna(0)
    return out.assign(_rank=rank).sort_values(["subject", "_rank", "encoder"], kind="stable").drop(columns="_rank")


def _cell(value, percent: bool, as_given: bool = False) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "—"
    if isinstance(value, str):
        return html.escape(value)
    if as_given:  # a published figure, with the digits its source printed
        if percent:  # 96.0, 93.7, 99.96: one decimal, two where the source gave two
            text = f"{value:.2f}"
            return text[:-1] if text.endswith("0") else text
        return f"{value:.3f}".lstrip("0") if 0 <= value < 1 else f"{value:g}"
    return f"{value:.1f}" if percent else f"{value:.3f}"


def semantic_html(semantic: pd.DataFrame) -> str:
    """The semantic encoders' test scores in embedding space, with their chance levels."""
    if semantic is None or semantic.empty:
        return ""
    pct = lambda v: "—" if pd.isna(v) else f"{100 * v:.1f}"  # noqa: E731
    rows = []
    for r in semantic.sort_values(["subject", "n_parameters"], na_position="last").to_dict("records"):
        params = "—" if pd.isna(r["n_parameters"]) else f"{int(r['n_parameters']):,}"
        cells = [r["subject"], r["encoder"], r["semantic_target"], params, f"{r['semantic_pooled_r']:.3f}",
                 pct(r["semantic_pooled_two_way"]), pct(r["caption_top1"]), pct(r["caption_top5"]),
                 pct(r["category_accuracy"])]
        cls = ' class="ref"' if r["kind"] == "oracle" else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    first = semantic.iloc[0]
    chance = (f"chance: caption top-1 {pct(first['caption_chance_top1'])} %, top-5 {pct(first['caption_chance_top5'])} %"
              + (f", category {pct(first['category_chance'])} %" if pd.notna(first.get("category_chance")) else ""))
    head = ["subject", "encoder", "target", "parameters", "pooled r", "pooled 2-way", "caption top-1",
            "caption top-5", "category"]
    return f"""<h3>Semantic route (this run)</h3>
<p class="note">Encoders of the model's text conditioning of each image's captions (mean pooled embedding), scored on
the test split in %: 2-way identification of the pooled embedding, caption retrieval among the test images, and (synthetic
data) category accuracy; {chance}. Italic: the synthetic data's semantic oracle (best linear decoder).</p>
<table><tr>{''.join(f"<th>{h}</th>" for h in head)}</tr>
{chr(10).join(rows)}
</table>"""


def semantic_paragraph(summary: pd.DataFrame) -> str:
    """One paragraph (HTML) on what the semantic conditionings add on this run: for each latent source
    conditioned on meaning, where :func:`braid.frontier.image_points` looks, each conditioning's
    CLIP 2-way (or the first network metric present), PixCorr and category readout against ``none``."""
    from .frontier import image_points

    if not (summary["mode"] == "img2img").any():
        return ""
    points, strength, guidance = image_points(summary)
    metric = next((m for m in ("clip", "inception", "alexnet5", "alexnet2") if m in points and points[m].notna().any()),
                  None)
    shown = [m for m in (metric, "pixcorr", "category") if m and m in points and points[m].notna().any()]
    names = {"clip": "CLIP 2-way", "inception": "Inception 2-way", "alexnet5": "AlexNet(5) 2-way",
             "alexnet2": "AlexNet(2) 2-way", "pixcorr": "PixCorr", "category": "category readout"}
    fmt = lambda m, v: f"{v:.3f}" if m == "pixcorr" else f"{100 * v:.1f} %"  # noqa: E731
    sentences = []
    for (subject, source), g in points.groupby(["subject", "encoder"]):
        if (g["conditioning"] != "none").sum() == 0 or (g["conditioning"] == "none").sum() == 0:
            continue
        base = g[g["conditioning"] == "none"].iloc[0]
        parts = []
        for r in g[g["conditioning"] != "none"].to_dict("records"):
            changes = ", ".join(f"{names[m]} {fmt(m, base[m])} → {fmt(m, r[m])}" for m in shown)
            extra = f" (+{int(r['n_parameters_semantic']):,} parameters)" if r.get("n_parameters_semantic") else ""
            parts.append(f"<b>{html.escape(r['conditioning'])}</b>{extra}: {changes}")
        sentences.append(f"{html.escape(subject)}, latent from <i>{html.escape(source)}</i>: " + "; ".join(parts) + ".")
    if not sentences:
        return ""
    return f"""<h3>What the semantic route adds (this run)</h3>
<p class="note">SSD-1B told what the brain says each image shows, against the fixed prompt (<b>none</b>), on the
same test images, seeds and latents, at img2img strength {strength:g} and guidance {guidance:g}: <b>predicted</b>
passes a semantic encoder's predicted text embeddings, <b>retrieved</b> the retrieval bank's caption nearest to its
prediction, <b>true-caption</b> the image's own captions (the ceiling of both). {' '.join(sentences)}</p>"""


def html_table(summary: pd.DataFrame, semantic: pd.DataFrame | None = None) -> str:
    """A standalone HTML page: BRAID's table (and its semantic encoders'), then the published rows, clearly apart."""
    ours = braid_table(summary)
    stamps = not_a_result(summary.get("weights", []), summary.get("metric_weights", []))
    extra = [c for c, (m, _) in EXTRA_COLUMNS.items() if m in summary and summary[m].notna().any()]
    percent = {c for c, (_, p) in {**BRAID_COLUMNS, **EXTRA_COLUMNS}.items() if p}

    def rows_html(t: pd.DataFrame, lead: list[str], as_given: bool = False, columns=COLUMNS) -> str:
        out = []
        for r in t.to_dict("records"):
            cells = [html.escape(str(r[c])) for c in lead] + [_cell(r.get(c), c in percent, as_given) for c in columns]
            reference = r.get("encoder") in ("true-latent", "mean-latent") or r.get("conditioning") == "true-caption"
            cls = ' class="ref"' if reference else ""
            out.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        return "\n".join(out)

    head = lambda lead, columns=COLUMNS: "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in lead + columns) + "</tr>"  # noqa: E731
    pub = published_table()
    lead_ours = ["subject", "encoder", "conditioning", "run", "parameters", "N", "seeds"]
    lead_pub = ["model", "subjects", "N"]
    pub["N"] = pub["N"].map(lambda n: "—" if pd.isna(n) else str(int(n)))
    stamp_html = "".join(f'<p class="stamp">{html.escape(s)}</p>' for s in stamps)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>BRAID metrics</title>
<style>
body {{ font-family: sans-serif; font-size: 13px; margin: 16px; }}
table {{ border-collapse: collapse; margin-bottom: 18px; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: right; white-space: nowrap; }}
th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}
tr.ref td {{ color: #555; font-style: italic; }}
.stamp {{ color: #b00; font-weight: bold; }} .note {{ color: #555; max-width: 1000px; }}
</style></head><body>
<h3>BRAID (this run)</h3>
{stamp_html}
<p class="note">2-way identification and retrieval in %, as the papers print them (chance 50 % and 1/pool);
Eff and SwAV are mean correlation distances (lower is better). MindEye's protocol: images at 256² then
425² (PixCorr, SSIM) and each network's own size. Retrieval: predicted vs true VAE latents, top-1 among
min(300, N) test images. <i>parameters</i>: brain-side, the latent encoder's plus, conditioned on a semantic
encoder's prediction, its own. <i>conditioning</i>: img2img's text conditioning (none: the fixed prompt). Italic rows
are references: <i>true-latent</i> (the stimulus's own z0: decoded = the autoencoder's ceiling, img2img = this
design's ceiling), <i>mean-latent</i> (chance level) and the <i>true-caption</i> conditioning (the semantic
ceiling). Category (synthetic data only): reconstructions read as the category of their nearest training
stimulus (8 × 8 thumbnails, colour casts ignored), right in %.</p>
<table>{head(lead_ours, COLUMNS + extra)}
{rows_html(ours, lead_ours, columns=COLUMNS + extra)}
</table>
{semantic_paragraph(summary)}
{semantic_html(semantic)}
<h3>Published (not computed here)</h3>
<p class="note">From the papers' code and notebooks ([P]), third-party summaries ([S]) or unverified ([U]); see
BRAID's docs/method.md. Comparable with BRAID's rows only for a run with config/nsd_literature.yaml
(shared1000 test images, repeats averaged) and pretrained metric networks.</p>
<table>{head(lead_pub)}
{rows_html(pub, lead_pub, as_given=True)}
</table>
<p class="note">Sources: {''.join(f'<br>{html.escape(m)}: {html.escape(s)}' for m, s in zip(pub['model'], pub['source']))}</p>
</body></html>
"""
