"""Rule latents_encode: add a subject's stimuli to the shared latent cache; write the subject's manifest."""
import json


from braid.common import snakemake_job, subject_number
from braid.device import device_of
from braid.latents import update_cache, write_manifest
from braid.nsd import ExpDesign

with snakemake_job(snakemake):
    p = snakemake.params
    design = ExpDesign.load(snakemake.input.expdesign)
    # 0-based nsd ids of the images the subject's configured trials show
    ids = design.shown_ids(subject_number(snakemake.wildcards.subject), **json.loads(p.shown))
    model = snakemake.config["model"]
    result = update_cache(
        snakemake.input.stimuli,
        snakemake.input.model,
        ids,
        p.store,
        identity=json.loads(p.identity),
        image_size=p.image_size,
        device=device_of(snakemake.config),
        dtype=p.dtype,
        batch_size=model["latent_batch_size"],
        variant=p.variant,
        compile=model["compile"],
    )
    write_manifest(snakemake.output[0], result, ids)
