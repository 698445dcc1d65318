"""Wall time and peak memory of every job of a run, per rule: what the rules' resources should be.

Every rule writes Snakemake's benchmark record, ``logs/benchmark/<rule>/<job>.tsv`` (wall
seconds ``s``, peak resident memory ``max_rss`` in MB of the job's process tree, CPU seconds).
``python -m braid.jobstats [WORKDIR]`` gathers them into ``results/job_resources.csv`` (one row
per rule: jobs, total and longest wall time, largest peak memory) and prints the table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from .common import atomic_output

ROOT = Path("logs") / "benchmark"


def jobs(workdir: str | Path = ".") -> pd.DataFrame:
    """One row per job record: rule, job (its path under the rule), s, max_rss (MB), cpu_time."""
    rows = []
    root = Path(workdir) / ROOT
    for path in sorted(root.glob("*/**/*.tsv")):
        table = pd.read_csv(path, sep="\t")
        if table.empty:
            continue
        last = table.iloc[-1]  # repeats (benchmark: repeat(...)) keep one row each; the last is the run's
        rule = path.relative_to(root).parts[0]
        rows.append({"rule": rule, "job": str(path.relative_to(root / rule).with_suffix("")),
                     "s": float(last["s"]), "max_rss": pd.to_numeric(last.get("max_rss"), errors="coerce"),
                     "cpu_time": pd.to_numeric(last.get("cpu_time"), errors="coerce")})
    return pd.DataFrame(rows, columns=["rule", "job", "s", "max_rss", "cpu_time"])


def by_rule(table: pd.DataFrame) -> pd.DataFrame:
    """Per rule: jobs, total_s, max_s, max_rss_mb (the largest job's), sorted by total time."""
    out = table.groupby("rule").agg(jobs=("job", "size"), total_s=("s", "sum"), max_s=("s", "max"),
                                    max_rss_mb=("max_rss", "max"))
    return out.sort_values("total_s", ascending=False).reset_index()


def main(argv: list[str] | None = None) -> int:
    workdir = Path((argv or sys.argv[1:] or ["."])[0])
    table = by_rule(jobs(workdir))
    if table.empty:
        print(f"no job records under {workdir / ROOT}: run the workflow first", file=sys.stderr)
        return 1
    out = workdir / "results" / "job_resources.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp:
        table.to_csv(tmp, index=False, float_format="%.1f")
    print(table.to_string(index=False, float_format=lambda v: f"{v:,.1f}"))
    print(f"\n{int(table['jobs'].sum())} jobs, {table['total_s'].sum():,.0f} s of wall time in all; written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
