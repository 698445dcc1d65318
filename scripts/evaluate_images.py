"""Rule evaluate_images: every metric of one run (decode-only, or img2img in one conditioning at one
guidance scale, strength and seed), per test image."""
import json
from pathlib import Path

from braid.common import snakemake_job, store_path
from braid.device import device_of
from braid.evaluate import evaluate_images, read_category_pool

with snakemake_job(snakemake):
    i, w = snakemake.input, snakemake.wildcards
    retrieval = json.loads(snakemake.params.retrieval)
    evaluate_images(i.images, store_path(i.predictions), store_path(i.latents), i.stimuli, store_path(i.features),
                    {Path(p).name: p for p in i.weights}, snakemake.output[0], w.subject, w.encoder, w.run,
                    pool=retrieval["pool"], draws=retrieval["draws"], device=device_of(snakemake.config),
                    batch_size=snakemake.config["evaluate"]["batch_size"],
                    conditioning_path=store_path(i.conditioning) if i.conditioning else None,
                    categories=read_category_pool(store_path(i.features)))
