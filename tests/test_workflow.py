"""The real Snakemake DAG, end to end on the embedded default (synthetic NSD + tiny model).

Runs `snakemake` as users do, in a fresh working directory, and checks that the planted signal
is recovered, that a second run has nothing to do, that a config or code change reruns only what
it affects, that DAG drawing behaves, and that the SLURM profile gives the same results.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import braid.config
from snakemake_runs import (GPU_RULES, PARALLEL, REPO, RUN_LAYER, planned_outputs, planned_rules,
                            snakemake)

pytestmark = pytest.mark.integration


# The `run` fixture is the embedded default (`make demo`'s configuration) with one img2img strength
# (the semantic conditionings' too) instead of two, a tiny model whose UNet trains 300 steps instead
# of 1,000 (no test here reads the quality of its denoising; the pixel tests read the VAE, trained
# in full), and the ventral stream's semantic signal at full strength (semantic_gain 1, where the
# semantic encoders' thresholds below are set; what the gain does is tested in test_synthetic.py):
# every rule, the sweep and the frontier. Every snakemake call on its folder layers this first.
RUN_CHANGES = {"reconstruct": {"strengths": [0.3], "seeds": [0],
                               "conditioning": {"modes": ["predicted", "retrieved", "true-caption"], "latent": ["ridge"],
                                                "semantic": ["ridge-tokens"], "strengths": [0.3]}},
               "model": {"train": {"unet_steps": 300}},
               "synthetic": {"semantic_gain": 1.0}}


def run_config() -> dict:
    """The `run` fixture's config: config/config.yaml with RUN_CHANGES merged in."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for block, changes in RUN_CHANGES.items():
        config[block] = {**config.get(block, {}), **changes}
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("braid")
    (workdir / RUN_LAYER).write_text(yaml.safe_dump(RUN_CHANGES))
    snakemake(workdir, *PARALLEL)
    return workdir


def test_outputs_and_planted_signal_recovered(run):
    config = run_config()
    summary = pd.read_csv(run / "results" / "summary.csv")
    semantic = summary[summary["mode"] == "semantic"]  # the semantic route's rows (test_semantic_route_...)
    summary = summary[summary["mode"] != "semantic"]
    assert sorted(semantic["encoder"]) == sorted(f"semantic/{e}" for e in
                                                 [*config["semantic_encoders"], "lowrank-rank1", "lowrank-rank2",
                                                  "lowrank-rank8", "oracle (best linear)"])
    sources = [*config["encoders"], "true-latent", "mean-latent"]
    strengths, seeds = config["reconstruct"]["strengths"], config["reconstruct"]["seeds"]
    guidance = config["reconstruct"]["guidance_scales"][0]
    cond = config["reconstruct"]["conditioning"]
    conditionings = [f"{m}-{e}" if m != "true-caption" else m for m in cond["modes"]
                     for e in (cond["semantic"] if m != "true-caption" else [None])]
    runs_of = {s: 1 + len(strengths) * (1 + (len(conditionings) if s in cond["latent"] else 0)) for s in sources}
    assert len(summary) == sum(runs_of.values()) * len(config["subjects"])  # decode-only + each conditioning x strength
    semantic_runs = summary[summary["conditioning"].isin(conditionings)]
    assert set(semantic_runs["encoder"]) == set(cond["latent"]) and set(semantic_runs["conditioning"]) == set(conditionings)
    latent_params = summary.groupby("encoder")["n_parameters_latent"].first()
    for r in semantic_runs.itertuples():  # the brain-side total: the latent encoder's plus the semantic one's
        extra = 0 if r.conditioning == "true-caption" else semantic.set_index("encoder").loc[
            f"semantic/{r.semantic_encoder}", "n_parameters"]
        assert r.n_parameters == latent_params[r.encoder] + extra and r.n_parameters_semantic == extra, r
    assert (summary["weights"] == "synthetic-trained (not a result)").all()  # the tiny model: never a result
    assert (summary["metric_weights"] == "random (not comparable)").all()  # random metric networks: stamped
    img2img = summary[summary["mode"] == "img2img"]
    assert sorted(img2img["strength"].unique()) == sorted(strengths) and (img2img["n_seeds"] == len(seeds)).all()
    assert (img2img["guidance"] == guidance).all()
    assert summary.loc[summary["mode"] == "decode", "strength"].isna().all()
    oracle = pd.read_csv(run / "results" / "subj01" / "oracle_metrics.csv").iloc[0]
    assert oracle["n_test_trials"] == summary["n_test_trials"].iloc[0]  # scored on the same test rows
    assert 0.6 < oracle["latent_r"] < 0.95  # not inflated by a prior that contains the test images
    chance = 1 / summary["retrieval_pool"].iloc[0]
    for row in summary.itertuples():
        assert 0 <= row.ssim <= 1 and -1 <= row.pixcorr <= 1
        assert row.n_test_images >= 15 and row.n_test_trials >= 3 * 15 - 5
        for metric in ("alexnet2", "alexnet5", "efficientnet"):  # the demo's networks, every row
            assert np.isfinite(getattr(row, metric)), (metric, row)
        for metric in ("inception", "clip", "swav"):  # the networks it leaves out are not scored
            assert not np.isfinite(getattr(row, metric, np.nan)), (metric, row)
        assert row.oracle_latent_r == pytest.approx(oracle["latent_r"])
        if row.encoder == "true-latent":  # a perfect encoder: the ceiling of every latent score
            assert row.latent_r == pytest.approx(1) and row.latent_two_way == 1 and row.retrieval_image == 1
            continue
        if row.encoder == "mean-latent":  # no information: chance
            assert abs(row.latent_r) < 1e-5 and row.retrieval_image == 0 and row.n_parameters == 0
            continue
        # far above chance (r 0, 2-way 0.5); the full-size ones close to the best linear decoder that
        # knows the model (the rank-16 ones are a point lower on the frontier by design)
        assert row.latent_r > 0.25 and row.latent_two_way > 0.9, row
        assert row.retrieval_image > 5 * chance and row.retrieval_brain > 5 * chance, row
        if row.encoder in ("ridge", "mlp"):
            assert 0.6 * oracle["latent_r"] < row.latent_r, row
        if row.encoder in ("ridge", "lowrank"):  # the oracle bounds linear decoders (up to test-set sampling error)
            assert row.latent_r < oracle["latent_r"] + 0.02, row
    params = summary.groupby("encoder")["n_parameters"].first()
    assert params["student"] == params["lowrank"] < params["ridge"] < params["mlp"]
    per_image = pd.read_parquet(run / "results" / "metrics_per_image.parquet")
    n_images = summary["n_test_images"].iloc[0]
    n_runs = sum(1 + (n - 1) * len(seeds) for n in runs_of.values())
    assert len(per_image) == n_runs * n_images  # every run, every image
    one = per_image[(per_image["encoder"] == "ridge") & (per_image["strength"] == strengths[0])
                    & (per_image["conditioning"] == "none")]
    row = summary[(summary["encoder"] == "ridge") & (summary["strength"] == strengths[0])
                  & (summary["conditioning"] == "none")].iloc[0]
    assert row["ssim"] == pytest.approx(one["ssim"].mean())  # the summary is the mean of the per-image rows
    for path in ["results/summary.png", "results/subj01/mlp/loss.png", "results/subj01/grid-strength-0.3.png",
                 "results/frontier_images.png"]:
        assert (run / path).read_bytes()[:4] == b"\x89PNG", path
    page = (run / "results" / "summary.html").read_text()
    assert "Published (not computed here)" in page and "NOT COMPARABLE" in page
    assert "Semantic route (this run)" in page and "semantic/ridge-tokens" in page
    assert "weights are synthetic-trained, not pretrained: NOT A RESULT" in page
    assert "What the semantic route adds (this run)" in page and "retrieved-ridge-tokens" in page
    for source in sources:
        for c in ["none", *(conditionings if source in cond["latent"] else [])]:
            for folder in ("decode", *(f"{c}/guidance-{guidance:g}/strength-{s:g}/seed-{k}" for s in strengths
                                       for k in seeds)):
                images = list((run / "results" / "subj01" / source / folder / "images").glob("*.png"))
                assert len(images) == n_images, (source, folder)
    retrieved = pd.read_csv(run / "results" / "subj01" / "conditioning" / "retrieved-ridge-tokens.csv")
    assert len(retrieved) == n_images and retrieved["caption"].str.len().gt(0).all()  # a caption per image, to read
    joined = pd.read_csv(run / "results" / "frontier_metrics.csv")
    assert set(joined.loc[joined["pixcorr"].notna(), "encoder"]) == set(config["encoders"])  # reconstructed ones
    assert len(joined) == 12 + sum(runs_of[e] for e in config["encoders"]) + 1  # sweep once, named ones per run, the baseline
    assert (run / "logs" / "subj01" / "mlp" / "train.log").read_text().count("parameters") >= 1
    assert not list(run.glob("results/**/.tmp-*"))


def _pixcorr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_reconstructions_recover_the_stimuli_in_pixels(run):
    """Decode-only images from predicted latents look like their own stimulus, not like the others
    (chance measured in this run), and the true latents' look more so: a broken path from latents
    to pixels (scaling, un-normalisation, dtype, orientation) fails here. PixCorr and SSIM are
    computed from the PNGs with numpy and skimage, not with BRAID's own metrics."""
    from PIL import Image
    from skimage.metrics import structural_similarity

    from braid.latents import read_stimuli

    config = run_config()
    size = config["model"]["image_size"]
    subject = run / "results" / "subj01"
    ids = sorted(int(p.stem) for p in (subject / "ridge" / "decode" / "images").glob("*.png"))
    stimuli = read_stimuli(run / "resources" / "synthetic_nsd" / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5", np.array(ids))
    seen = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC)) for im in stimuli]) / 255.0

    def decoded(source: str) -> np.ndarray:
        return np.stack([np.asarray(Image.open(subject / source / "decode" / "images" / f"{i}.png")) for i in ids]) / 255.0

    off = ~np.eye(len(ids), dtype=bool)
    ceiling = decoded("true-latent")
    result = {}
    for source in ("true-latent", "ridge", "mlp", "mean-latent"):
        recs = decoded(source)
        pix = np.array([[_pixcorr(r, s) for s in seen] for r in recs])  # reconstruction i against stimulus j
        ssim = np.array([[structural_similarity(r, s, channel_axis=-1, data_range=1.0) for s in seen] for r in recs])
        result[source] = {"pix": pix.diagonal().mean(), "ssim": ssim.diagonal().mean(),
                          "pix_chance": pix[off].mean(), "ssim_chance": ssim[off].mean(),
                          "pix_wins": (pix.diagonal()[:, None] > np.where(off, pix, np.nan)).mean(where=off),
                          "colour_error": np.abs(recs.mean((1, 2)) - seen.mean((1, 2))).mean(),  # mean RGB per image
                          "pix_vs_ceiling": np.mean([_pixcorr(r, c) for r, c in zip(recs, ceiling)])}
    # measured (make demo, 2-core CPU): PixCorr true 0.55, ridge 0.48, mlp 0.39, chance -0.02; SSIM
    # 0.38, 0.32, 0.30, chance 0.17-0.24; own stimulus beats another's 87 %, 82 %, 75 %; mean-colour
    # error 0.050, 0.059, 0.069, mean latent 0.172; PixCorr with the true latent's image 0.88, 0.73
    true, chance = result["true-latent"], result["mean-latent"]
    assert true["pix"] > 0.4 and true["ssim"] > 0.3 and true["pix_wins"] > 0.75, true  # the autoencoder's ceiling
    for name in ("ridge", "mlp"):
        r = result[name]
        # clearly above chance: other images' stimuli, and the mean latent's image
        assert r["pix"] > r["pix_chance"] + 0.2 and r["pix"] > chance["pix"] + 0.2, (name, r, chance)
        assert r["ssim"] > r["ssim_chance"] + 0.05 and r["ssim"] > chance["ssim"] + 0.03, (name, r, chance)
        assert r["pix_wins"] > 0.65, (name, r)  # its own stimulus beats another's, image by image
        assert r["colour_error"] < 0.5 * chance["colour_error"], (name, r, chance)  # the colours, image by image
        assert r["pix_vs_ceiling"] > 0.55, (name, r)  # close to what the true latent decodes to
        assert true["pix"] > r["pix"] and true["ssim"] > r["ssim"], (name, r, true)  # the true latents are above


def test_frontier_scores_every_encoder_and_each_beats_the_mean_predictor(run):
    import braid.config

    config = run_config()
    table = pd.read_csv(run / "results" / "subj01" / "frontier.csv").set_index("encoder")
    names = braid.config.frontier_encoders(config)
    assert len(names) == 16 and sorted(table.index) == sorted([*names, "mean latent (baseline)"])
    baseline = table.loc["mean latent (baseline)"]
    assert baseline["n_parameters"] == 0 and baseline["test_mse_z"] > 0.9
    for name in names:
        row = table.loc[name]
        assert row["test_latent_r"] > 0.05 and row["test_mse_z"] < baseline["test_mse_z"], name  # rank 1 too
        saved = json.loads((run / "results" / "subj01" / name / "encoder.json").read_text())
        assert saved["n_parameters"] == row["n_parameters"] and saved["spec"]["kind"] == row["kind"]
    for name in config["encoders"]:  # the named encoders: a wide margin over the mean predictor
        row = table.loc[name]
        assert row["test_latent_r"] > 0.25 and row["test_latent_two_way"] > 0.9, name
        assert row["test_mse_z"] < 0.9 * baseline["test_mse_z"], name
    assert table.loc["mlp", "is_reference"] and table["pareto"].sum() >= 3
    assert table.loc["ridge-k30", "n_voxels"] == 30 and table.loc["lowrank-rank4", "n_parameters"] < table.loc["lowrank", "n_parameters"]
    assert (run / "results" / "subj01" / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_the_semantic_route_recovers_the_planted_semantic_signal(run):
    """The demo's semantic encoders, read from the ventral ROI: caption retrieval and category accuracy
    far above chance, the full-size ones close to the semantic oracle; no test image's caption retrieved."""
    config = run_config()
    folder = run / "results" / "subj01" / "semantic"
    table = pd.read_csv(folder / "frontier.csv").set_index("encoder")
    oracle = table.loc["oracle (best linear)"]
    assert oracle["test_pooled_r"] > 0.8 and oracle["test_caption_top1"] > 5 * oracle["test_caption_chance_top1"]
    for name in config["semantic_encoders"]:
        row = table.loc[name]
        assert row["test_pooled_two_way"] > 0.85, (name, row)
        assert row["test_caption_top5"] > 2.5 * row["test_caption_chance_top5"], (name, row)
        assert row["test_category_accuracy"] > row["test_category_chance"], (name, row)
    # categories are only loosely apart in the text encoders' space (trained 300 steps here): on average
    named = table.loc[list(config["semantic_encoders"])]
    assert named["test_category_accuracy"].mean() > 2 * named["test_category_chance"].iloc[0], named
    for name in ("ridge", "ridge-tokens"):  # the linear decoders: a known share of the best linear one
        row = table.loc[name]
        assert 0.85 * oracle["test_pooled_r"] < row["test_pooled_r"] < oracle["test_pooled_r"] + 0.03, (name, row)
    assert 0.5 < table.loc["ridge-tokens", "token_variance_kept"] <= 1
    params = table["n_parameters"]
    assert params["lowrank-rank1"] < params["lowrank-rank2"] < params["lowrank"] < params["ridge"] < params["ridge-tokens"]
    assert table.loc["mean embedding (baseline)", "n_parameters"] == 0
    trials = pd.read_parquet(folder / "trials.parquet")
    retrieved = pd.read_parquet(folder / "retrieved.parquet")
    assert len(retrieved) == (len(table) - 2) * (trials["split"] == "test").sum()  # every encoder, every test row
    assert not set(retrieved["bank_nsd_id"]) & set(trials.loc[trials["split"] == "test", "nsd_id"])
    for path in ("frontier.png", "ridge/loss.png"):
        assert (folder / path).read_bytes()[:4] == b"\x89PNG", path


def test_a_semantic_encoder_change_reruns_only_it_and_what_follows(run, tmp_path):
    config = run_config()
    config["semantic_encoders"]["mlp"]["epochs"] = 30
    changed = tmp_path / "semantic.yaml"
    changed.write_text(yaml.safe_dump(config))
    plan = snakemake(run, "-n", "--configfile", str(changed))
    assert planned_rules(plan) == {"semantic_train", "semantic_frontier", "evaluate_summary", "all"}
    trained = set(re.findall(r"results/subj01/semantic/([\w-]+)/encoder\.safetensors", plan.stdout))
    assert trained == {"mlp", "student"}  # the MLP and the student it teaches
    config = run_config()
    config["semantic"]["token_components"] = 8  # only the tokens target uses it
    changed.write_text(yaml.safe_dump(config))
    plan = snakemake(run, "-n", "--configfile", str(changed))
    assert set(re.findall(r"results/subj01/semantic/([\w-]+)/encoder\.safetensors", plan.stdout)) == {"ridge-tokens"}
    config = run_config()
    config["semantic"]["text_batch_size"] = 7  # how the cache is filled, not what it holds
    config["semantic_roi"] = {"streams": [5]}
    changed.write_text(yaml.safe_dump(config))
    assert planned_rules(snakemake(run, "-n", "--configfile", str(changed))) == set()


def test_every_job_leaves_its_wall_time_and_peak_memory(run):
    """Snakemake's benchmark record per job (logs/benchmark/<rule>/...), gathered per rule by braid.jobstats."""
    from braid import jobstats

    table = jobstats.by_rule(jobstats.jobs(run)).set_index("rule")
    for rule in ("betas_mask", "latents_encode", "encoder_train", "reconstruct_img2img", "evaluate_images",
                 "model_train", "nsd_fetch_betas_roi", "evaluate_summary"):
        assert table.loc[rule, "jobs"] >= 1 and table.loc[rule, "total_s"] > 0, rule
    # a job that loads torch and a model holds well over 100 MB; the records are of the job, not of snakemake
    assert table.loc["encoder_train", "max_rss_mb"] > 100
    config = run_config()
    runs = 1 + len(config["reconstruct"]["strengths"]) * len(config["reconstruct"]["seeds"])
    cond = config["reconstruct"]["conditioning"]
    semantic = (len(cond["modes"]) - 1) * len(cond["semantic"]) + 1  # predicted, retrieved per encoder; true caption
    conditioned = semantic * len(cond["strengths"]) * len(config["reconstruct"]["seeds"]) * len(cond["latent"])
    assert table.loc["evaluate_images", "jobs"] == (runs * (len(config["encoders"]) + 2) + conditioned) * len(
        config["subjects"])
    assert table.loc["reconstruct_conditioning", "jobs"] == semantic * len(config["subjects"])


def test_long_steps_write_their_progress_to_their_logs(run):
    """Not only the terminal: the job's log file has the step, count, rate (and, until the end, ETA)."""
    model = (run / "logs" / "model" / "train.log").read_text()
    steps = 700 + 300 + RUN_CHANGES["model"]["train"]["unet_steps"]  # VAE, text encoders (captions), UNet
    assert f"tiny model: {steps}/{steps} step (100 %)" in model, model[-2000:]
    mlp = (run / "logs" / "subj01" / "mlp" / "train.log").read_text()
    assert re.search(r"epochs: (\d+)/\1 epoch \(100 %\), [0-9.e+]+ epoch/s", mlp), mlp[-2000:]


def test_second_run_has_nothing_to_do(run):
    proc = snakemake(run, "-n")
    assert planned_rules(proc) == set(), proc.stdout[-3000:]


def test_damage_to_a_finished_run_is_found_named_and_repaired(run, tmp_path):
    """A truncated Zarr chunk, a deleted image and an image replaced by another: a plain dry run
    trusts all three (Snakemake compares times, not contents); ``braid.verify`` names each with
    the rule that wrote it and prints one ``--forcerun`` command; running it restores a run that
    verifies, with the undamaged run's summary.csv."""
    work = tmp_path / "damaged"
    shutil.copytree(run, work, symlinks=True, ignore=shutil.ignore_patterns("locks", "incomplete"))
    verify = [sys.executable, "-m", "braid.verify", str(work)]
    ok = subprocess.run(verify, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("all outputs verified"), ok.stdout + ok.stderr
    results = work / "results" / "subj01"
    chunk = results / "ridge" / "predictions.zarr" / "pred" / "c" / "0" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-10])
    deleted = sorted((results / "ridge" / "decode" / "images").glob("*.png"))[0]
    deleted.unlink()
    guidance = "guidance-" + braid.config.strength_label(run_config()["reconstruct"]["guidance_scales"][0])
    replaced, other = sorted((results / "mlp" / "none" / guidance / "strength-0.3" / "seed-0" / "images").glob("*.png"))[:2]
    shutil.copyfile(other, replaced)
    assert planned_rules(snakemake(work, "-n")) == set()  # nothing looks out of date

    found = subprocess.run(verify, capture_output=True, text=True)
    assert found.returncode == 1, found.stdout + found.stderr
    lines = found.stdout.splitlines()
    assert lines[0] == "3 damaged output(s) of " + lines[0].split(" of ")[1]
    assert any(line.strip().startswith("results/subj01/ridge/predictions.zarr: chunk pred/c/0/0/0/0 is damaged")
               and line.endswith("written by rule encoder_train") for line in lines), found.stdout
    assert any(f"results/subj01/ridge/decode/images: {deleted.name} is missing" in line
               and line.endswith("rule reconstruct_decode") for line in lines), found.stdout
    assert any(f"seed-0/images: {replaced.name} " in line and line.endswith("rule reconstruct_img2img")
               and ("was changed" in line or "bytes, not" in line) for line in lines), found.stdout  # same size or not
    repair = lines[-1].split()
    assert repair[:2] == ["snakemake", "--forcerun"] and sorted(repair[2:]) == sorted([
        "results/subj01/ridge/predictions.zarr/zarr.json", "results/subj01/ridge/decode/images",
        f"results/subj01/mlp/none/{guidance}/strength-0.3/seed-0/images"])

    snakemake(work, *repair[1:], *PARALLEL)
    again = subprocess.run(verify, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout
    pd.testing.assert_frame_equal(pd.read_csv(work / "results" / "summary.csv"),
                                  pd.read_csv(run / "results" / "summary.csv"), check_exact=False, rtol=1e-6)


# the ROI-only and row-only fetches (whose files BRAID lays out) and their manifest; whole-object
# downloads (nsd_fetch) are the source's bytes and rerun on their key and source alone
FETCH_RULES = {"nsd_fetch_betas_roi", "nsd_fetch_stimuli_rows", "nsd_manifest"}


def plan_after_edit(run: Path, module: str) -> subprocess.CompletedProcess:
    """A dry run of the finished ``run`` after an edit of src/braid/<module>: a comment line added
    (Snakemake compares a small input's checksum, not only its time); the file's bytes and time
    are put back afterwards."""
    path = REPO / "src" / "braid" / module
    before, text = path.stat(), path.read_bytes()
    try:
        path.write_bytes(text + b"# an edit\n")
        return snakemake(run, "-n")
    finally:
        path.write_bytes(text)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_an_edit_of_the_transfer_code_reruns_the_fetch_jobs_and_nothing_after_them(run):
    """Fetched files are verified copies of their sources: an edit of braid/transfer.py fetches
    the ROI-only and row-only files again (the same bytes), and no job that reads them runs again. An edit of braid/nsd.py (what
    the files hold) reruns their readers."""
    plan = plan_after_edit(run, "transfer.py")
    assert planned_rules(plan) == FETCH_RULES | {"all"}, plan.stdout[-3000:]
    assert "src/braid/transfer.py" in plan.stdout  # the reason given
    rules = planned_rules(plan_after_edit(run, "nsd.py"))
    assert {"betas_mask", "latents_encode", "encoder_train", "reconstruct_img2img"} <= rules


def test_config_change_reruns_only_what_it_affects(run, tmp_path):
    config = run_config()
    config["reconstruct"]["steps"] = 12
    changed = tmp_path / "steps.yaml"
    changed.write_text(yaml.safe_dump(config))
    assert planned_rules(snakemake(run, "-n", "--configfile", str(changed))) == {
        "reconstruct_img2img", "evaluate_images", "evaluate_grid", "evaluate_summary", "all"}  # not decode-only
    config["reconstruct"]["steps"] = 10
    config["reconstruct"]["seeds"] = [0, 1]  # one more seed: its runs only (the grids show the first seed)
    changed.write_text(yaml.safe_dump(config))
    plan = snakemake(run, "-n", "--configfile", str(changed))
    assert planned_rules(plan) == {"reconstruct_img2img", "evaluate_images", "evaluate_summary", "all"}
    assert set(re.findall(r"seed-(\d+)/images", plan.stdout)) == {"1"}
    config["reconstruct"]["seeds"] = [0]
    config["evaluate"]["networks"] = [*config["evaluate"]["networks"], "inception"]  # one more metric network
    changed.write_text(yaml.safe_dump(config))
    plan = snakemake(run, "-n", "--configfile", str(changed))
    assert planned_rules(plan) == {"metrics_fetch", "evaluate_stimuli", "evaluate_images", "evaluate_summary", "all"}
    assert plan.stdout.count("rule metrics_fetch:") == 1 and "random-seed0/inception" in plan.stdout
    config = run_config()
    config["encoders"]["ridge"]["alphas"] = [1.0, 10.0]
    changed.write_text(yaml.safe_dump(config))
    plan = snakemake(run, "-n", "--configfile", str(changed))
    assert planned_rules(plan) == {"encoder_train", "encoder_frontier", "reconstruct_decode", "reconstruct_img2img",
                                   "evaluate_images", "evaluate_grid", "evaluate_summary", "all"}
    trained = set(re.findall(r"results/subj01/([\w-]+)/encoder\.safetensors", plan.stdout))
    assert trained == {"ridge", "ridge-k30", "ridge-k100", "ridge-k300"}  # the ridge and its sweep, nothing else
    decoded = {m.group(1) for o in planned_outputs(plan) for m in re.finditer(r"results/subj01/([\w-]+)/decode/images", o)}
    assert decoded == {"ridge"}  # the other encoders' reconstructions stay
    # the tiny model's recipe retrains it and reruns all that follows; the noise of the synthetic
    # data regenerates the betas, not the stimuli, nor the model trained on them
    config = run_config()
    config["model"]["train"] = {"unet_steps": 400}
    changed.write_text(yaml.safe_dump(config))
    rules = planned_rules(snakemake(run, "-n", "--configfile", str(changed)))
    assert {"model_train", "nsd_synthetic", "latents_encode", "encoder_train", "reconstruct_decode"} <= rules
    assert "nsd_synthetic_stimuli" not in rules
    config["model"]["train"] = {}
    config["synthetic"]["noise_sd"] = 1.5
    changed.write_text(yaml.safe_dump(config))
    rules = planned_rules(snakemake(run, "-n", "--configfile", str(changed)))
    assert {"nsd_synthetic", "betas_mask", "encoder_train"} <= rules and not {"model_train", "nsd_synthetic_stimuli"} & rules
    # reordering keys, batch sizes of inference, compilation and the device change nothing
    config = run_config()
    config["reconstruct"]["batch_size"] = 3
    config["evaluate"]["batch_size"] = 5
    config["model"]["latent_batch_size"] = 5
    config["model"]["compile"] = True
    config["device"] = "cpu"
    config["training"] = {"checkpoint_minutes": 1}
    config["encoders"]["ridge"] = {"alphas": [float(a) for a in braid_defaults()["alphas"]], "kind": "ridge"}
    config["encoders"]["mlp"] = dict(reversed(list(config["encoders"]["mlp"].items())))
    changed.write_text(yaml.safe_dump(config, sort_keys=False))
    assert planned_rules(snakemake(run, "-n", "--configfile", str(changed))) == set()


def test_a_conditioning_mode_or_a_guidance_scale_added_runs_only_its_jobs(run, tmp_path):
    """One more guidance scale: its img2img and scoring jobs, for every latent source and conditioning,
    nothing upstream (the grid shows the first). One more semantic encoder for the conditionings: its
    conditioning stores and their runs only."""
    config = run_config()
    config["reconstruct"]["guidance_scales"] = [*config["reconstruct"]["guidance_scales"], 5.0]
    changed = tmp_path / "guidance.yaml"
    changed.write_text(yaml.safe_dump(config))
    plan = snakemake(run, "-n", "--configfile", str(changed))
    assert planned_rules(plan) == {"reconstruct_img2img", "evaluate_images", "evaluate_summary", "all"}
    made = [o for o in planned_outputs(plan) if o.strip().endswith("/images")]
    assert made and all("/guidance-5/" in o for o in made)
    assert len(made) == 6 + 3  # every latent source's none, and ridge's three semantic conditionings
    config = run_config()
    config["reconstruct"]["conditioning"]["semantic"] = ["ridge-tokens", "ridge"]
    changed.write_text(yaml.safe_dump(config))
    plan = snakemake(run, "-n", "--configfile", str(changed))
    assert planned_rules(plan) == {"reconstruct_conditioning", "reconstruct_img2img", "evaluate_images",
                                   "evaluate_grid", "evaluate_summary", "all"}
    made = {m.group(1) for o in planned_outputs(plan) for m in re.finditer(r"results/subj01/([\w/-]+)/guidance", o)}
    assert made == {"ridge/predicted-ridge", "ridge/retrieved-ridge"}
    config["reconstruct"]["conditioning"]["semantic"] = ["ridge-tokens", "nonexistent"]
    changed.write_text(yaml.safe_dump(config))
    bad = snakemake(run, "-n", "--configfile", str(changed), check=False)
    assert bad.returncode != 0 and "reconstruct.conditioning.semantic ['nonexistent'] are not defined" in (
        bad.stdout + bad.stderr)


def braid_defaults():
    from braid.encoder import DEFAULTS

    return DEFAULTS


def test_dag_is_clean_dot(run):
    proc = snakemake(run, "--rulegraph")
    assert proc.stdout.startswith("digraph") and proc.stdout.rstrip().endswith("}")
    for rule in ("nsd_fetch", "betas_mask", "latents_encode", "encoder_train", "reconstruct_img2img", "reconstruct_decode",
                 "metrics_fetch", "evaluate_stimuli", "evaluate_images", "evaluate_summary"):
        assert rule in proc.stdout
    assert snakemake(run, "--dag").stdout.startswith("digraph")


def test_a_config_gets_exactly_the_rois_it_names(run, tmp_path):
    """--configfile's roi replaces the default's, it is not merged with it (same for encoders)."""
    import nibabel as nib
    import zarr

    work = tmp_path / "w"
    shutil.copytree(run / "resources", work / "resources")  # the model and the synthetic mirror, as fetched
    shutil.copytree(run / ".snakemake" / "metadata", work / ".snakemake" / "metadata")
    shutil.copy(run / RUN_LAYER, work / RUN_LAYER)
    override = tmp_path / "roi.yaml"
    override.write_text(yaml.safe_dump({"roi": {"prf-visualrois": [1, 2]}, "encoders": {"tiny": {"hidden": [8]}}}))
    plan = snakemake(work, "-n", "--configfile", str(override))
    assert "encoder_train" in planned_rules(plan) and "encoder=tiny" in plan.stdout
    assert "results/subj01/mlp/" not in plan.stdout and "results/subj01/linear/" not in plan.stdout
    snakemake(work, "results/subj01/betas.zarr/zarr.json", "--cores", "2", "--configfile", str(override))
    store = zarr.open_group(work / "results" / "subj01" / "betas.zarr", mode="r")
    prf = np.asarray(nib.load(work / "resources/synthetic_nsd/nsddata/ppdata/subj01/func1pt8mm/roi/prf-visualrois.nii.gz").dataobj)
    assert store["betas"].shape[1] == np.isin(prf, [1, 2]).sum()  # V1v + V1d only, no nsdgeneral
    assert store.attrs["roi"] == {"prf-visualrois": [1, 2]}
    assert sorted(p.name for p in (work / "results" / "subj01" / "betas.zarr").iterdir()) == sorted(
        ["zarr.json", *store.array_keys()])  # nothing but the store: no .snakemake_timestamp inside


def test_an_ncsnr_encoder_fetches_nsds_volume_and_selects_by_it(run, tmp_path):
    """voxels: ncsnr adds a whole-object fetch of the subject's ncsnr.nii.gz (the synthetic mirror's
    holds the true SNR: 1/noise_sd in nsdgeneral) and ranks the ROI's voxels by it."""
    import nibabel as nib
    import zarr
    from safetensors import safe_open

    work = tmp_path / "w"
    for part in ("resources", "results", ".snakemake/metadata"):
        shutil.copytree(run / part, work / part)
    shutil.copy(run / RUN_LAYER, work / RUN_LAYER)
    override = tmp_path / "ncsnr.yaml"
    override.write_text(yaml.safe_dump({"encoders": {"ridge_ncsnr": {"kind": "ridge", "voxels": "ncsnr", "k": 50}}}))
    key = "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/ncsnr.nii.gz"
    target = "results/subj01/ridge_ncsnr/encoder.json"
    plan = snakemake(work, "-n", target, "--configfile", str(override))
    assert planned_rules(plan) == {"nsd_fetch", "encoder_train"} and f"resources/nsd/{key}" in plan.stdout
    snakemake(work, target, "--cores", "2", "--configfile", str(override))
    volume = np.asarray(nib.load(work / "resources" / "nsd" / key).dataobj)
    ijk = zarr.open_group(work / "results/subj01/betas.zarr", mode="r")["voxel_ijk"][:]
    values = volume[tuple(ijk.T)]
    assert (values > 0).all()  # every nsdgeneral voxel carries signal in the synthetic NSD
    with safe_open(str(work / "results/subj01/ridge_ncsnr/encoder.safetensors"), "pt") as f:
        chosen = f.get_tensor("selection.voxels").numpy()
    assert chosen.size == 50 and values[chosen].min() >= np.sort(values)[-50]


def test_a_local_model_folder_is_used_as_is(run, tmp_path):
    """model.source may be a folder on this machine: no rule writes it, and jobs load from it."""
    folder = run / "resources" / "models" / "tiny-trained-ssd1b-seed0"
    override = tmp_path / "local.yaml"
    override.write_text(yaml.safe_dump({"model": {"source": str(folder)}}))
    plan = snakemake(run, "-n", "--configfile", str(override))
    rules = planned_rules(plan)
    assert not {"model_fetch", "model_train"} & rules and "latents_encode" in rules  # another identity: another cache
    assert str(folder) in plan.stdout  # the folder is an input of the jobs that load the model


# ---- on a real SLURM (.ci/slurm_up.sh), through profiles/slurm ---------------------------------

SLURM_SMALL = REPO / "tests" / "data" / "slurm_small.yaml"


def with_fetched(run: Path, work: Path) -> Path:
    """A working directory holding what `run` fetched and built under resources/ (data, model,
    metric weights), with Snakemake's records of it: only the results are left to compute."""
    for part in ("resources", ".snakemake/metadata"):
        shutil.copytree(run / part, work / part)
    shutil.copy(run / RUN_LAYER, work / RUN_LAYER)  # the same model recipe
    return work


def slurm_jobs(run_id: str) -> list[dict]:
    """SLURM's records of the jobs of one Snakemake run (its run id is every job's name)."""
    fields = ["JobID", "Comment", "State", "Partition", "tres-per-job", "NumCPUs"]
    out = subprocess.run(["squeue", "-h", "-t", "all", "-n", run_id, "-O", ",".join(f"{f}:|" for f in fields)],
                         capture_output=True, text=True, check=True).stdout
    return [dict(zip(fields, (v.strip() for v in line.split("|")))) for line in out.splitlines() if line.strip()]


def test_the_slurm_profile_runs_the_workflow_through_sbatch(run, tmp_path, slurm_cluster):
    """profiles/slurm unchanged (partitions cpu and gpu, squeue status) on a real single-node
    SLURM without accounting: every compute job goes through sbatch, the GPU rules ask for a GPU
    in the gpu partition, and every image's metrics equal those of the same runs in the local
    `run` (same data, model, seeds and thread counts)."""
    cluster = with_fetched(run, tmp_path / "cluster")
    proc = snakemake(cluster, "--profile", str(REPO / "profiles" / "slurm"), "--configfile", str(SLURM_SMALL),
                     *PARALLEL[2:], "--max-threads", "2")
    run_id = re.search(r"SLURM run ID: (\S+)", proc.stdout + proc.stderr).group(1)
    jobs = slurm_jobs(run_id)
    rules = {re.match(r"rule_(.+?)(?:_wildcards_|$)", j["Comment"]).group(1) for j in jobs}  # summary: no wildcards
    assert rules == GPU_RULES - {"reconstruct_conditioning"} | {"betas_mask", "latents_statistics", "encoder_frontier", "evaluate_grid",
                                 "evaluate_oracle", "evaluate_summary", "betas_mask_semantic", "semantic_bank",
                                 "semantic_oracle", "semantic_frontier"}
    assert all(j["State"] == "COMPLETED" for j in jobs), jobs
    for job in jobs:
        gpu_rule = any(job["Comment"].startswith(f"rule_{r}_wildcards_") for r in GPU_RULES)
        assert (job["Partition"], "gpu:1" in job["tres-per-job"]) == (("gpu", True) if gpu_rule else ("cpu", False)), job
    key = ["encoder", "mode", "conditioning", "strength", "seed", "nsd_id"]
    on_slurm = pd.read_parquet(cluster / "results" / "metrics_per_image.parquet").sort_values(key)
    local = pd.read_parquet(run / "results" / "metrics_per_image.parquet")
    local = local.merge(on_slurm[key], on=key).sort_values(key)  # the same runs in the default's
    assert len(on_slurm) == len(local) == 2 * on_slurm["nsd_id"].nunique() > 0  # ridge: decode, and 0.3 seed 0
    scores = [c for c in on_slurm.columns if c not in key and pd.api.types.is_float_dtype(on_slurm[c])]
    assert {"pixcorr", "ssim", "alexnet2", "efficientnet"} <= set(scores)
    for column in scores:
        np.testing.assert_allclose(on_slurm[column].to_numpy(), local[column].to_numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=column)


def test_a_job_no_node_can_run_stops_the_run_before_submission(run, tmp_path, slurm_cluster):
    """profiles/slurm with two impossible requests added (a test profile beside it): the run
    stops before submitting anything, naming each rule and resource. Threads beyond the node are
    not among them: they are fitted to it, with one warning."""
    from braid.slurm import cluster_partitions

    node = cluster_partitions()["gpu"]
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    profile["set-resources"]["encoder_train"]["gpu"] = node.gpus + 1
    profile["set-threads"] = {"reconstruct_decode": node.cpus + 3}
    profile["set-resources"]["betas_mask"] = {"mem_mb": node.mem_mb * 2}
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "config.yaml").write_text(yaml.safe_dump(profile))
    work = with_fetched(run, tmp_path / "w")
    proc = snakemake(work, "--profile", str(tmp_path / "profile"), "--configfile", str(SLURM_SMALL), check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"rule encoder_train: asks for {node.gpus + 1} GPUs (gpu), but the largest node of " \
           f"partition 'gpu' has {node.gpus} GPUs" in text
    assert f"rule betas_mask: asks for {node.mem_mb * 2} MB (mem_mb), but the largest node of partition 'cpu'" in text
    assert text.count("threads fitted to the largest node of each partition") == 1
    assert f"reconstruct_decode ({node.cpus + 3} -> {node.cpus}, partition 'gpu')" in text
    assert "CPUs (threads" not in text
    assert "SLURM jobid" not in text  # nothing was submitted
    assert not (work / "results").exists()


