"""Rule encoder_reference: predictions of a reference row (true-latent or mean-latent)."""
from braid.common import snakemake_job, store_path
from braid.encoder import write_reference_predictions

with snakemake_job(snakemake):
    write_reference_predictions(snakemake.wildcards.encoder, snakemake.input.trials, store_path(snakemake.input.latents),
                                store_path(snakemake.output.predictions))
