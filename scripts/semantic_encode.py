"""Rule semantic_encode: add a subject's images' text embeddings to the shared cache; write its manifest."""
import json

from braid.common import snakemake_job, subject_number
from braid.device import device_of
from braid.latents import write_manifest
from braid.nsd import ExpDesign
from braid.text_embeddings import read_caption_table, update_cache

with snakemake_job(snakemake):
    p = snakemake.params
    design = ExpDesign.load(snakemake.input.expdesign)
    ids = design.shown_ids(subject_number(snakemake.wildcards.subject), **json.loads(p.shown))
    # the bank of every captioned image but the test images needs them all embedded
    wanted = read_caption_table(snakemake.input.captions)["nsd_id"].unique() if p.every_image else ids
    result = update_cache(snakemake.input.captions, snakemake.input.model, wanted, p.store,
                          identity=json.loads(p.identity), device=device_of(snakemake.config), dtype=p.dtype,
                          batch_size=snakemake.config["semantic"]["text_batch_size"], variant=p.variant)
    write_manifest(snakemake.output[0], result, wanted)
