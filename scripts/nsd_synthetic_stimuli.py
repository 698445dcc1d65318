"""Rule nsd_synthetic_stimuli: the synthetic mirror's stimuli, design and stimulus info (see braid.synthetic)."""
import json

from braid.common import snakemake_job
from braid.synthetic import STIMULUS_KEYS, generate_stimuli

with snakemake_job(snakemake):
    root = str(snakemake.output[-1])[: -len(STIMULUS_KEYS[-1])]  # outputs follow STIMULUS_KEYS: the root is the prefix
    generate_stimuli(json.loads(snakemake.params.cfg), root)
