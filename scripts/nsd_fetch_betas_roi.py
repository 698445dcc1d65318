"""Rule nsd_fetch_betas_roi: the ROI voxels' chunks of one betas file, plus a manifest entry."""
import json

from braid.common import atomic_output, snakemake_job
from braid.nsd import load_roi_mask
from braid.transfer import fetch_betas_roi

with snakemake_job(snakemake):
    p = snakemake.params
    labels = json.loads(p.roi_labels)
    files = dict(zip(sorted(labels), snakemake.input.rois))
    mask_xyz, _, _ = load_roi_mask(files, labels)
    key = "nsddata_betas/" + snakemake.wildcards.path
    entry = fetch_betas_roi(p.source, key, snakemake.output.betas, mask_xyz.T, **p.s3)
    with atomic_output(snakemake.output.manifest) as tmp:
        tmp.write_text(json.dumps(entry, indent=1))
