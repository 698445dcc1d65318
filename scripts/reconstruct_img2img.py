"""Rule reconstruct_img2img: img2img reconstructions of the test images in one conditioning, at one
guidance scale, strength and seed."""
import json

from braid.common import snakemake_job, store_path
from braid.device import device_of
from braid.reconstruct import reconstruct

with snakemake_job(snakemake):
    reconstruct(
        store_path(snakemake.input.predictions),
        snakemake.input.model,
        snakemake.output[0],
        strength=float(snakemake.wildcards.strength),
        seed=int(snakemake.wildcards.seed),
        params=json.loads(snakemake.params.settings),
        device=device_of(snakemake.config),
        batch_size=snakemake.config["reconstruct"]["batch_size"],
        guidance_scale=float(snakemake.wildcards.guidance),
        conditioning_path=store_path(snakemake.input.conditioning) if snakemake.input.conditioning else None,
    )
