# The diffusion model, into resources/models/<name>@<revision>: downloaded from the Hugging Face
# hub (a local rule: it runs where the network is, e.g. the login node) or, for the demo and
# tests, built offline as a tiny SSD-1B-shaped pipeline. Every later stage loads it from that
# folder with the hub offline (HF_HUB_OFFLINE=1 in their jobs). A model.source that is a local
# folder is used as it is: no rule writes it.

localrules:
    model_fetch,


if not MODEL_IS_LOCAL:

    rule model_fetch:
        output:
            directory(MODEL_DIR),
        params:
            model=as_json(
                {k: config["model"][k] for k in ("revision", "seed", "source", "vae", "vae_revision", "variant")}
            ),
        log:
            "logs/model/fetch.log",
        conda:
            "../../envs/braid.yaml"
        script:
            "../../scripts/model_fetch.py"
