# The diffusion model, into resources/models/<name>: downloaded from the Hugging Face hub (a
# local rule, where the network is) or, for the demo and tests, built offline as a tiny
# SSD-1B-shaped pipeline. Every later stage loads it from this folder with local_files_only.

localrules:
    model_fetch,


rule model_fetch:
    output:
        directory(MODEL_DIR),
    params:
        model=as_json({k: config["model"][k] for k in ("revision", "seed", "source", "variant")}),
    log:
        "logs/model/fetch.log",
    conda:
        "../../envs/braid.yaml"
    script:
        "../../scripts/model_fetch.py"
