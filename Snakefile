# BRAID: Brain Representation to Artificial Image via Diffusion.
#   snakemake --profile profiles/local                      # the embedded synthetic demo
#   snakemake --profile profiles/slurm --configfile config/nsd_ssd1b.yaml
# Stages, one rules file each: nsd (fetch) -> model -> betas -> latents -> encoder
# -> reconstruct -> evaluate; the semantic route (captions -> text embeddings -> semantic
# encoders -> their scores) beside it. Helpers and config validation live in rules/common.smk.

from pathlib import Path


# The embedded default; --configfile files are layered on top of it (from any working directory).
configfile: str(Path(workflow.basedir) / "config" / "config.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/nsd.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/betas.smk"
include: "workflow/rules/latents.smk"
include: "workflow/rules/encoder.smk"
include: "workflow/rules/reconstruct.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/semantic.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),
