# Stage 5: reconstructions of each test image from its predicted latent: decoded only (the VAE
# decoder, no diffusion), and img2img per conditioning, guidance scale, strength and seed, one job
# each. Encoders and the reference rows (true-latent, mean-latent) alike. The semantic conditionings
# (predicted, retrieved, true-caption: braid.conditioning) are written once per subject and mode and
# read by every img2img job of that mode.


rule reconstruct_decode:
    input:
        predictions=zarr_store("results/{subject}/{encoder}/predictions.zarr"),
        model=MODEL_DIR,
        code=script_code("reconstruct_decode"),
    output:
        directory("results/{subject}/{encoder}/decode/images"),
    log:
        "logs/{subject}/{encoder}/decode/reconstruct.log",
    benchmark:
        "logs/benchmark/reconstruct_decode/{subject}/{encoder}/decode/reconstruct.tsv"
    conda:
        "../../envs/braid.yaml"
    threads: 4
    resources:
        mem_mb=mem_model_job("vae", config["reconstruct"]["batch_size"]),
        runtime=60,
        gpu=GPU,
    params:
        settings=as_json({"dtype": config["reconstruct"]["dtype"], "variant": config["model"]["variant"]}),
    script:
        "../../scripts/reconstruct_decode.py"


rule reconstruct_conditioning:
    """The text embeddings that condition img2img in one semantic mode, for the subject's test images
    (retrieved: the pipeline's text encoders, on the GPU; the other modes read arrays, in seconds)."""
    input:
        unpack(get_conditioning_inputs),
        trials="results/{subject}/trials.parquet",
        code=script_code("reconstruct_conditioning"),
    output:
        store=zarr_store("results/{subject}/conditioning/{conditioning}.zarr"),
        captions="results/{subject}/conditioning/{conditioning}.csv",
    log:
        "logs/{subject}/conditioning/{conditioning}.log",
    benchmark:
        "logs/benchmark/reconstruct_conditioning/{subject}/{conditioning}.tsv"
    wildcard_constraints:
        conditioning=r"true-caption|(predicted|retrieved)-[A-Za-z0-9_-]+",
    conda:
        "../../envs/braid.yaml"
    threads: 4
    resources:
        mem_mb=mem_conditioning,
        runtime=60,
        gpu=GPU,
    params:
        settings=lambda wc: as_json(
            {"dtype": config["semantic"]["text_dtype"], "variant": config["model"]["variant"]}
            if wc.conditioning.startswith("retrieved-")
            else {}
        ),
    script:
        "../../scripts/reconstruct_conditioning.py"


rule reconstruct_img2img:
    input:
        predictions=zarr_store("results/{subject}/{encoder}/predictions.zarr"),
        model=MODEL_DIR,
        conditioning=get_conditioning,
        code=script_code("reconstruct_img2img"),
    output:
        directory(
            "results/{subject}/{encoder}/{conditioning}/guidance-{guidance}/strength-{strength}/seed-{seed}/images"
        ),
    log:
        "logs/{subject}/{encoder}/{conditioning}/guidance-{guidance}/strength-{strength}/seed-{seed}/reconstruct.log",
    benchmark:
        "logs/benchmark/reconstruct_img2img/{subject}/{encoder}/{conditioning}/guidance-{guidance}/strength-{strength}/seed-{seed}/reconstruct.tsv"
    conda:
        "../../envs/braid.yaml"
    threads: 8
    resources:
        mem_mb=mem_model_job("", config["reconstruct"]["batch_size"]),
        runtime=480,
        gpu=GPU,
    params:
        settings=as_json(braid.config.img2img_settings(config)),
    script:
        "../../scripts/reconstruct_img2img.py"
