# Stage 4: fit each encoder per subject (named ones and the sweep's), predict its validation and
# test latents; per subject, the quality-vs-parameters frontier of all of them.


rule encoder_train:
    input:
        betas=zarr_store("results/{subject}/betas.zarr"),
        trials="results/{subject}/trials.parquet",
        latents="results/{subject}/latents.json",
        teacher=get_teacher,
        ncsnr=get_ncsnr,
        sources=get_ncsnr_source,
        code=script_code("encoder_train"),
    output:
        model="results/{subject}/{encoder}/encoder.safetensors",
        config="results/{subject}/{encoder}/encoder.json",
        history="results/{subject}/{encoder}/history.csv",
        plot=report(
            "results/{subject}/{encoder}/loss.png",
            caption="../report/loss.rst",
            category="Training",
            labels={"subject": "{subject}", "encoder": "{encoder}"},
        ),
        predictions=zarr_store("results/{subject}/{encoder}/predictions.zarr"),
    log:
        "logs/{subject}/{encoder}/train.log",
    benchmark:
        "logs/benchmark/encoder_train/{subject}/{encoder}/train.tsv"
    wildcard_constraints:
        # a reference row's predictions share an encoder's path; encoder_reference makes them
        encoder=r"(?!(?:true-latent|mean-latent)/)[A-Za-z0-9_-]+",
    conda:
        "../../envs/braid.yaml"
    threads: 8
    resources:
        mem_mb=mem_encoder_train,
        runtime=720,
        gpu=GPU,
    params:
        spec=lambda wc: as_json(encoder_spec(wc.encoder)),
    script:
        "../../scripts/encoder_train.py"


rule encoder_frontier:
    input:
        predictions=expand(zarr_store("results/{{subject}}/{encoder}/predictions.zarr"), encoder=FRONTIER_ENCODERS),
        latents="results/{subject}/latents.json",
        code=script_code("encoder_frontier"),
    output:
        table="results/{subject}/frontier.csv",
        plot=report(
            "results/{subject}/frontier.png",
            caption="../report/frontier.rst",
            category="Summary",
            labels={"subject": "{subject}", "figure": "frontier"},
        ),
    log:
        "logs/{subject}/frontier.log",
    benchmark:
        "logs/benchmark/encoder_frontier/{subject}/frontier.tsv"
    conda:
        "../../envs/braid.yaml"
    params:
        encoders=FRONTIER_ENCODERS,
        reference=config["frontier"]["reference"],
    script:
        "../../scripts/encoder_frontier.py"


rule encoder_reference:
    """Reference rows in an encoder's format: every test trial's own latent (true-latent) or the
    training mean (mean-latent), reconstructed and scored like the encoders."""
    input:
        trials="results/{subject}/trials.parquet",
        latents="results/{subject}/latents.json",
        code=script_code("encoder_reference"),
    output:
        predictions=zarr_store("results/{subject}/{encoder}/predictions.zarr"),
    log:
        "logs/{subject}/{encoder}/reference.log",
    benchmark:
        "logs/benchmark/encoder_reference/{subject}/{encoder}/reference.tsv"
    wildcard_constraints:
        encoder="|".join(braid.encoder.REFERENCES),
    conda:
        "../../envs/braid.yaml"
    script:
        "../../scripts/encoder_reference.py"
