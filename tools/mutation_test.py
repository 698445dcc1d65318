#!/usr/bin/env python
"""Mutation testing of BRAID's library: change one thing at a time, run the tests, count the kills.

A mutant is the module with exactly one change (an operator swapped, a number moved, a flag
flipped, a keyword argument dropped). It is *killed* when the module's tests fail (or time
out) and *survives* when they pass: a survivor is a change in behaviour that no test can see.

    .venv/bin/python tools/mutation_test.py evaluate latents --jobs 2
    .venv/bin/python tools/mutation_test.py betas --list          # the mutants, not run

Each mutant runs in its own copy of the repository (``git ls-files``), with ``PYTHONPATH``
pointing at the copy's ``src`` so that the editable install of the checkout is not used.
Only the unit tests named in ``TESTS`` run (``-x``: the first failure kills); the integration
test (the whole DAG) is left out for time. Code that cannot be checked by a test of values
(log calls, docstrings, error-message text, plotting layout) is not mutated: see ``SKIP``.
Results go to ``results/mutation/mutation-<module>.csv`` (one row per mutant; ``--out`` to change)
and a summary is printed.
"""

from __future__ import annotations

import argparse
import ast
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TESTS = {
    "evaluate": ["tests/test_evaluate.py"],
    "scores": ["tests/test_evaluate.py", "tests/test_encoder.py", "tests/test_synthetic.py"],
    "metric_networks": ["tests/test_metric_networks.py"],
    "latents": ["tests/test_latents.py"],
    "model_training": ["tests/test_model_training.py"],
    "reconstruct": ["tests/test_reconstruct.py"],
    "encoder": ["tests/test_encoder.py", "tests/test_frontier.py"],
    "frontier": ["tests/test_frontier.py"],
    "betas": ["tests/test_betas.py"],
    "synthetic": ["tests/test_synthetic.py"],
}
# functions whose body is figure layout (sizes, fonts, colours): no test of values can see them
SKIP = {"plot_history", "save_grid", "plot_metrics", "plot", "html_table"}
LOG_NAMES = {"log", "logging", "warnings", "logger", "bar", "tqdm"}

SWAP = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
    ast.Pow: ast.Mult, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn,
    ast.NotIn: ast.In, ast.And: ast.Or, ast.Or: ast.And,
}


def _skipped_nodes(tree: ast.AST) -> set[int]:
    """ids of nodes inside docstrings, log/warning calls, raised messages and SKIP functions."""
    skip: set[int] = set()

    def mark(node):
        skip.update(id(n) for n in ast.walk(node))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in SKIP:
            mark(node)
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            mark(node)  # docstrings
        elif isinstance(node, ast.Call):
            f = node.func
            base = f.value if isinstance(f, ast.Attribute) else f
            if isinstance(base, ast.Name) and base.id in LOG_NAMES:
                mark(node)
        elif isinstance(node, ast.Raise) and node.exc is not None:
            for arg in getattr(node.exc, "args", []):
                mark(arg)  # the message text
        elif isinstance(node, ast.JoinedStr):
            mark(node)
    return skip


def candidates(tree: ast.AST) -> list[tuple[int, str, callable]]:
    """Every single change, as (line, description, apply(node_copy)) in source order."""
    skip = _skipped_nodes(tree)
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        line = getattr(node, "lineno", 0)
        if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in SWAP:
            new = SWAP[type(node.op)]
            out.append((line, f"{type(node.op).__name__} -> {new.__name__}", (node, "op", new())))
        elif isinstance(node, ast.BoolOp):
            new = SWAP[type(node.op)]
            out.append((line, f"{type(node.op).__name__} -> {new.__name__}", (node, "op", new())))
        elif isinstance(node, ast.Compare):
            for k, op in enumerate(node.ops):
                if type(op) in SWAP:
                    ops = list(node.ops)
                    ops[k] = SWAP[type(op)]()
                    out.append((line, f"{type(op).__name__} -> {type(ops[k]).__name__}", (node, "ops", ops)))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            out.append((line, f"drop {type(node.op).__name__}", (node, "__replace__", node.operand)))
        elif isinstance(node, ast.Constant) and not isinstance(node.value, str) and node.value is not None:
            v = node.value
            if isinstance(v, bool):
                new = not v
            elif isinstance(v, int):
                new = v + 1
            elif isinstance(v, float):
                new = 1.0 if v == 0 else v * 2
            else:
                continue
            out.append((line, f"{v!r} -> {new!r}", (node, "value", new)))
        elif isinstance(node, ast.Call):
            for k, kw in enumerate(node.keywords):
                if kw.arg is not None and id(kw) not in skip:
                    kws = node.keywords[:k] + node.keywords[k + 1 :]
                    out.append((line, f"drop keyword {kw.arg}=", (node, "keywords", kws)))
    out.sort(key=lambda c: c[0])
    return out


def mutant_source(source: str, index: int) -> tuple[str, int, str]:
    """The module source with change ``index`` applied."""
    tree = ast.parse(source)
    line, desc, (node, attr, value) = candidates(tree)[index]
    if attr == "__replace__":
        # replace ``node`` by ``value`` in its parent
        for parent in ast.walk(tree):
            for field, child in ast.iter_fields(parent):
                if child is node:
                    setattr(parent, field, value)
                elif isinstance(child, list) and any(c is node for c in child):
                    setattr(parent, field, [value if c is node else c for c in child])
    else:
        setattr(node, attr, value)
    return ast.unparse(ast.fix_missing_locations(tree)), line, desc


def copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dest / f, follow_symlinks=False)  # scripts/braid stays a link


def run_tests(workdir: Path, tests: list[str], timeout: float, extra: tuple[str, ...] = ()) -> tuple[str, float]:
    env = os.environ | {"PYTHONPATH": str(workdir / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *extra, *tests],
                              cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
        status = "survived" if proc.returncode == 0 else "killed"
    except subprocess.TimeoutExpired:
        status = "killed (timeout)"
    return status, time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modules", nargs="+", choices=sorted(TESTS))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--list", action="store_true", help="print the mutants and stop")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "mutation", help="folder for mutation-<module>.csv")
    ap.add_argument("--timeout-factor", type=float, default=3.0)
    ap.add_argument("--deselect", action="append", default=[], help="a test id to leave out (pytest --deselect)")
    ap.add_argument("--only", type=Path, metavar="DIR",
                    help="run again only the mutants that DIR/mutation-<module>.csv says survived (same source)")
    args = ap.parse_args()

    for module in args.modules:
        path = REPO / "src" / "braid" / f"{module}.py"
        source = path.read_text()
        n = len(candidates(ast.parse(source)))
        if args.list:
            for i in range(n):
                _, line, desc = mutant_source(source, i)
                print(f"{module}:{line}: {desc}")
            continue
        tests = TESTS[module]
        indices = list(range(n))
        if args.only:
            with open(args.only / f"mutation-{module}.csv") as f:
                indices = [int(r["index"]) for r in csv.DictReader(f) if r["status"] == "survived"]
        with tempfile.TemporaryDirectory(prefix=f"mut-{module}-") as tmp:
            workers = [Path(tmp) / f"w{k}" for k in range(args.jobs)]
            for w in workers:
                copy_repo(w)
            extra = tuple(f"--deselect={t}" for t in args.deselect)
            status, base = run_tests(workers[0], tests, timeout=1800, extra=extra)
            if status != "survived":
                sys.exit(f"{module}: the tests fail without any mutation; fix them first")
            timeout = max(60.0, args.timeout_factor * base)
            free = list(workers)

            def one(i):
                w = free.pop()
                try:
                    code, line, desc = mutant_source(source, i)
                    (w / "src" / "braid" / f"{module}.py").write_text(code)
                    status, secs = run_tests(w, tests, timeout, extra)
                    print(f"  [{i + 1}/{n}] {module}:{line} {desc}: {status} ({secs:.0f} s)", flush=True)
                    return {"module": module, "index": i, "line": line, "mutation": desc, "status": status}
                finally:
                    (w / "src" / "braid" / f"{module}.py").write_text(source)
                    free.append(w)

            print(f"{module}: {len(indices)} of {n} mutants, tests {' '.join(tests)} ({base:.0f} s unmutated)", flush=True)
            with ThreadPoolExecutor(args.jobs) as pool:
                rows = list(pool.map(one, indices))
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / f"mutation-{module}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["module", "index", "line", "mutation", "status"])
            writer.writeheader()
            writer.writerows(rows)
        killed = sum(r["status"].startswith("killed") for r in rows)
        print(f"{module}: killed {killed}/{len(rows)} = {killed / max(len(rows), 1):.0%}")
        for r in rows:
            if r["status"] == "survived":
                print(f"  survived: {module}.py:{r['line']} {r['mutation']}")


if __name__ == "__main__":
    main()
