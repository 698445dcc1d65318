"""Which device a job runs on, and compilation that falls back instead of failing (braid.device)."""

from __future__ import annotations

import logging

import pytest
import torch

from braid.common import BraidError
from braid.device import allocated_gpus, compile_or_eager, precision, resolve_device

# The variables SLURM 22 sets for a job step given one GPU (srun --gpus=1), as seen on CI's node
SLURM_ONE_GPU = {"SLURM_GPUS_ON_NODE": "1", "SLURM_STEP_GPUS": "0", "CUDA_VISIBLE_DEVICES": "0",
                 "GPU_DEVICE_ORDINAL": "0"}


@pytest.fixture()
def no_cuda(monkeypatch):
    """torch as on a node whose driver is older than torch's CUDA build: no usable GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_the_gpu_a_scheduler_gives_is_recognised():
    assert allocated_gpus(SLURM_ONE_GPU) == SLURM_ONE_GPU
    assert allocated_gpus({"SLURM_JOB_GPUS": "0"}) == {"SLURM_JOB_GPUS": "0"}  # GPU index 0, not "no GPU"
    assert allocated_gpus({"CUDA_VISIBLE_DEVICES": "GPU-5f2c1d9e"}) == {"CUDA_VISIBLE_DEVICES": "GPU-5f2c1d9e"}
    # no GPU: unset, empty, hidden on purpose, or SLURM's "none" values
    for env in ({}, {"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "-1"},
                {"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, {"SLURM_GPUS_ON_NODE": "0"}, {"SLURM_JOB_ID": "12"}):
        assert allocated_gpus(env) == {}, env


def test_a_job_given_a_gpu_it_cannot_use_stops_naming_cuda_and_what_to_do(no_cuda, monkeypatch):
    monkeypatch.setattr("braid.device.driver_version", lambda: "535.104.05")
    with pytest.raises(BraidError) as err:
        resolve_device("auto", environ=SLURM_ONE_GPU)
    text = str(err.value)
    assert "SLURM_STEP_GPUS=0" in text and "SLURM_GPUS_ON_NODE=1" in text and "CUDA_VISIBLE_DEVICES=0" in text
    assert f"CUDA {torch.version.cuda}" in text if torch.version.cuda else "no CUDA" in text
    assert "535.104.05" in text and "requirements-cu12.lock.txt" in text and "on_unusable_gpu: cpu" in text


def test_on_unusable_gpu_cpu_runs_on_the_cpu_with_a_warning(no_cuda, caplog):
    with caplog.at_level(logging.WARNING, logger="braid.device"):
        assert resolve_device("auto", on_unusable_gpu="cpu", environ=SLURM_ONE_GPU) == "cpu"
    assert "Running on the CPU" in caplog.text and "SLURM_STEP_GPUS=0" in caplog.text


def test_a_machine_without_a_gpu_runs_on_the_cpu_warning_on_gpu_rules(no_cuda, caplog):
    with caplog.at_level(logging.WARNING, logger="braid.device"):
        assert resolve_device("auto", gpu_rule=False, environ={}) == "cpu"
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="braid.device"):
        assert resolve_device("auto", gpu_rule=True, environ={}) == "cpu"
    assert "no GPU on this machine" in caplog.text
    assert resolve_device("cpu", environ=SLURM_ONE_GPU) == "cpu"  # asked for: no check, no warning


def test_cuda_devices_are_checked_against_what_torch_sees(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(BraidError, match=r"'cuda:2'.*sees 2 GPU\(s\), cuda:0..cuda:1"):
        resolve_device("cuda:2")
    with pytest.raises(BraidError, match="not auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")


def test_cuda_without_a_usable_gpu_is_refused(no_cuda):
    with pytest.raises(BraidError, match="'cuda:0' was requested.*sees no CUDA GPU"):
        resolve_device("cuda:0", environ={})


def test_precision_is_bf16_autocast_on_cuda_only():
    assert precision("cuda:1", True) == "bfloat16-autocast"
    assert precision("cuda", False) == "float32"
    assert precision("cpu", True) == "float32"


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(failing_compiler, caplog):
    """Inductor compiles with the C++ compiler of $CXX; one that fails (as in an image without gcc)
    makes the compiled call fail: the wrapper warns once and returns the eager result."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.SiLU())
    x = torch.randn(2, 3, 8, 8)
    fn = compile_or_eager(net)
    assert fn.active
    with caplog.at_level(logging.WARNING, logger="braid.device"):
        with torch.no_grad():
            first, second = fn(x), fn(x)
    assert caplog.text.count("torch.compile failed") == 1 and "running eagerly" in caplog.text
    assert not fn.active and fn.fell_back
    with torch.no_grad():
        torch.testing.assert_close(first, net(x), rtol=0, atol=0)
        torch.testing.assert_close(second, net(x), rtol=0, atol=0)


def test_compilation_disabled_is_plain_eager():
    net = torch.nn.Linear(3, 2)
    fn = compile_or_eager(net, enabled=False)
    x = torch.randn(4, 3)
    assert not fn.active and torch.equal(fn(x), net(x))


def test_a_slurm_job_given_a_gpu_torch_cannot_use_stops_and_can_opt_into_the_cpu(slurm_cluster):
    """On a real SLURM (CI's declares one GPU that no torch can use, like a node whose driver is too
    old): a step given --gpus=1 stops with the message; with on_unusable_gpu: cpu it runs on the CPU."""
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("torch here can use a GPU")
    code = "import sys; from braid.device import resolve_device; print(resolve_device('auto', on_unusable_gpu=sys.argv[1]))"
    srun = ["srun", "-p", "gpu", "--gpus=1", "-t", "5", sys.executable, "-c", code]
    failed = subprocess.run([*srun, "fail"], capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0
    assert "this job was given a GPU (" in failed.stderr and "but torch cannot use it" in failed.stderr
    allowed = subprocess.run([*srun, "cpu"], capture_output=True, text=True, timeout=300)
    assert allowed.returncode == 0 and allowed.stdout.strip() == "cpu", allowed.stderr[-2000:]
