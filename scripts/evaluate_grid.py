"""Rule evaluate_grid: one subject's stimuli and every row's reconstructions at one strength."""
from pathlib import Path

from braid.common import snakemake_job, store_path
from braid.evaluate import evaluate_grid
from braid.latents import LatentCache

with snakemake_job(snakemake):
    i = snakemake.input
    dirs = {tuple(key.split("|")): path for key, path in i.items() if "|" in key}
    paths = [i.captions] if isinstance(i.captions, str) else list(i.captions)
    captions = {Path(path).stem: path for path in paths}
    evaluate_grid(snakemake.wildcards.subject, snakemake.wildcards.strength, int(snakemake.params.seed), dirs,
                  i.stimuli, i.trials, snakemake.output[0], weights=LatentCache(store_path(i.latents)).weights,
                  captions=captions, guidance=snakemake.params.guidance)
