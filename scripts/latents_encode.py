"""Rule latents_encode: add a subject's stimuli to the shared latent cache; write the subject's manifest."""
import json

import numpy as np

from braid.common import resolve_device, snakemake_job, subject_number
from braid.latents import update_cache, write_manifest
from braid.nsd import ExpDesign

with snakemake_job(snakemake):
    p = snakemake.params
    design = ExpDesign.load(snakemake.input.expdesign)
    ids = design.subjectim[subject_number(snakemake.wildcards.subject) - 1]
    ids = ids[ids > 0] - 1  # 1-based 73k ids -> 0-based nsd ids; 0 = no image
    model = snakemake.config["model"]
    result = update_cache(
        snakemake.input.stimuli,
        snakemake.input.model,
        ids,
        p.store,
        identity=json.loads(p.identity),
        image_size=p.image_size,
        device=resolve_device(snakemake.config["device"]),
        dtype=p.dtype,
        batch_size=model["latent_batch_size"],
        variant=p.variant,
        compile=model["compile"],
    )
    write_manifest(snakemake.output[0], result, ids)
