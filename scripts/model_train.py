"""Rule model_train: train the tiny SSD-1B-shaped pipeline on the synthetic stimuli and their captions
(see braid.model_training)."""
import json

from braid.common import snakemake_job
from braid.model_training import read_training_captions, train_tiny_sdxl

with snakemake_job(snakemake):
    p, i = snakemake.params, snakemake.input
    captions = read_training_captions(i.stimuli, i.stim_info)
    train_tiny_sdxl(i.stimuli, snakemake.output[0], p.image_size, p.seed, json.loads(p.recipe), captions)
