"""Rule nsd_synthetic: write the synthetic NSD mirror (see braid.synthetic)."""
import json

from braid.common import snakemake_job
from braid.synthetic import generate

with snakemake_job(snakemake):
    p = snakemake.params
    generate(json.loads(p.cfg), snakemake.input.model, p.root, p.image_size, p.resolution, p.beta_version)
