"""Benchmark: how long `snakemake -n` takes to build the DAG of the real experiment at NSD's full scale.

    .venv/bin/python benchmarks/dryrun_dag.py [--repeats 3]

Each case is `snakemake -n` with `config/nsd_ssd1b.yaml` plus an override, in an empty working
directory (nothing fetched: every job is planned), timed from the command's start to its end
(Python start-up and Snakemake's import included, as a user waits for them):

  one        subject 1, session 1                                                 <- baseline
  nsd-8x30   NSD from S3: all 8 subjects, sessions 1-30 (what every subject has)
  nsd-4x40   NSD from S3: subjects 1, 2, 5 and 7 (the ones with 40 sessions), sessions 1-40
  syn-8x40   the synthetic NSD at the same scale: 8 subjects x 40 sessions of 750 trials

No network is used: fetch jobs are planned, not run. Prints each case's jobs, median seconds and
the ratio to the baseline. The goal: under 10 s for the full-scale DAGs.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

CASES = {
    "one": {"subjects": [1], "sessions": [1]},
    "nsd-8x30": {"subjects": list(range(1, 9)), "sessions": list(range(1, 31))},
    "nsd-4x40": {"subjects": [1, 2, 5, 7], "sessions": list(range(1, 41))},
    "syn-8x40": {
        "nsd": {"source": "synthetic"},
        "subjects": list(range(1, 9)),
        "sessions": list(range(1, 41)),
        "synthetic": {"subjects": list(range(1, 9)), "sessions": 40, "trials_per_session": 750,
                      "images_per_subject": 10000, "shared_images": 1000, "extra_images": 0},
    },
}


def dry_run(override: dict, tmp: Path) -> tuple[float, int]:
    """Seconds of one `snakemake -n`, and the number of jobs it planned."""
    path = tmp / "override.yaml"
    path.write_text(yaml.safe_dump(override))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp / "work"), "-n",
           "--configfile", str(REPO / "config" / "nsd_ssd1b.yaml"), str(path)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"snakemake -n failed for {override}:\n{proc.stderr[-3000:]}")
    jobs = int(re.search(r"^total\s+(\d+)\s*$", proc.stdout + proc.stderr, re.M).group(1))
    return seconds, jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    results = {}
    for name, override in CASES.items():
        times = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                seconds, jobs = dry_run(override, Path(tmp))
            times.append(seconds)
        results[name] = (jobs, statistics.median(times))
        print(f"{name:10s} {jobs:6d} jobs  {results[name][1]:6.2f} s (median of {args.repeats})", flush=True)
    base = results["one"][1]
    print(f"\nratio to the baseline ({base:.2f} s for {results['one'][0]} jobs):")
    for name, (jobs, seconds) in results.items():
        goal = "" if name == "one" else ("  goal < 10 s: met" if seconds < 10 else "  goal < 10 s: NOT met")
        print(f"  {name:10s} {seconds / base:5.2f}x  ({1000 * (seconds - base) / max(jobs - results['one'][0], 1):.2f} "
              f"ms per added job){goal}")


if __name__ == "__main__":
    main()
