"""Rule evaluate_metrics: latent and image metrics of one subject x encoder x strength, and a grid PNG."""
from braid.common import snakemake_job
from braid.evaluate import evaluate_run

with snakemake_job(snakemake):
    w = snakemake.wildcards
    evaluate_run(snakemake.input, snakemake.output.metrics, snakemake.output.grid, w.subject, w.encoder, float(w.strength))
