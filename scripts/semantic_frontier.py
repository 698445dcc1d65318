"""Rule semantic_frontier: a subject's semantic encoders scored in embedding space, their retrieved
captions, and the semantic frontier."""
from braid.common import snakemake_job, store_path
from braid.semantic import write_frontier

with snakemake_job(snakemake):
    i, o, p = snakemake.input, snakemake.output, snakemake.params
    predictions = {name: store_path(path) for name, path in zip(p.encoders, i.predictions)}
    write_frontier(snakemake.wildcards.subject, predictions, i.embeddings, i.trials, i.stim_info,
                   store_path(i.bank), o.table, o.plot, o.retrieved,
                   oracle=store_path(i.oracle[0]) if i.oracle else None, reference=p.reference)
