"""Rule model_fetch: download the configured pipeline, or build the tiny stand-in offline."""
import json

from braid.common import snakemake_job
from braid.models import build_tiny_sdxl, download

with snakemake_job(snakemake):
    model = json.loads(snakemake.params.model)
    if model["source"] == "tiny":
        build_tiny_sdxl(snakemake.output[0], seed=model["seed"])
    else:
        download(model["source"], snakemake.output[0], model["revision"], model["variant"])
