"""Rule nsd_synthetic: write the synthetic NSD mirror (see braid.synthetic)."""
import json

from braid.common import snakemake_job
from braid.synthetic import META, generate

with snakemake_job(snakemake):
    p = snakemake.params
    root = str(snakemake.output.meta)[: -len(META)]  # the mirror's root: where the meta file sits
    generate(json.loads(p.cfg), snakemake.input.model, root, p.image_size, p.resolution, p.beta_version)
