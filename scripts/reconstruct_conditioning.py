"""Rule reconstruct_conditioning: the text embeddings of one semantic conditioning (braid.conditioning)."""
import json

from braid.common import snakemake_job, store_path
from braid.conditioning import write_conditioning
from braid.device import device_of

with snakemake_job(snakemake):
    i, settings = snakemake.input, json.loads(snakemake.params.settings)
    write_conditioning(
        snakemake.wildcards.conditioning,
        store_path(snakemake.output.store),
        snakemake.output.captions,
        trials_path=i.trials,
        cache_path=i.cache,
        captions_path=i.captions,
        predictions_path=store_path(i.predictions) if "predictions" in i.keys() else None,
        bank_path=store_path(i.bank) if "bank" in i.keys() else None,
        model_dir=i.model if "model" in i.keys() else None,
        device=device_of(snakemake.config),
        dtype=settings.get("dtype", "float32"),
        variant=settings.get("variant"),
        batch_size=snakemake.config["semantic"]["text_batch_size"],
    )
