"""Rule evaluate_stimuli: network features of one subject's test stimuli."""
from pathlib import Path

from braid.common import snakemake_job, store_path
from braid.device import device_of
from braid.evaluate import stimulus_features

with snakemake_job(snakemake):
    i = snakemake.input
    stimulus_features(i.stimuli, i.trials, {Path(w).name: w for w in i.weights}, store_path(snakemake.output[0]),
                      device=device_of(snakemake.config),
                      batch_size=snakemake.config["evaluate"]["batch_size"], stim_info_path=i.stim_info)
