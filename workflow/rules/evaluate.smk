# Stage 6: the field's metrics. Network weights are fetched once (a local rule); each subject's
# test stimuli are featurised once; every run (subject x latent source x decode-only, or img2img
# conditioning x guidance x strength x seed) is scored per image; one summary job aggregates over images and seeds, draws the figures and
# prints the table beside the published rows; per subject and strength one grid of every row.


rule metrics_fetch:
    """Weights of one metric network into resources/metric_weights/<pretrained|random-seedN>/<network>:
    downloaded (torchvision, SwAV, the HF hub), or the same architecture with seeded random weights."""
    output:
        directory("resources/metric_weights/{weights}/{network}"),
    log:
        "logs/metric_weights/{weights}/{network}.log",
    benchmark:
        "logs/benchmark/metrics_fetch/metric_weights/{weights}/{network}.tsv"
    wildcard_constraints:
        weights=r"pretrained|random-seed[0-9]+",
        network="|".join(braid.metric_networks.NETWORKS),
    localrule: True
    conda:
        "../../envs/braid.yaml"
    script:
        "../../scripts/metrics_fetch.py"


rule evaluate_stimuli:
    """Network features of the subject's test stimuli (the ground truth of every run), and on the
    synthetic data the category readout's descriptors of its training stimuli."""
    input:
        stimuli=lambda wc: fetched(stimuli_file(wc.subject)),
        sources=fetch_sources(braid.nsd.STIMULI, braid.nsd.STIM_INFO),
        stim_info=fetched(nsd_file(braid.nsd.STIM_INFO)),
        trials="results/{subject}/trials.parquet",
        weights=list(METRIC_WEIGHTS.values()),
        code=script_code("evaluate_stimuli"),
    output:
        zarr_store("results/{subject}/stimulus_features.zarr"),
    log:
        "logs/{subject}/stimulus_features.log",
    benchmark:
        "logs/benchmark/evaluate_stimuli/{subject}/stimulus_features.tsv"
    conda:
        "../../envs/braid.yaml"
    threads: 4
    resources:
        mem_mb=mem_metrics,
        runtime=120,
        gpu=GPU,
    script:
        "../../scripts/evaluate_stimuli.py"


rule evaluate_images:
    """Every metric of one run, per test image."""
    input:
        images="results/{subject}/{encoder}/{run}/images",
        predictions=zarr_store("results/{subject}/{encoder}/predictions.zarr"),
        latents="results/{subject}/latents.json",
        stimuli=lambda wc: fetched(stimuli_file(wc.subject)),
        sources=fetch_sources(braid.nsd.STIMULI),
        features=zarr_store("results/{subject}/stimulus_features.zarr"),
        weights=list(METRIC_WEIGHTS.values()),
        conditioning=get_run_conditioning,
        code=script_code("evaluate_images"),
    output:
        "results/{subject}/{encoder}/{run}/image_metrics.parquet",
    log:
        "logs/{subject}/{encoder}/{run}/evaluate.log",
    benchmark:
        "logs/benchmark/evaluate_images/{subject}/{encoder}/{run}/evaluate.tsv"
    wildcard_constraints:
        run=r"decode|(none|true-caption|(predicted|retrieved)-[A-Za-z0-9_-]+)/guidance-[0-9.]+/strength-[0-9.]+/seed-[0-9]+",
    conda:
        "../../envs/braid.yaml"
    threads: 4
    resources:
        mem_mb=mem_metrics,
        runtime=120,
        gpu=GPU,
    params:
        retrieval=as_json(
            {"pool": config["evaluate"]["retrieval_pool"], "draws": config["evaluate"]["retrieval_draws"]}
        ),
    script:
        "../../scripts/evaluate_images.py"


rule evaluate_grid:
    """Stimuli and every row's reconstructions (first guidance scale and seed) at one strength, the
    retrieved captions under their rows."""
    input:
        unpack(get_grid_images),
        captions=get_grid_captions,
        stimuli=lambda wc: fetched(stimuli_file(wc.subject)),
        sources=fetch_sources(braid.nsd.STIMULI),
        trials="results/{subject}/trials.parquet",
        latents="results/{subject}/latents.json",
        code=script_code("evaluate_grid"),
    output:
        report(
            "results/{subject}/grid-strength-{strength}.png",
            caption="../report/grid.rst",
            category="Reconstructions",
            labels={"subject": "{subject}", "strength": "{strength}"},
        ),
    log:
        "logs/{subject}/grid-strength-{strength}.log",
    benchmark:
        "logs/benchmark/evaluate_grid/{subject}/grid-strength-{strength}.tsv"
    conda:
        "../../envs/braid.yaml"
    params:
        seed=SEEDS[0],
        guidance=GUIDANCES[0],
    script:
        "../../scripts/evaluate_grid.py"


rule evaluate_oracle:
    """Synthetic data only: the best linear decoder, knowing the generative model, on the same test rows."""
    input:
        oracle=lambda wc: f"{SYNTHETIC_ROOT}/{braid.synthetic.oracle_key(subject_number(wc.subject))}",
        sessions=lambda wc: fetched(list(get_session_files(wc).values())),
        rois=lambda wc: fetched(list(get_roi_files(wc).values())),
        expdesign=fetched(nsd_file(braid.nsd.EXPDESIGN)),
        sources=get_betas_sources,
        trials="results/{subject}/trials.parquet",
        latents="results/{subject}/latents.json",
        code=script_code("evaluate_oracle"),
    output:
        "results/{subject}/oracle_metrics.csv",
    log:
        "logs/{subject}/oracle.log",
    benchmark:
        "logs/benchmark/evaluate_oracle/{subject}/oracle.tsv"
    conda:
        "../../envs/braid.yaml"
    params:
        sessions=lambda wc: as_json(get_session_files(wc)),
        rois=lambda wc: as_json(get_roi_files(wc)),
        roi_labels=as_json(config["roi"]),
    script:
        "../../scripts/evaluate_oracle.py"


rule evaluate_summary:
    input:
        per_image=get_image_metric_files(),
        oracle=get_oracle_metrics(),
        frontier=expand("results/{subject}/frontier.csv", subject=SUBJECTS),
        semantic=expand("results/{subject}/semantic/frontier.csv", subject=SUBJECTS) if SEMANTIC else [],
        code=script_code("evaluate_summary"),
    output:
        table="results/summary.csv",
        per_image="results/metrics_per_image.parquet",
        plot=report("results/summary.png", caption="../report/summary.rst", category="Summary"),
        html=report("results/summary.html", caption="../report/summary_table.rst", category="Summary"),
        frontier="results/frontier_metrics.csv",
        frontier_images=report(
            "results/frontier_images.png", caption="../report/frontier_images.rst", category="Summary"
        ),
    log:
        "logs/summary.log",
    benchmark:
        "logs/benchmark/evaluate_summary/summary.tsv"
    conda:
        "../../envs/braid.yaml"
    params:
        reference=config["frontier"]["reference"],
    script:
        "../../scripts/evaluate_summary.py"
