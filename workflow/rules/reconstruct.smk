# Stage 5: reconstructions of each test image from its predicted latent: decoded only (the VAE
# decoder, no diffusion), and img2img at every strength and seed, one job each. Encoders and the
# reference rows (true-latent, mean-latent) alike.


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


rule reconstruct_img2img:
    input:
        predictions=zarr_store("results/{subject}/{encoder}/predictions.zarr"),
        model=MODEL_DIR,
        code=script_code("reconstruct_img2img"),
    output:
        directory("results/{subject}/{encoder}/strength-{strength}/seed-{seed}/images"),
    log:
        "logs/{subject}/{encoder}/strength-{strength}/seed-{seed}/reconstruct.log",
    benchmark:
        "logs/benchmark/reconstruct_img2img/{subject}/{encoder}/strength-{strength}/seed-{seed}/reconstruct.tsv"
    conda:
        "../../envs/braid.yaml"
    threads: 8
    resources:
        mem_mb=mem_model_job("", config["reconstruct"]["batch_size"]),
        runtime=480,
        gpu=GPU,
    params:
        settings=as_json(
            without(config["reconstruct"], "strengths", "seeds", "batch_size")
            | {"variant": config["model"]["variant"]}
        ),
    script:
        "../../scripts/reconstruct_img2img.py"
