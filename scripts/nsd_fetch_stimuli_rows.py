"""Rule nsd_fetch_stimuli_rows: the imgBrick rows the configured subjects need, plus a manifest entry."""
import json

import numpy as np

from braid.common import atomic_output, snakemake_job
from braid.nsd import STIMULI, ExpDesign, fetch_stimuli_rows

with snakemake_job(snakemake):
    p = snakemake.params
    design = ExpDesign.load(snakemake.input.expdesign)
    ids = np.concatenate([design.subjectim[s - 1] for s in p.subjects])
    entry = fetch_stimuli_rows(p.source, STIMULI, snakemake.output.stimuli, ids[ids > 0] - 1, **p.s3)
    with atomic_output(snakemake.output.manifest) as tmp:
        tmp.write_text(json.dumps(entry, indent=1))
