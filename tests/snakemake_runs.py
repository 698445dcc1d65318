"""Running the real Snakemake DAG from the tests, as users do, and reading its plans."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]
# a working folder holding this file is run with it as its first config layer (the `run` fixture's)
RUN_LAYER = "test-layer.yaml"


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`snakemake -d workdir args`; in the `run` fixture's folder, its config layer comes first."""
    args = list(args)
    if (workdir / RUN_LAYER).exists():
        at = args.index("--configfile") + 1 if "--configfile" in args else len(args)
        args[at:at] = [*(["--configfile"] if at == len(args) else []), str(workdir / RUN_LAYER)]
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


# The demo's profile (profiles/demo): the rules with many jobs get one thread each, so that two run
# at once on two cores: their time is mostly Python's imports, which one thread does as fast as
# two. model_train and the other single jobs keep their threads. Results agree with a plain run's
# up to floating point.
DEMO_THREADS = yaml.safe_load((REPO / "profiles" / "demo" / "config.yaml").read_text())["set-threads"]
PARALLEL = ["--cores", "2", "--set-threads", *(f"{rule}={n}" for rule, n in DEMO_THREADS.items())]
# the rules that use a GPU (they declare gpu=1)
GPU_RULES = {"latents_encode", "semantic_encode", "semantic_train", "encoder_train", "reconstruct_decode",
             "reconstruct_conditioning", "reconstruct_img2img", "evaluate_stimuli",
             "evaluate_images"}


def planned_outputs(proc: subprocess.CompletedProcess) -> list[str]:
    """The output lines of every job in a dry run."""
    return [line.split("output:", 1)[1] for line in proc.stdout.splitlines() if line.strip().startswith("output:")]


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
