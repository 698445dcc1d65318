"""Rule reconstruct_decode: the predicted latents of the test images through the VAE decoder alone."""
import json

from braid.common import snakemake_job, store_path
from braid.device import device_of
from braid.reconstruct import decode

with snakemake_job(snakemake):
    decode(
        store_path(snakemake.input.predictions),
        snakemake.input.model,
        snakemake.output[0],
        params=json.loads(snakemake.params.settings),
        device=device_of(snakemake.config),
        batch_size=snakemake.config["reconstruct"]["batch_size"],
    )
