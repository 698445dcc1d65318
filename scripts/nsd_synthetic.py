"""Rule nsd_synthetic: plant the signal in the model's latents of the synthetic stimuli (see braid.synthetic)."""
import json

from braid.common import snakemake_job
from braid.synthetic import META, generate_betas

with snakemake_job(snakemake):
    p = snakemake.params
    root = str(snakemake.output.meta)[: -len(META)]  # the mirror's root: where the meta file sits
    generate_betas(json.loads(p.cfg), snakemake.input.model, root, p.image_size, p.resolution, p.beta_version)
