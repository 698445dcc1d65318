"""The workflow on small configs of its own: a bad config, a second subject, BRAID as a module of
another workflow, the library a job runs, and the resources the rules declare."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from snakemake_runs import (GPU_RULES, PARALLEL, REPO, SNAKEMAKE, declared_resources, planned_outputs, planned_rules,
                            snakemake)

pytestmark = pytest.mark.integration


BAD_CONFIG = """\
encoder:
  ridge: {kind: ridge}
sessions: [1, 9]
reconstruct:
  strengths: [1.5]
  stepz: 3
roi:
  V1: [1]
split: {train: 0.9, val: 0.1, test: 0.1}
"""


def test_bad_config_stops_before_any_job_naming_every_problem_with_its_line(tmp_path):
    """Six mistakes in one file: all reported in one message before any job, each schema problem
    with the file and line that set it, a near-miss key with its likely meaning."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_CONFIG)
    proc = snakemake(tmp_path / "w", "-n", "--configfile", str(bad), check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "config: 6 problem(s), nothing was run" in text, text[-3000:]
    lines = BAD_CONFIG.splitlines()
    at = {key: lines.index(next(line for line in lines if line.lstrip().startswith(key))) + 1
          for key in ("encoder:", "stepz:", "strengths:")}
    assert f"{bad}:{at['encoder:']}: encoder: not a setting; did you mean 'encoders'?" in text
    assert f"{bad}:{at['stepz:']}: reconstruct.stepz: not a setting of reconstruct; did you mean 'steps'?" in text
    assert f"{bad}:{at['strengths:']}: reconstruct.strengths[0]: 1.5 is above the maximum 1" in text
    assert "sessions [9] exceed synthetic.sessions (4)" in text
    assert "roi ['V1']: no such ROI file" in text and "= 1.1, not 1" in text
    missing = tmp_path / "no-such-mirror"
    proc = snakemake(tmp_path / "w", "-n", "--config", f"nsd={{source: {missing}}}", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"nsd.source: '{missing}' is not a folder" in text, text[-3000:]
    assert not (tmp_path / "w" / "resources").exists()


def test_adding_a_subject_plans_only_its_jobs_and_encodes_only_its_new_images(tmp_path):
    """A finished run of subject 1, then subjects [1, 2]: only subject 2's jobs (and the summary)
    are planned, one latents_encode and one semantic_encode among them, and each encodes only the
    images subject 1 did not see (latents, and text embeddings of their captions)."""
    from scipy.io import loadmat

    small = {
        "synthetic": {"subjects": [1, 2], "sessions": 2, "trials_per_session": 60, "images_per_subject": 40,
                      "shared_images": 10, "extra_images": 2, "volume": [12, 14, 10], "prior_images": 50},
        "sessions": [1, 2],
        "encoders": {"linear": {"hidden": [], "dropout": 0.0, "epochs": 3, "batch_size": 32}},
        "reconstruct": {"strengths": [0.5], "steps": 2, "seeds": [0]},
        "evaluate": {"networks": [], "references": []},  # PixCorr and SSIM, no reference rows: this test is about subjects
        "model": {"source": "tiny"},  # random weights: shapes are all this test needs
        "semantic_encoders": {"ridge": {"kind": "ridge"}},
        "semantic": {"reference": None},
    }
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text(yaml.safe_dump(small))
    two.write_text(yaml.safe_dump({**small, "subjects": [1, 2]}))
    work = tmp_path / "w"
    snakemake(work, *PARALLEL, "--configfile", str(one))
    manifest1 = work / "results" / "subj01" / "latents.json"
    stamp = manifest1.stat().st_mtime_ns
    text1 = work / "results" / "subj01" / "text_embeddings.json"
    text_stamp = text1.stat().st_mtime_ns

    plan = snakemake(work, "-n", "--configfile", str(two))
    outputs = planned_outputs(plan)
    assert outputs and not [o for o in outputs if "subj01" in o], outputs
    assert "subject=subj01" not in plan.stdout
    assert plan.stdout.count("rule latents_encode:") == 1 and plan.stdout.count("rule semantic_encode:") == 1
    assert {"nsd_fetch_stimuli_rows", "betas_mask", "latents_encode", "encoder_train", "evaluate_summary",
            "semantic_encode", "semantic_train"} <= planned_rules(plan)
    assert "captions_fetch" not in planned_rules(plan)  # the caption table covers every NSD image already

    snakemake(work, *PARALLEL, "--configfile", str(two))
    assert manifest1.stat().st_mtime_ns == stamp
    design = loadmat(work / "resources/synthetic_nsd/nsddata/experiments/nsd/nsd_expdesign.mat")
    seen = [set(design["subjectim"][s][design["subjectim"][s] > 0] - 1) for s in (0, 1)]
    second = json.loads((work / "results" / "subj02" / "latents.json").read_text())
    assert second["encoded"] == len(seen[1] - seen[0]) and second["reused"] == len(seen[1] & seen[0]) > 0
    assert second["n_cached"] == len(seen[0] | seen[1]) and set(second["nsd_ids"]) == seen[1]
    assert second["store"] == json.loads(manifest1.read_text())["store"]  # one cache for both subjects
    assert text1.stat().st_mtime_ns == text_stamp
    text2 = json.loads((work / "results" / "subj02" / "text_embeddings.json").read_text())
    assert text2["encoded"] == len(seen[1] - seen[0]) and text2["reused"] == len(seen[1] & seen[0]) > 0
    assert text2["store"] == json.loads(text1.read_text())["store"]
    summary = pd.read_csv(work / "results" / "summary.csv")
    assert (summary["mode"] != "semantic").sum() == 2 * 2  # subjects x the linear's (decode, 0.5)
    assert sorted(summary.loc[summary["mode"] == "semantic", "encoder"]) == ["semantic/oracle (best linear)"] * 2 + \
        ["semantic/ridge"] * 2


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
        "braid_captions_fetch", "braid_metrics_fetch", "braid_nsd_fetch", "braid_nsd_fetch_betas_roi",
        "braid_nsd_fetch_stimuli_rows", "braid_nsd_manifest"]
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
