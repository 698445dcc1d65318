"""Rule model_train: train the tiny SSD-1B-shaped pipeline on the synthetic stimuli (see braid.model_training)."""
import json

from braid.common import snakemake_job
from braid.model_training import train_tiny_sdxl

with snakemake_job(snakemake):
    p = snakemake.params
    train_tiny_sdxl(snakemake.input.stimuli, snakemake.output[0], p.image_size, p.seed, json.loads(p.recipe))
