"""Rule semantic_oracle: the synthetic data's best linear decoder of the pooled text embedding."""
import json

from braid.common import snakemake_job, store_path, subject_number
from braid.semantic import write_oracle_predictions

with snakemake_job(snakemake):
    i, p = snakemake.input, snakemake.params
    write_oracle_predictions(i.oracle, {int(k): v for k, v in json.loads(p.sessions).items()}, json.loads(p.rois),
                             json.loads(p.roi_labels), i.expdesign, i.trials, subject_number(snakemake.wildcards.subject),
                             store_path(snakemake.output[0]))
