"""The real Snakemake DAG, end to end on the embedded default (synthetic NSD + tiny model).

Runs `snakemake` as users do, in a fresh working directory, and checks that the planted signal
is recovered, that a second run has nothing to do, that a config change reruns only what it
affects, and that DAG drawing and config errors behave.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

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


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("braid")
    snakemake(workdir, "--cores", "2")
    return workdir


def test_outputs_and_planted_signal_recovered(run):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    summary = pd.read_csv(run / "results" / "summary.csv")
    n = len(config["encoders"]) * len(config["reconstruct"]["strengths"]) * len(config["subjects"])
    assert len(summary) == n
    meta = json.loads((run / "resources" / "synthetic_nsd" / "braid_synthetic.json").read_text())
    ceiling = meta["subjects"]["subj01"]
    for row in summary.itertuples():
        # far above chance (r 0, 2-way 0.5) and near the ideal decoder at this noise level
        assert row.latent_r > 0.55 * ceiling["ceiling_latent_r"], row
        assert row.latent_two_way > 0.9, row
        assert row.ceiling_latent_r == pytest.approx(ceiling["ceiling_latent_r"])
        assert 0 <= row.ssim <= 1 and -1 <= row.pixcorr <= 1
        assert row.n_test_images >= 15 and row.n_test_trials >= 3 * 15 - 5
    params = summary.groupby("encoder")["n_parameters"].first()
    assert params["linear"] < params["mlp"]
    for path in ["results/summary.png", "results/subj01/mlp/loss.png", "results/subj01/mlp/strength-0.3/grid.png"]:
        assert (run / path).read_bytes()[:4] == b"\x89PNG", path
    images = list((run / "results/subj01/mlp/strength-0.7/images").glob("*.png"))
    assert len(images) == summary["n_test_images"].iloc[0]
    assert (run / "logs" / "subj01" / "mlp" / "train.log").read_text().count("parameters") >= 1
    assert not list(run.glob("results/**/.tmp-*"))


def test_second_run_has_nothing_to_do(run):
    proc = snakemake(run, "-n")
    assert planned_rules(proc) == set(), proc.stdout[-3000:]


def test_config_change_reruns_only_what_it_affects(run, tmp_path):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["reconstruct"]["steps"] = 12
    changed = tmp_path / "steps.yaml"
    changed.write_text(yaml.safe_dump(config))
    assert planned_rules(snakemake(run, "-n", "--configfile", str(changed))) == {
        "reconstruct_img2img", "evaluate_metrics", "evaluate_summary", "all"}
    config["encoders"]["linear"]["epochs"] = 5
    changed.write_text(yaml.safe_dump(config))
    assert planned_rules(snakemake(run, "-n", "--configfile", str(changed))) == {
        "encoder_train", "reconstruct_img2img", "evaluate_metrics", "evaluate_summary", "all"}
    # reordering keys changes nothing
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["encoders"]["mlp"] = dict(reversed(list(config["encoders"]["mlp"].items())))
    changed.write_text(yaml.safe_dump(config, sort_keys=False))
    assert planned_rules(snakemake(run, "-n", "--configfile", str(changed))) == set()


def test_dag_is_clean_dot(run):
    proc = snakemake(run, "--rulegraph")
    assert proc.stdout.startswith("digraph") and proc.stdout.rstrip().endswith("}")
    for rule in ("nsd_fetch", "betas_mask", "latents_encode", "encoder_train", "reconstruct_img2img", "evaluate_metrics"):
        assert rule in proc.stdout
    assert snakemake(run, "--dag").stdout.startswith("digraph")


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
