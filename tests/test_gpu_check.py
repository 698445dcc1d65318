"""`make gpu-check` in its CPU mode: every step of the GPU check runs BRAID's code at tiny sizes, so
the check a user runs on a GPU node before spending GPU hours cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from braid import gpu_check

REPO = Path(__file__).resolve().parents[1]


def run_check(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run([sys.executable, "-m", "braid.gpu_check", "--cpu", "--out", str(out), *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=900)


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    return out, run_check(out, "--timeout-scale", "3")  # a slow or busy CI machine


def test_every_step_passes_on_the_cpu_and_writes_the_table(cpu_check):
    out, proc = cpu_check
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    assert [s["step"] for s in report["steps"]] == list(gpu_check.STEPS)
    assert all(s["status"] == "ok" for s in report["steps"]), report["steps"]
    table = (out / "gpu-check.md").read_text()
    for step in gpu_check.STEPS:
        assert f"| {step} | ok |" in table
    assert table in proc.stdout  # printed as well
    assert all((out / f"{step}.log").is_file() for step in gpu_check.STEPS)


def test_the_figures_say_what_the_goals_need(cpu_check):
    out, _ = cpu_check
    steps = {s["step"]: s.get("figures", {}) for s in json.loads((out / "gpu-check.json").read_text())["steps"]}
    env = steps["environment"]
    assert env["device"] == "cpu" and env["torch"] and "compiler" in env and "driver" in env
    lat = steps["latents"]
    assert lat["images"] == gpu_check.TINY["latent_images"] and lat["dtype"] == "bfloat16"
    for key in ("eager_images_per_s", "compiled_first_images_per_s", "compiled_warm_images_per_s",
                "naive_images_per_s", "compile_overhead_s", "compile_pays_at_subject"):
        assert key in lat, key
    assert steps["mlp"]["parameters"] == 64 * 32 + 32 + 2 * 32 + 32 * 64 + 64 + 2 * 64 + 64 * 256 + 256
    assert steps["ridge"]["alphas"] == 19 and steps["ridge"]["s"] >= 0
    assert steps["resume"]["bit_identical"] is True and steps["resume"]["adam_steps_on_host"] is True
    img = steps["img2img"]["bfloat16"]
    assert img["finite"] is True and img["png_hashes_equal"] is True and img["s_per_step"] > 0
    assert steps["metrics"]["networks"] == ["alexnet", "inception", "clip", "efficientnet", "swav"]


def test_a_step_that_fails_or_hangs_does_not_hide_the_others(tmp_path):
    """Every step under a limit it cannot meet: each is stopped and reported, the table and the JSON
    are still written, and the exit code says that the check failed."""
    proc = run_check(tmp_path, "--only", "environment", "ridge", "--timeout-scale", "0.001")
    assert proc.returncode == 1
    steps = json.loads((tmp_path / "gpu-check.json").read_text())["steps"]
    assert [s["step"] for s in steps] == ["environment", "ridge"]
    assert all(s["status"] == "failed" and "timed out" in s["error"] for s in steps), steps
    assert "| ridge | failed |" in (tmp_path / "gpu-check.md").read_text()


def test_the_table_shows_each_figure_and_each_error():
    results = [{"step": "mlp", "status": "ok", "wall_s": 3.0, "figures": {"epochs_per_s": 7.5, "peak_gb": None}},
               {"step": "img2img", "status": "ok", "wall_s": 9.0, "figures": {"float16": {"images_per_s": 12.0}}},
               {"step": "ridge", "status": "failed", "wall_s": 1.0, "error": "RuntimeError: out of memory"}]
    lines = gpu_check.table(results, cpu=False).splitlines()
    assert "| mlp | ok | 3.0 | epochs_per_s | 7.5 |" in lines and "| | | | peak_gb | None |" in lines
    assert "| img2img | ok | 9.0 | float16.images_per_s | 12.0 |" in lines
    assert "| ridge | failed | 1.0 | error | RuntimeError: out of memory |" in lines
    assert lines[0].endswith("(GPU, real sizes)")


def test_make_gpu_check_runs_this_module():
    makefile = (REPO / "Makefile").read_text()
    assert "gpu-check: $(STAMP)\n\t$(BIN)/python -m braid.gpu_check $(ARGS)" in makefile


def test_without_a_gpu_the_gpu_mode_refuses_and_points_to_the_cpu_mode(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, "-m", "braid.gpu_check", "--out", str(tmp_path)], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "sees no GPU" in proc.stderr and "--cpu" in proc.stderr
    assert not (tmp_path / "gpu-check.json").exists()
