# Stage 3: the VAE latents z0 of every stimulus the configured subjects were scheduled to see,
# cached once (keyed by NSD id) and shared by all subjects, encoders and strengths.


rule latents_encode:
    input:
        stimuli=stimuli_file(),
        expdesign=nsd_file(braid.nsd.EXPDESIGN),
        model=MODEL_DIR,
        code=src("latents"),
    output:
        zarr_store("results/latents.zarr"),
    params:
        subjects=config["subjects"],
        model=as_json(without(config["model"], "latent_batch_size")),
    log:
        "logs/latents/encode.log",
    conda:
        "../../envs/braid.yaml"
    script:
        "../../scripts/latents_encode.py"
