"""Rule captions_fetch: COCO captions of every NSD image into one table (see braid.captions)."""
from pathlib import Path

from braid.captions import COCO_ANNOTATIONS_SIZE, COCO_ANNOTATIONS_URL, build_caption_table, download_annotations
from braid.common import snakemake_job

with snakemake_job(snakemake, offline=False):
    p = snakemake.params
    source = p.source
    if source == "synthetic":
        source = str(Path(snakemake.input.sources[-1]).parents[1])  # <mirror>/coco (annotations/ under it)
    elif source.startswith(("http://", "https://")):
        size = COCO_ANNOTATIONS_SIZE if source == COCO_ANNOTATIONS_URL else None
        source = str(download_annotations(source, p.download, expected_size=size))
    build_caption_table(snakemake.input.stim_info, source, snakemake.output[0])
