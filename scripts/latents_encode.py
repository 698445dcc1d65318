"""Rule latents_encode: cache the VAE latents of every stimulus the subjects were scheduled to see."""
import json

import numpy as np

from braid.common import resolve_device, snakemake_job, store_path
from braid.latents import cache_latents
from braid.nsd import ExpDesign

with snakemake_job(snakemake):
    model = json.loads(snakemake.params.model)
    design = ExpDesign.load(snakemake.input.expdesign)
    ids = np.concatenate([design.subjectim[s - 1] for s in snakemake.params.subjects])
    cache_latents(
        snakemake.input.stimuli,
        snakemake.input.model,
        ids[ids > 0] - 1,  # 1-based 73k ids -> 0-based nsd ids; 0 = no image
        store_path(snakemake.output[0]),
        image_size=model["image_size"],
        device=resolve_device(snakemake.config["device"]),
        dtype=model["dtype"],
        batch_size=snakemake.config["model"]["latent_batch_size"],
        variant=model["variant"],
    )
