"""Rule evaluate_metrics: latent and image metrics of one subject x encoder x strength, and a grid PNG."""
from braid.common import snakemake_job, store_path
from braid.evaluate import evaluate_run

with snakemake_job(snakemake):
    i, w = snakemake.input, snakemake.wildcards
    evaluate_run(store_path(i.predictions), store_path(i.latents), i.stimuli, i.images, snakemake.output.metrics,
                 snakemake.output.grid, w.subject, w.encoder, float(w.strength))
