"""Rule encoder_frontier: one subject's encoders, quality against parameter count, Pareto front marked."""
from braid.common import snakemake_job, store_path
from braid.frontier import write

with snakemake_job(snakemake):
    i, o, p = snakemake.input, snakemake.output, snakemake.params
    predictions = {name: store_path(path) for name, path in zip(p.encoders, i.predictions, strict=True)}
    write(snakemake.wildcards.subject, predictions, store_path(i.latents), p.reference, o.table, o.plot)
