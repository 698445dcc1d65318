"""Rule evaluate_summary: every run's per-image metrics, aggregated over images and seeds; figures; the papers' table."""
from braid.common import snakemake_job
from braid.evaluate import summarise

with snakemake_job(snakemake):
    i, o = snakemake.input, snakemake.output
    summarise(list(i.per_image), o.table, o.per_image, o.plot, o.html, list(i.oracle), list(i.frontier), o.frontier,
              list(i.semantic), o.frontier_images, snakemake.params.reference)
