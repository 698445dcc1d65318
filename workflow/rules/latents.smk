# Stage 3: the VAE latents z0 of the stimuli, in one cache per model identity (LATENT_STORE),
# keyed by NSD id and shared by all subjects, encoders and strengths. Each subject's job adds
# only the ids the cache lacks and writes the subject's manifest, which later stages read.


rule latents_encode:
    input:
        stimuli=lambda wc: fetched(stimuli_file(wc.subject)),
        expdesign=fetched(nsd_file(braid.nsd.EXPDESIGN)),
        sources=fetch_sources(braid.nsd.STIMULI, braid.nsd.EXPDESIGN),
        model=MODEL_DIR,
        code=script_code("latents_encode"),
    output:
        "results/{subject}/latents.json",
    log:
        "logs/{subject}/latents_encode.log",
    benchmark:
        "logs/benchmark/latents_encode/{subject}/latents_encode.tsv"
    conda:
        "../../envs/braid.yaml"
    threads: 8
    resources:
        mem_mb=mem_model_job("vae", config["model"]["latent_batch_size"]),
        runtime=240,
        gpu=GPU,
    params:
        store=LATENT_STORE,
        identity=as_json(LATENT_IDENTITY),
        dtype=config["model"]["dtype"],
        image_size=config["model"]["image_size"],
        variant=config["model"]["variant"],
        shown=as_json(SHOWN),
    script:
        "../../scripts/latents_encode.py"


rule latents_statistics:
    """Per-element and per-channel mean/std of the subject's training images' latents."""
    input:
        latents="results/{subject}/latents.json",
        trials="results/{subject}/trials.parquet",
        code=script_code("latents_statistics"),
    output:
        stats=zarr_store("results/{subject}/latent_stats.zarr"),
        plot=report(
            "results/{subject}/latent_stats.png",
            caption="../report/latent_stats.rst",
            category="Latents",
            labels={"subject": "{subject}"},
        ),
    log:
        "logs/{subject}/latents_statistics.log",
    benchmark:
        "logs/benchmark/latents_statistics/{subject}/latents_statistics.tsv"
    conda:
        "../../envs/braid.yaml"
    script:
        "../../scripts/latents_statistics.py"
