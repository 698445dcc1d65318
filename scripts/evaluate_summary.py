"""Rule evaluate_summary: one table and one figure over all runs."""
import json

from braid.common import snakemake_job
from braid.evaluate import summarise

with snakemake_job(snakemake):
    ceiling = None
    if snakemake.input.ceiling:
        ceiling = json.load(open(snakemake.input.ceiling[0]))["subjects"]
    summarise(list(snakemake.input.metrics), snakemake.output.table, snakemake.output.plot, ceiling)
