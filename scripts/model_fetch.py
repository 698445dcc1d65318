"""Rule model_fetch: download the configured pipeline (the network is needed), or build the tiny stand-in."""
import json

from braid.common import snakemake_job
from braid.models import build_ssd1b_architecture, build_tiny_sdxl, download

with snakemake_job(snakemake, offline=False):
    model = json.loads(snakemake.params.model)
    if model["source"] == "tiny":
        build_tiny_sdxl(snakemake.output[0], seed=model["seed"])
    elif model["source"] == "ssd1b-architecture":
        build_ssd1b_architecture(snakemake.output[0], seed=model["seed"])
    else:
        download(model["source"], snakemake.output[0], model["revision"], model["variant"], model["vae"],
                 model["vae_revision"])
