"""Rule nsd_fetch: one NSD object from S3 or a local mirror into resources/nsd/<key>."""
from braid.common import snakemake_job
from braid.transfer import fetch

with snakemake_job(snakemake):
    p = snakemake.params
    fetch(p.source, snakemake.wildcards.key, snakemake.output[0], **p.s3)
