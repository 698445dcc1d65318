"""Rule betas_mask: ROI-masked, normalised betas and the trial table of one subject."""
import json

from braid.betas import build
from braid.common import snakemake_job, store_path, subject_number

with snakemake_job(snakemake):
    p = snakemake.params
    settings = json.loads(p.betas)
    build(
        subject=subject_number(snakemake.wildcards.subject),
        session_files={int(k): v for k, v in json.loads(p.sessions).items()},
        roi_files=json.loads(p.rois),
        roi_labels=json.loads(p.roi_labels),
        expdesign_path=snakemake.input.expdesign,
        out_zarr=store_path(snakemake.output.betas),
        out_trials=snakemake.output.trials,
        split=json.loads(p.split),
        normalisation=settings["normalisation"],
        dtype=settings["dtype"],
        trials=settings["trials"],
        pilot_images=json.loads(p.pilot_images),
    )
