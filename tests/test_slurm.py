"""Jobs SLURM can never start (braid.slurm): parsing SLURM's own output, the checks, and, on a real
SLURM (.ci/slurm_up.sh), the watchdog cancelling a job that SLURM leaves pending for ever.

The workflow through profiles/slurm is tested end to end in tests/test_workflow.py."""

from __future__ import annotations

import subprocess
import time
from types import SimpleNamespace

import pytest

from braid import slurm
from braid.common import BraidError

# `sinfo -h -N -o '%P|%c|%m|%G'` of a cluster with two CPU node sizes and one GPU node type
SINFO = """\
cpu*|32|190000|(null)
cpu*|64|380000|(null)
gpu|16|250000|gpu:a100:4(S:0-1)
gpu|16|250000|gpu:a100:4(S:0-1)
"""


def test_sinfo_gives_each_partitions_largest_node():
    parts = slurm.parse_sinfo(SINFO)
    assert parts == {
        "cpu": slurm.Partition("cpu", cpus=64, mem_mb=380000, gpus=0, default=True),
        "gpu": slurm.Partition("gpu", cpus=16, mem_mb=250000, gpus=4, default=False),
    }


def test_a_job_that_fits_has_no_problem():
    parts = slurm.parse_sinfo(SINFO)
    assert slurm.problems("encoder_train", {"slurm_partition": "gpu", "cpus": 16, "mem_mb": 250000, "gpus": 4},
                          parts) == []
    # no partition: the default one
    assert slurm.problems("betas_mask", {"slurm_partition": None, "cpus": 64, "mem_mb": 1000, "gpus": None},
                          parts) == []


@pytest.mark.parametrize("request_, words", [
    ({"slurm_partition": "gpu", "cpus": 17, "mem_mb": 1, "gpus": 1}, ["encoder_train", "17 CPUs", "threads", "has 16 CPUs", "'gpu'"]),
    ({"slurm_partition": "gpu", "cpus": 1, "mem_mb": 250001, "gpus": 1}, ["encoder_train", "250001 MB (mem_mb)", "has 250000 MB"]),
    ({"slurm_partition": "gpu", "cpus": 1, "mem_mb": 1, "gpus": 5}, ["encoder_train", "5 GPUs (gpu)", "has 4 GPUs"]),
    ({"slurm_partition": None, "cpus": 1, "mem_mb": 1, "gpus": 1}, ["encoder_train", "1 GPUs", "'cpu'", "has 0 GPUs"]),
    ({"slurm_partition": "gpus", "cpus": 1, "mem_mb": 1, "gpus": 1}, ["encoder_train", "'gpus'", "does not exist",
                                                                       "cpu, gpu"]),
])
def test_a_job_no_node_can_run_is_named_with_its_resource(request_, words):
    found = slurm.problems("encoder_train", request_, slurm.parse_sinfo(SINFO))
    assert len(found) == 1
    for word in words:
        assert word in found[0]


def fake_job(rule, threads, **res):
    return SimpleNamespace(rule=SimpleNamespace(name=rule), threads=threads, resources=res)


def test_preflight_lists_every_impossible_job_once():
    parts = slurm.parse_sinfo(SINFO)
    jobs = [fake_job("betas_mask", 2, mem_mb=4000, slurm_partition="cpu"),
            fake_job("encoder_train", 32, mem_mb=4000, gpu=1, slurm_partition="gpu"),
            fake_job("encoder_train", 32, mem_mb=4000, gpu=1, slurm_partition="gpu"),
            fake_job("latents_encode", 4, mem_mb=900000, gpu=1, slurm_partition="gpu")]
    with pytest.raises(BraidError) as err:
        slurm.preflight(jobs, parts)
    text = str(err.value)
    assert text.count("rule encoder_train: asks for 32 CPUs") == 1
    assert "rule latents_encode: asks for 900000 MB (mem_mb)" in text
    assert "betas_mask" not in text
    assert "set-resources" in text  # says what to do
    # memory that is only an estimate (inputs not written yet) is left to SLURM
    slurm.preflight(jobs[3:], parts, check_memory=lambda job: False)
    # cpus_per_task, where a profile sets it, is what is submitted
    with pytest.raises(BraidError, match="asks for 20 CPUs"):
        slurm.preflight([fake_job("evaluate_images", 2, cpus_per_task=20, slurm_partition="gpu")], parts)


def test_threads_are_fitted_to_the_largest_node_of_each_partition():
    parts = slurm.parse_sinfo(SINFO)
    jobs = [fake_job("encoder_train", 32, slurm_partition="gpu"),  # gpu nodes have 16 CPUs
            fake_job("encoder_train", 24, slurm_partition="gpu"),
            fake_job("betas_mask", 48),  # the default partition cpu: 64 fit
            fake_job("model_train", 80),
            fake_job("evaluate_images", 20, cpus_per_task=20, slurm_partition="gpu")]  # submitted as asked
    fits = slurm.fit_threads(jobs, parts)
    assert fits == {"encoder_train": (32, 16, "gpu"), "model_train": (80, 64, "cpu")}
    message = slurm.fit_message(fits)
    assert "encoder_train (32 -> 16, partition 'gpu')" in message and "model_train (80 -> 64" in message
    assert "set-threads" in message
    assert slurm.fit_threads([fake_job("x", 8, slurm_partition="nowhere")], parts) == {}  # named by preflight
    # a rule whose jobs go to two partitions gets what fits the smaller node
    mixed = slurm.fit_threads([fake_job("y", 80, slurm_partition="cpu"), fake_job("y", 32, slurm_partition="gpu")], parts)
    assert mixed["y"][:2] == (80, 16)


SQUEUE = """\
41|rule_encoder_train_wildcards_subj01_mlp|PartitionConfig|gpu|32|30000M|gres:gpu:1|N/A|/scratch/run|
42|rule_betas_mask_wildcards_subj01|Resources|cpu|2|2G|N/A|N/A|/scratch/run|
43|rule_latents_encode_wildcards_subj01|ReqNodeNotAvail, Reserved for maintenance|gpu|4|8G|N/A|gres:gpu:1|/scratch/run|
44|my own job|PartitionConfig|cpu|999|1G|N/A|N/A|/scratch/run|
"""


def test_squeue_lines_are_parsed_and_hopeless_ones_found():
    jobs = slurm.parse_squeue(SQUEUE)
    assert [j.job_id for j in jobs] == ["41", "42", "43", "44"]
    assert (jobs[0].rule, jobs[0].wildcards, jobs[0].cpus, jobs[0].mem_mb, jobs[0].gpus) == (
        "encoder_train", "subj01_mlp", 32, 30000, 1)
    assert jobs[1].mem_mb == 2048 and jobs[1].gpus == 0
    assert jobs[2].gpus == 1
    # waiting for resources is normal; a user's own non-Snakemake job is not ours to cancel
    assert [j.job_id for j in jobs if slurm.never_starts(j)] == ["41", "43"]
    msg = slurm.explain(jobs[0], slurm.parse_sinfo(SINFO))
    for word in ("41", "rule encoder_train", "subj01_mlp", "PartitionConfig", "32 CPUs", "has 16 CPUs", "Cancelled"):
        assert word in msg


# ---- on a real SLURM -------------------------------------------------------------------------

def test_watchdog_cancels_a_job_slurm_never_starts_and_leaves_others(slurm_cluster, tmp_path):
    parts = slurm.cluster_partitions()
    too_many = max(p.cpus for p in parts.values()) + 1

    def submit(comment, cpus):
        out = subprocess.run(["sbatch", "--parsable", "-D", str(tmp_path), "-c", str(cpus), "--mem", "50",
                              "-o", "/dev/null", "--comment", comment, "--wrap", "sleep 30"],
                             capture_output=True, text=True, check=True).stdout
        return out.strip().split(";")[0]

    hopeless = submit("rule_encoder_train_wildcards_subj01_mlp", too_many)
    fine = submit("rule_betas_mask_wildcards_subj01", 1)
    try:
        dog = slurm.Watchdog(tmp_path, report=lambda m: None)
        for _ in range(30):  # SLURM sets the pending reason at its next scheduling pass
            dog.poll()
            if dog.suspects:
                break
            time.sleep(1)
        assert dog.suspects == {hopeless} and dog.messages == []  # seen once: not cancelled yet
        dog.poll()
        assert len(dog.messages) == 1, dog.messages
        assert f"SLURM job {hopeless} of rule encoder_train (subj01_mlp)" in dog.messages[0]
        assert f"{too_many} CPUs" in dog.messages[0]
        state = subprocess.run(["squeue", "-h", "-t", "all", "-j", hopeless, "-o", "%T"], capture_output=True,
                               text=True).stdout.strip()
        assert state in ("CANCELLED", ""), state
        state = subprocess.run(["squeue", "-h", "-j", fine, "-o", "%T"], capture_output=True, text=True).stdout.strip()
        assert state in ("PENDING", "RUNNING", "COMPLETING"), state
    finally:
        subprocess.run(["scancel", hopeless, fine], capture_output=True)
