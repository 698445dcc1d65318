# Stage 2: ROI-masked, normalised single-trial betas per subject, with a leakage-free split.


rule betas_mask:
    input:
        sessions=lambda wc: fetched(list(get_session_files(wc).values())),
        rois=lambda wc: fetched(list(get_roi_files(wc).values())),
        expdesign=fetched(nsd_file(braid.nsd.EXPDESIGN)),
        sources=get_betas_sources,
        code=script_code("betas_mask"),
    output:
        betas=zarr_store("results/{subject}/betas.zarr"),
        trials="results/{subject}/trials.parquet",
    log:
        "logs/{subject}/betas.log",
    benchmark:
        "logs/benchmark/betas_mask/{subject}/betas.tsv"
    conda:
        "../../envs/braid.yaml"
    threads: 2
    resources:
        mem_mb=mem_betas_mask,
        runtime=120,
    params:
        sessions=lambda wc: as_json(get_session_files(wc)),
        rois=lambda wc: as_json(get_roi_files(wc)),
        roi_labels=as_json(config["roi"]),
        split=as_json(config["split"]),
        betas=as_json(config["betas"]),
        pilot_images=as_json(config["pilot_images"]),
    script:
        "../../scripts/betas_mask.py"
