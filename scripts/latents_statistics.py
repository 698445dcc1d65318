"""Rule latents_statistics: mean/std of a subject's training images' latents (per element and channel)."""
from braid.common import snakemake_job, store_path
from braid.latents import latent_statistics

with snakemake_job(snakemake):
    i, o = snakemake.input, snakemake.output
    latent_statistics(i.latents, i.trials, store_path(o.stats), o.plot)
