"""braid.common: what every job does before its work (the library it runs)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from braid.common import BraidError, check_library

REPO = Path(__file__).resolve().parents[1]


def test_a_job_of_this_workflow_accepts_this_library():
    check_library(REPO / "src" / "braid")


def test_a_job_that_imported_another_copy_of_braid_is_refused_naming_both(tmp_path):
    """An environment whose braid is another clone's (here: a copy on PYTHONPATH): the job stops
    before its work, naming the copy it imported and the workflow's own."""
    other = tmp_path / "other" / "src"
    shutil.copytree(REPO / "src" / "braid", other / "braid", ignore=shutil.ignore_patterns("__pycache__"))
    code = f"from braid.common import check_library; check_library({str(REPO / 'src' / 'braid')!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(other)})
    assert proc.returncode != 0
    assert f"imported braid from {other / 'braid'}" in proc.stderr
    assert f"the workflow that scheduled it is {REPO / 'src' / 'braid'}" in proc.stderr


def test_check_library_compares_resolved_folders(tmp_path):
    link = tmp_path / "braid"
    link.symlink_to(REPO / "src" / "braid")
    check_library(link)  # the same folder by another name
    with pytest.raises(BraidError, match="does not track"):
        check_library(tmp_path)


def test_pythonpath_first_puts_the_folder_first_once(monkeypatch):
    from braid.common import pythonpath_first

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/a", "/w/src", "", "/b"]))
    pythonpath_first("/w/src")
    assert os.environ["PYTHONPATH"].split(os.pathsep) == ["/w/src", "/a", "/b"]
    monkeypatch.delenv("PYTHONPATH")
    pythonpath_first("/w/src")
    assert os.environ["PYTHONPATH"] == "/w/src"


JOB = """
import sys
from types import SimpleNamespace
from braid.common import BraidError, output_lock, snakemake_job

job = SimpleNamespace(log=["job.log"], rule="betas_mask", wildcards={}, attempt=1, threads=1,
                      output=["results/subj01/betas.zarr/zarr.json", "results/subj01/trials.parquet"],
                      scriptdir=sys.argv[1])
with snakemake_job(job):
    import os
    assert os.environ["BRAID_RULE"] == "betas_mask"
    try:
        with output_lock(["results/subj01/trials.parquet", "results/subj01/betas.zarr/zarr.json"], "betas_mask"):
            pass
    except BraidError as err:
        print("refused:", err)
    raise BraidError("results/x.zarr is damaged: rebuild it")
"""


def test_a_job_holds_its_outputs_and_ends_a_braid_error_as_one_message(tmp_path):
    """Inside a job a second writer of its outputs is refused; a BraidError ends the job with
    exit status 1 and its message, logged, without a traceback."""
    scripts = str(Path(__file__).resolve().parents[1] / "scripts")
    proc = subprocess.run([sys.executable, "-c", JOB, scripts], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1
    assert re.search(r"refused: results/subj01/betas.zarr/zarr.json \(and 1 more outputs\) is being written by "
                     r"another job of rule betas_mask: PID \d+ on host ", proc.stdout), proc.stdout
    assert "Traceback" not in proc.stderr and "results/x.zarr is damaged: rebuild it" in proc.stderr
    assert "results/x.zarr is damaged: rebuild it" in (tmp_path / "job.log").read_text()
    assert list((tmp_path / ".braid" / "locks").glob("betas_mask-*.lock"))
