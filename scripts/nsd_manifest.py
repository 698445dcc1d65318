"""Rule nsd_manifest: one table of a subject's ROI-only fetches."""
import json

import pandas as pd

from braid.common import atomic_output, snakemake_job

with snakemake_job(snakemake):
    table = pd.DataFrame([json.load(open(path)) for path in snakemake.input.manifests])
    with atomic_output(snakemake.output[0]) as tmp:
        table.to_csv(tmp, index=False)
