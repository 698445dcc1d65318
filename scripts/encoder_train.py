"""Rule encoder_train: train one encoder for one subject and predict its test latents."""
import json

from braid.common import resolve_device, snakemake_job, store_path
from braid.encoder import train

with snakemake_job(snakemake):
    i, o = snakemake.input, snakemake.output
    train(store_path(i.betas), i.trials, store_path(i.latents), json.loads(snakemake.params.hp), o.model, o.history,
          o.plot, store_path(o.predictions), device=resolve_device(snakemake.config["device"]))
