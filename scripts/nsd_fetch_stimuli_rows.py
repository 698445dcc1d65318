"""Rule nsd_fetch_stimuli_rows: the imgBrick rows one subject needs, plus a manifest entry."""
import json

from braid.common import atomic_output, snakemake_job, subject_number
from braid.nsd import STIMULI, ExpDesign
from braid.transfer import fetch_stimuli_rows

with snakemake_job(snakemake):
    p = snakemake.params
    design = ExpDesign.load(snakemake.input.expdesign)
    ids = design.shown_ids(subject_number(snakemake.wildcards.subject), **json.loads(p.shown))
    entry = fetch_stimuli_rows(p.source, STIMULI, snakemake.output.stimuli, ids, **p.s3)
    with atomic_output(snakemake.output.manifest) as tmp:
        tmp.write_text(json.dumps(entry, indent=1))
