"""The real Snakemake DAG, end to end on the embedded default (synthetic NSD + tiny model).

Runs `snakemake` as users do, in a fresh working directory, and checks that the planted signal
is recovered, that a second run has nothing to do, that a config change reruns only what it
affects, and that DAG drawing and config errors behave.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]

pytestmark = pytest.mark.integration


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*SNAKEMAKE, "-d", str(workdir), *args], capture_output=True, text=True,
                          env=os.environ | {"PYTHONUNBUFFERED": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {args} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def planned_rules(proc: subprocess.CompletedProcess) -> set[str]:
    """Rule names in the 'Job stats' table of a dry run."""
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return set()
    table = text.split("Job stats:")[1].split("total")[0]
    return {m.group(1) for m in re.finditer(r"^(\w+)\s+\d+\s*$", table, re.M)}


# The rules with many jobs get one thread each, so that two run at once on two cores: their time
# is mostly Python's imports, which one thread does as fast as two. model_train and the other
# single jobs keep their threads. Results agree with a plain run's up to floating point.
PARALLEL = ["--cores", "2", "--set-threads", *(f"{rule}=1" for rule in (
    "encoder_train", "reconstruct_decode", "reconstruct_img2img", "evaluate_stimuli", "evaluate_images"))]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The embedded default (`make demo`'s configuration), run once for this module's tests."""
    workdir = tmp_path_factory.mktemp("braid")
    snakemake(workdir, *PARALLEL)
    return workdir


def test_outputs_and_planted_signal_recovered(run):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    summary = pd.read_csv(run / "results" / "summary.csv")
    sources = [*config["encoders"], "true-latent", "mean-latent"]
    strengths, seeds = config["reconstruct"]["strengths"], config["reconstruct"]["seeds"]
    assert len(summary) == len(sources) * (1 + len(strengths)) * len(config["subjects"])  # decode-only + each strength
    assert (summary["weights"] == "synthetic-trained (not a result)").all()  # the tiny model: never a result
    assert (summary["metric_weights"] == "random (not comparable)").all()  # random metric networks: stamped
    img2img = summary[summary["mode"] == "img2img"]
    assert sorted(img2img["strength"].unique()) == sorted(strengths) and (img2img["n_seeds"] == len(seeds)).all()
    assert summary.loc[summary["mode"] == "decode", "strength"].isna().all()
    oracle = pd.read_csv(run / "results" / "subj01" / "oracle_metrics.csv").iloc[0]
    assert oracle["n_test_trials"] == summary["n_test_trials"].iloc[0]  # scored on the same test rows
    assert 0.6 < oracle["latent_r"] < 0.95  # not inflated by a prior that contains the test images
    chance = 1 / summary["retrieval_pool"].iloc[0]
    for row in summary.itertuples():
        assert 0 <= row.ssim <= 1 and -1 <= row.pixcorr <= 1
        assert row.n_test_images >= 15 and row.n_test_trials >= 3 * 15 - 5
        for metric in ("alexnet2", "alexnet5", "efficientnet", "swav"):  # the demo's networks, every row
            assert np.isfinite(getattr(row, metric)), (metric, row)
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
    assert len(per_image) == len(sources) * (1 + len(strengths) * len(seeds)) * n_images  # every run, every image
    one = per_image[(per_image["encoder"] == "ridge") & (per_image["strength"] == strengths[0])]
    row = summary[(summary["encoder"] == "ridge") & (summary["strength"] == strengths[0])].iloc[0]
    assert row["ssim"] == pytest.approx(one["ssim"].mean())  # the summary is the mean of the per-image rows
    for path in ["results/summary.png", "results/subj01/mlp/loss.png", "results/subj01/grid-strength-0.3.png"]:
        assert (run / path).read_bytes()[:4] == b"\x89PNG", path
    page = (run / "results" / "summary.html").read_text()
    assert "Published (not computed here)" in page and "NOT COMPARABLE" in page
    assert "weights are synthetic-trained, not pretrained: NOT A RESULT" in page
    for source in sources:
        for folder in ("decode", *(f"strength-{s:g}/seed-{k}" for s in strengths for k in seeds)):
            images = list((run / "results" / "subj01" / source / folder / "images").glob("*.png"))
            assert len(images) == n_images, (source, folder)
    joined = pd.read_csv(run / "results" / "frontier_metrics.csv")
    assert set(joined.loc[joined["pixcorr"].notna(), "encoder"]) == set(config["encoders"])  # reconstructed ones
    assert len(joined) == 12 + 4 * (1 + len(strengths)) + 1  # sweep once, named ones per run, the baseline
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

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
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

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
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


def test_every_job_leaves_its_wall_time_and_peak_memory(run):
    """Snakemake's benchmark record per job (logs/benchmark/<rule>/...), gathered per rule by braid.jobstats."""
    from braid import jobstats

    table = jobstats.by_rule(jobstats.jobs(run)).set_index("rule")
    for rule in ("betas_mask", "latents_encode", "encoder_train", "reconstruct_img2img", "evaluate_images",
                 "model_train", "nsd_fetch_betas_roi", "evaluate_summary"):
        assert table.loc[rule, "jobs"] >= 1 and table.loc[rule, "total_s"] > 0, rule
    # a job that loads torch and a model holds well over 100 MB; the records are of the job, not of snakemake
    assert table.loc["encoder_train", "max_rss_mb"] > 100
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    runs = 1 + len(config["reconstruct"]["strengths"]) * len(config["reconstruct"]["seeds"])
    assert table.loc["evaluate_images", "jobs"] == runs * (len(config["encoders"]) + 2) * len(config["subjects"])


def test_second_run_has_nothing_to_do(run):
    proc = snakemake(run, "-n")
    assert planned_rules(proc) == set(), proc.stdout[-3000:]


# the ROI-only and row-only fetches (whose files BRAID lays out) and their manifest; whole-object
# downloads (nsd_fetch) are the source's bytes and rerun on their key and source alone
FETCH_RULES = {"nsd_fetch_betas_roi", "nsd_fetch_stimuli_rows", "nsd_manifest"}


def plan_after_edit(run: Path, module: str) -> subprocess.CompletedProcess:
    """A dry run of the finished ``run`` as Snakemake sees it after an edit of src/braid/<module>
    (the file made newer than every output), the file's time put back afterwards."""
    path = REPO / "src" / "braid" / module
    before = path.stat()
    try:
        os.utime(path, ns=(before.st_atime_ns, time.time_ns()))
        return snakemake(run, "-n")
    finally:
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
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["reconstruct"]["steps"] = 12
    changed = tmp_path / "steps.yaml"
    changed.write_text(yaml.safe_dump(config))
    assert planned_rules(snakemake(run, "-n", "--configfile", str(changed))) == {
        "reconstruct_img2img", "evaluate_images", "evaluate_grid", "evaluate_summary", "all"}  # not decode-only
    config["reconstruct"]["steps"] = 10
    config["reconstruct"]["seeds"] = [0, 1, 2]  # one more seed: its runs only (the grids show the first seed)
    changed.write_text(yaml.safe_dump(config))
    plan = snakemake(run, "-n", "--configfile", str(changed))
    assert planned_rules(plan) == {"reconstruct_img2img", "evaluate_images", "evaluate_summary", "all"}
    assert set(re.findall(r"seed-(\d+)/images", plan.stdout)) == {"2"}
    config["reconstruct"]["seeds"] = [0, 1]
    config["evaluate"]["networks"] = [*config["evaluate"]["networks"], "inception"]  # one more metric network
    changed.write_text(yaml.safe_dump(config))
    plan = snakemake(run, "-n", "--configfile", str(changed))
    assert planned_rules(plan) == {"metrics_fetch", "evaluate_stimuli", "evaluate_images", "evaluate_summary", "all"}
    assert plan.stdout.count("rule metrics_fetch:") == 1 and "random-seed0/inception" in plan.stdout
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
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
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["model"]["train"] = {"unet_steps": 900}
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
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
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
    override = tmp_path / "roi.yaml"
    override.write_text(yaml.safe_dump({"roi": {"prf-visualrois": [1, 2]}, "encoders": {"tiny": {"hidden": [8]}}}))
    plan = snakemake(work, "-n", "--configfile", str(override))
    assert "encoder_train" in planned_rules(plan) and "encoder=tiny" in plan.stdout
    assert "encoder=mlp" not in plan.stdout and "encoder=linear" not in plan.stdout
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


def test_bad_config_stops_before_any_job(tmp_path):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["sessions"] = [1, 9]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path / "w", "-n", "--configfile", str(bad), check=False)
    assert proc.returncode != 0 and "sessions [9] exceed synthetic.sessions (4)" in proc.stdout + proc.stderr
    config["reconstruct"]["strengths"] = [0.05]
    config["sessions"] = [1]
    bad.write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path / "w", "-n", "--configfile", str(bad), check=False)
    assert proc.returncode != 0 and "reconstruct.strengths 0.05 with reconstruct.steps 10" in proc.stdout + proc.stderr
    config["reconstruct"]["strengths"] = [1.5]
    bad.write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path / "w", "-n", "--configfile", str(bad), check=False)
    assert proc.returncode != 0 and "strengths" in proc.stdout + proc.stderr and "1.5" in proc.stdout + proc.stderr
    config["reconstruct"]["strengths"] = [0.5]
    config["roi"] = {"V1": [1]}  # a name NSD does not have, and a split over 1: both named, before any job
    config["split"].update(train=0.9, val=0.1, test=0.1)
    bad.write_text(yaml.safe_dump(config))
    proc = snakemake(tmp_path / "w", "-n", "--configfile", str(bad), check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "roi ['V1']: no such ROI file" in text and "= 1.1, not 1" in text
    assert not (tmp_path / "w" / "resources").exists()


def planned_outputs(proc: subprocess.CompletedProcess) -> list[str]:
    """The output lines of every job in a dry run."""
    return [line.split("output:", 1)[1] for line in proc.stdout.splitlines() if line.strip().startswith("output:")]


def test_adding_a_subject_plans_only_its_jobs_and_encodes_only_its_new_images(tmp_path):
    """A finished run of subject 1, then subjects [1, 2]: only subject 2's jobs (and the summary)
    are planned, one latents_encode among them, and it encodes only the images subject 1 did not see."""
    from scipy.io import loadmat

    small = {
        "synthetic": {"subjects": [1, 2], "sessions": 2, "trials_per_session": 60, "images_per_subject": 40,
                      "shared_images": 10, "extra_images": 2, "volume": [12, 14, 10], "prior_images": 50},
        "sessions": [1, 2],
        "encoders": {"linear": {"hidden": [], "dropout": 0.0, "epochs": 3, "batch_size": 32}},
        "reconstruct": {"strengths": [0.5], "steps": 2, "seeds": [0]},
        "evaluate": {"networks": []},  # PixCorr and SSIM only: this test is about subjects
        "model": {"source": "tiny"},  # random weights: shapes are all this test needs
    }
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text(yaml.safe_dump(small))
    two.write_text(yaml.safe_dump({**small, "subjects": [1, 2]}))
    work = tmp_path / "w"
    snakemake(work, *PARALLEL, "--configfile", str(one))
    manifest1 = work / "results" / "subj01" / "latents.json"
    stamp = manifest1.stat().st_mtime_ns

    plan = snakemake(work, "-n", "--configfile", str(two))
    outputs = planned_outputs(plan)
    assert outputs and not [o for o in outputs if "subj01" in o], outputs
    assert "subject=subj01" not in plan.stdout
    assert plan.stdout.count("rule latents_encode:") == 1
    assert {"nsd_fetch_stimuli_rows", "betas_mask", "latents_encode", "encoder_train", "evaluate_summary"} <= planned_rules(plan)

    snakemake(work, *PARALLEL, "--configfile", str(two))
    assert manifest1.stat().st_mtime_ns == stamp
    design = loadmat(work / "resources/synthetic_nsd/nsddata/experiments/nsd/nsd_expdesign.mat")
    seen = [set(design["subjectim"][s][design["subjectim"][s] > 0] - 1) for s in (0, 1)]
    second = json.loads((work / "results" / "subj02" / "latents.json").read_text())
    assert second["encoded"] == len(seen[1] - seen[0]) and second["reused"] == len(seen[1] & seen[0]) > 0
    assert second["n_cached"] == len(seen[0] | seen[1]) and set(second["nsd_ids"]) == seen[1]
    assert second["store"] == json.loads(manifest1.read_text())["store"]  # one cache for both subjects
    assert len(pd.read_csv(work / "results" / "summary.csv")) == 2 * 3 * 2  # subjects x (linear + 2 references) x (decode, 0.5)


def test_braid_works_as_a_module_of_another_workflow(tmp_path):
    """`module braid: snakefile: <path>` + `use rule * from braid as braid_*` from another folder: the
    DAG builds, the fetch rules stay local rules, and a job runs BRAID's script with its library."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "Snakefile").write_text(f"""import json
from pathlib import Path

configfile: "{REPO / 'config' / 'config.yaml'}"

module braid:
    snakefile: "{REPO / 'Snakefile'}"
    config: config

use rule * from braid as braid_*

Path("local_rules.json").write_text(json.dumps(sorted(r.name for r in workflow.rules if r.name in workflow._localrules)))
""")
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(host / "Snakefile"), "-d", str(work), "-n"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "braid_encoder_train" in proc.stdout and "braid_evaluate_summary" in proc.stdout
    assert json.loads((work / "local_rules.json").read_text()) == [
        "braid_metrics_fetch", "braid_nsd_fetch", "braid_nsd_fetch_betas_roi", "braid_nsd_fetch_stimuli_rows",
        "braid_nsd_manifest"]
    target = "resources/synthetic_nsd/nsddata/experiments/nsd/nsd_expdesign.mat"
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(host / "Snakefile"), "-d", str(work),
                           "--cores", "1", target], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / target).is_file() and (work / "logs" / "nsd" / "synthetic_stimuli.log").is_file()


def test_jobs_run_the_library_of_the_workflow_that_schedules_them(tmp_path):
    """An environment whose braid is another copy (first on PYTHONPATH here; an editable install
    of another clone behaves alike): that copy fails on import, so the job succeeds only if it
    runs this workflow's own src/braid, the code Snakemake tracks."""
    other = tmp_path / "other"
    (other / "braid").mkdir(parents=True)
    (other / "braid" / "__init__.py").write_text("raise ImportError('the braid of another copy was imported')\n")
    target = "resources/synthetic_nsd/nsddata/experiments/nsd/nsd_expdesign.mat"
    proc = subprocess.run([*SNAKEMAKE, "-d", str(tmp_path / "w"), "--cores", "1", target], capture_output=True,
                          text=True, env=os.environ | {"PYTHONPATH": str(other)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "w" / target).is_file()


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
GPU_RULES = {"latents_encode", "encoder_train", "reconstruct_decode", "reconstruct_img2img", "evaluate_stimuli",
             "evaluate_images"}


def with_fetched(run: Path, work: Path) -> Path:
    """A working directory holding what `run` fetched and built under resources/ (data, model,
    metric weights), with Snakemake's records of it: only the results are left to compute."""
    for part in ("resources", ".snakemake/metadata"):
        shutil.copytree(run / part, work / part)
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
    run of the default (same data, model, seeds and thread counts)."""
    cluster = with_fetched(run, tmp_path / "cluster")
    proc = snakemake(cluster, "--profile", str(REPO / "profiles" / "slurm"), "--configfile", str(SLURM_SMALL),
                     *PARALLEL[2:], "--max-threads", "2")
    run_id = re.search(r"SLURM run ID: (\S+)", proc.stdout + proc.stderr).group(1)
    jobs = slurm_jobs(run_id)
    rules = {re.match(r"rule_(.+?)(?:_wildcards_|$)", j["Comment"]).group(1) for j in jobs}  # summary: no wildcards
    assert rules == GPU_RULES | {"betas_mask", "latents_statistics", "encoder_reference", "encoder_frontier",
                                 "evaluate_grid", "evaluate_oracle", "evaluate_summary"}
    assert all(j["State"] == "COMPLETED" for j in jobs), jobs
    for job in jobs:
        gpu_rule = any(job["Comment"].startswith(f"rule_{r}_wildcards_") for r in GPU_RULES)
        assert (job["Partition"], "gpu:1" in job["tres-per-job"]) == (("gpu", True) if gpu_rule else ("cpu", False)), job
    key = ["encoder", "mode", "strength", "seed", "nsd_id"]
    on_slurm = pd.read_parquet(cluster / "results" / "metrics_per_image.parquet").sort_values(key)
    local = pd.read_parquet(run / "results" / "metrics_per_image.parquet")
    local = local.merge(on_slurm[key], on=key).sort_values(key)  # the same runs in the default's
    assert len(on_slurm) == len(local) == 3 * 2 * on_slurm["nsd_id"].nunique() > 0  # ridge + 2 references, decode + 0.3
    scores = [c for c in on_slurm.columns if c not in key and pd.api.types.is_float_dtype(on_slurm[c])]
    assert {"pixcorr", "ssim", "alexnet2", "swav"} <= set(scores)
    for column in scores:
        np.testing.assert_allclose(on_slurm[column].to_numpy(), local[column].to_numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=column)


def test_a_job_no_node_can_run_stops_the_run_before_submission(run, tmp_path, slurm_cluster):
    """profiles/slurm with two impossible requests added (a test profile beside it): the run
    stops before submitting anything, naming each rule and resource."""
    from braid.slurm import cluster_partitions

    node = cluster_partitions()["gpu"]
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    profile["set-threads"] = {"encoder_train": node.cpus + 1}
    profile["set-resources"]["betas_mask"] = {"mem_mb": node.mem_mb * 2}
    (tmp_path / "profile").mkdir()
    (tmp_path / "profile" / "config.yaml").write_text(yaml.safe_dump(profile))
    work = with_fetched(run, tmp_path / "w")
    proc = snakemake(work, "--profile", str(tmp_path / "profile"), "--configfile", str(SLURM_SMALL), check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"rule encoder_train: asks for {node.cpus + 1} CPUs (threads / cpus_per_task), but the largest node of " \
           f"partition 'gpu' has {node.cpus} CPUs" in text
    assert f"rule betas_mask: asks for {node.mem_mb * 2} MB (mem_mb), but the largest node of partition 'cpu'" in text
    assert "SLURM jobid" not in text  # nothing was submitted
    assert not (work / "results").exists()


def declared_resources(proc: subprocess.CompletedProcess) -> dict[str, dict]:
    """rule -> {threads, and each resource}, from a dry run's job blocks (first job of each rule)."""
    found: dict[str, dict] = {}
    for block in re.split(r"\n(?=\[.*\]\n)|\n\n", proc.stdout + proc.stderr):
        m = re.search(r"^(?:localrule|rule) (\w+):", block, re.M)
        if not m or m.group(1) in found:
            continue
        entry = {"threads": 1}
        t = re.search(r"^\s+threads: (\d+)", block, re.M)
        if t:
            entry["threads"] = int(t.group(1))
        r = re.search(r"^\s+resources: (.*)$", block, re.M)
        if r:
            entry.update(kv.split("=", 1) for kv in r.group(1).split(", "))
        found[m.group(1)] = entry
    return found


def test_rules_declare_threads_memory_and_a_gpu_for_the_gpu_rules(tmp_path):
    rules = declared_resources(snakemake(tmp_path, "-n", "--cores", "64"))
    for rule in GPU_RULES:
        assert rules[rule]["gpu"] == "1", (rule, rules[rule])
        assert rules[rule]["threads"] >= 4 and int(rules[rule]["mem_mb"]) >= 1024 and int(rules[rule]["runtime"]) > 0
    for rule, entry in rules.items():
        if rule not in GPU_RULES:
            assert "gpu" not in entry, (rule, entry)
    assert rules["betas_mask"]["threads"] == 2 and int(rules["betas_mask"]["mem_mb"]) >= 1024
    # device: cpu asks for no GPU anywhere
    rules = declared_resources(snakemake(tmp_path, "-n", "--cores", "64", "--config", "device=cpu"))
    assert {entry.get("gpu", "0") for entry in rules.values()} == {"0"}
    # --max-threads caps every rule, as it does on a cluster
    rules = declared_resources(snakemake(tmp_path, "-n", "--cores", "64", "--max-threads", "2"))
    assert max(entry["threads"] for entry in rules.values()) == 2
