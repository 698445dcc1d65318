# Stage 5: img2img from the predicted latents, one job per subject x encoder x strength.


rule reconstruct_img2img:
    input:
        predictions=zarr_store("results/{subject}/{encoder}/predictions.zarr"),
        model=MODEL_DIR,
        code=src("reconstruct"),
    output:
        directory("results/{subject}/{encoder}/strength-{strength}/images"),
    params:
        settings=as_json(without(config["reconstruct"], "strengths", "batch_size") | {"variant": config["model"]["variant"]}),
    log:
        "logs/{subject}/{encoder}/strength-{strength}/reconstruct.log",
    conda:
        "../../envs/braid.yaml"
    script:
        "../../scripts/reconstruct_img2img.py"
