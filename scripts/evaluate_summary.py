"""Rule evaluate_summary: one table and one figure over all runs (with the synthetic oracle, where known)."""
from braid.common import snakemake_job
from braid.evaluate import summarise

with snakemake_job(snakemake):
    summarise(list(snakemake.input.metrics), snakemake.output.table, snakemake.output.plot, list(snakemake.input.oracle))
