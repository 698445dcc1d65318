"""Check a run's outputs and print what would repair them: ``python -m braid.verify [WORKDIR]``.

Every Zarr store under ``WORKDIR/results`` is read chunk by chunk against its checksums, and every
folder of images against its manifest (:mod:`braid.integrity`). Damage is listed with the rule
that wrote each output, followed by the one command that rebuilds exactly those outputs
(``snakemake --forcerun <their output files>``; Snakemake then reruns what reads them). Exit
status 0: all outputs verified; 1: damage found (the repair printed); 2: no results folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .integrity import (MANIFEST, SHARED_CACHE_RULES, folder_damage, folder_rule, store_checksummed, store_damage,
                        store_rule)


@dataclass
class Damaged:
    path: Path  # relative to the working directory
    problems: list[str]
    rule: str | None
    target: str  # what --forcerun names: a store's zarr.json, a folder output itself


def find_outputs(workdir: Path) -> tuple[list[Path], list[Path]]:
    """The Zarr stores (folders ``*.zarr`` with a root ``zarr.json``) and the folders with a
    manifest (or that should have one: every ``images`` folder) under ``workdir/results``."""
    results = workdir / "results"
    stores = sorted(p.parent for p in results.rglob("zarr.json") if p.parent.suffix == ".zarr"
                    and not any(q.suffix == ".zarr" for q in p.parent.parents))
    folders = {p.parent for p in results.rglob(MANIFEST)} | {p for p in results.rglob("images") if p.is_dir()}
    hidden = [p for p in folders if any(part.startswith(".tmp-") for part in p.relative_to(results).parts)]
    return stores, sorted(folders - set(hidden))


def _resource_damage(workdir: Path) -> list[Damaged]:
    """The models and metric weights under ``resources/`` against their manifests (files and sizes)."""
    from .common import BraidError
    from .metric_networks import check as check_weights
    from .models import check_model

    found = []
    checks = [(p, "model_fetch or model_train", check_model) for p in sorted((workdir / "resources" / "models").glob("*"))]
    checks += [(p, "metrics_fetch", lambda f: check_weights(f, f.name))
               for p in sorted((workdir / "resources" / "metric_weights").glob("*/*"))]
    for folder, rule, check_folder in checks:
        if not folder.is_dir() or folder.name.startswith(".tmp-"):
            continue
        try:
            check_folder(folder)
        except BraidError as err:
            rel = folder.relative_to(workdir)
            found.append(Damaged(rel, [str(err).split(": ", 1)[-1].split("; ")[0]], rule, str(rel)))
    return found


def check(workdir: str | os.PathLike = ".") -> tuple[list[Damaged], dict]:
    """Damaged outputs under ``workdir``, and counts of what was checked."""
    workdir = Path(workdir)
    stores, folders = find_outputs(workdir)
    damaged = _resource_damage(workdir)
    unchecked = [s for s in stores if not store_checksummed(s)]
    for store in stores:
        problems = store_damage(store)
        if problems:
            rel = store.relative_to(workdir)
            damaged.append(Damaged(rel, problems, store_rule(store), str(rel / "zarr.json")))
    for folder in folders:
        problems = folder_damage(folder)
        if problems:
            rel = folder.relative_to(workdir)
            damaged.append(Damaged(rel, problems, folder_rule(folder), str(rel)))
    return damaged, {"stores": len(stores), "folders": len(folders), "unchecked": unchecked}


def repair_commands(damaged: list[Damaged]) -> list[str]:
    """The commands that rebuild ``damaged``: one ``snakemake --forcerun`` of their targets; a
    damaged shared cache (latents, text embeddings) is removed first and rebuilt by the rule that
    fills it, for every subject."""
    caches = [d for d in damaged if d.rule in SHARED_CACHE_RULES]
    targets = [d.target for d in damaged if d.rule not in SHARED_CACHE_RULES]
    targets += sorted({d.rule for d in caches})
    commands = [f"rm -r {d.path}" for d in caches]
    if targets:
        commands.append("snakemake --forcerun " + " ".join(targets))
    return commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m braid.verify", description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", default=".", help="the run's working directory (default: here)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    if not (workdir / "results").is_dir():
        print(f"{workdir / 'results'}: no results folder; give the run's working directory", file=sys.stderr)
        return 2
    damaged, counts = check(workdir)
    for store in counts["unchecked"]:
        print(f"note: {store.relative_to(workdir)} has no chunk checksums (written by an older BRAID): only its "
              "metadata and chunk reads were checked; rerun its rule to add them")
    if not damaged:
        print(f"all outputs verified: {counts['stores']} Zarr stores (every chunk against its checksum), "
              f"{counts['folders']} folders (every file against its manifest)")
        return 0
    print(f"{len(damaged)} damaged output(s) of {counts['stores'] + counts['folders']} checked:")
    for d in damaged:
        more = f" (and {len(d.problems) - 1} more)" if len(d.problems) > 1 else ""
        print(f"  {d.path}: {d.problems[0]}{more}; written by rule {d.rule or '?'}")
    print("Repair (from the run's working directory, with the options of the run; Snakemake then reruns "
          "every job that reads these outputs):")
    for command in repair_commands(damaged):
        print(f"  {command}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
