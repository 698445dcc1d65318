"""Rule semantic_bank: the subject's retrieval bank (captions of images never in its test split)."""
from braid.common import snakemake_job, store_path
from braid.semantic import build_bank

with snakemake_job(snakemake):
    i = snakemake.input
    build_bank(i.embeddings, i.captions, i.trials, snakemake.params.mode, store_path(snakemake.output[0]))
