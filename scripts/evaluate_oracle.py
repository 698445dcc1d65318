"""Rule evaluate_oracle: the synthetic data's oracle decoder, scored like an encoder on the same test rows."""
import json

from braid.common import snakemake_job, store_path
from braid.evaluate import evaluate_oracle

with snakemake_job(snakemake):
    i, p = snakemake.input, snakemake.params
    evaluate_oracle(i.oracle, {int(k): v for k, v in json.loads(p.sessions).items()}, json.loads(p.rois),
                    json.loads(p.roi_labels), i.expdesign, i.trials, store_path(i.latents), snakemake.output[0],
                    snakemake.wildcards.subject)
