"""Rule encoder_train: fit one encoder for one subject and predict its validation and test latents."""
import json

from braid.common import snakemake_job, store_path
from braid.device import device_of
from braid.encoder import train

with snakemake_job(snakemake):
    i, o = snakemake.input, snakemake.output
    train(store_path(i.betas), i.trials, store_path(i.latents), json.loads(snakemake.params.spec), o.model, o.history,
          o.plot, store_path(o.predictions), device=device_of(snakemake.config),
          teacher=i.teacher or None, ncsnr=i.ncsnr or None,
          checkpoint_minutes=snakemake.config["training"]["checkpoint_minutes"])
