# Stage 4: train each configured encoder per subject; predict the test split's latents.


rule encoder_train:
    input:
        betas=zarr_store("results/{subject}/betas.zarr"),
        trials="results/{subject}/trials.parquet",
        latents="results/{subject}/latents.json",
        code=src("encoder"),
    output:
        model="results/{subject}/{encoder}/encoder.safetensors",
        history="results/{subject}/{encoder}/history.csv",
        plot=report(
            "results/{subject}/{encoder}/loss.png",
            caption="../report/loss.rst",
            category="Training",
            labels={"subject": "{subject}", "encoder": "{encoder}"},
        ),
        predictions=zarr_store("results/{subject}/{encoder}/predictions.zarr"),
    params:
        hp=lambda wc: as_json(config["encoders"][wc.encoder]),
    log:
        "logs/{subject}/{encoder}/train.log",
    conda:
        "../../envs/braid.yaml"
    script:
        "../../scripts/encoder_train.py"
