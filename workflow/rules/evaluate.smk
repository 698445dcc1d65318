# Stage 6: metrics per subject x encoder x strength, a picture of each, and one summary.


rule evaluate_metrics:
    input:
        images="results/{subject}/{encoder}/strength-{strength}/images",
        predictions=zarr_store("results/{subject}/{encoder}/predictions.zarr"),
        latents="results/{subject}/latents.json",
        stimuli=lambda wc: stimuli_file(wc.subject),
        code=src("evaluate"),
    output:
        metrics="results/{subject}/{encoder}/strength-{strength}/metrics.csv",
        grid=report(
            "results/{subject}/{encoder}/strength-{strength}/grid.png",
            caption="../report/grid.rst",
            category="Reconstructions",
            labels={"subject": "{subject}", "encoder": "{encoder}", "strength": "{strength}"},
        ),
    log:
        "logs/{subject}/{encoder}/strength-{strength}/evaluate.log",
    conda:
        "../../envs/braid.yaml"
    script:
        "../../scripts/evaluate_metrics.py"


rule evaluate_oracle:
    """Synthetic data only: the best linear decoder, knowing the generative model, on the same test rows."""
    input:
        oracle=lambda wc: f"{SYNTHETIC_ROOT}/{braid.synthetic.oracle_key(subject_number(wc.subject))}",
        sessions=lambda wc: list(get_session_files(wc).values()),
        rois=lambda wc: list(get_roi_files(wc).values()),
        expdesign=nsd_file(braid.nsd.EXPDESIGN),
        trials="results/{subject}/trials.parquet",
        latents="results/{subject}/latents.json",
        code=[src("evaluate"), src("synthetic")],
    output:
        "results/{subject}/oracle_metrics.csv",
    params:
        sessions=lambda wc: as_json(get_session_files(wc)),
        rois=lambda wc: as_json(get_roi_files(wc)),
        roi_labels=as_json(config["roi"]),
    log:
        "logs/{subject}/oracle.log",
    conda:
        "../../envs/braid.yaml"
    script:
        "../../scripts/evaluate_oracle.py"


rule evaluate_summary:
    input:
        metrics=get_metric_files(),
        oracle=get_oracle_metrics(),
        code=src("evaluate"),
    output:
        table="results/summary.csv",
        plot=report("results/summary.png", caption="../report/summary.rst", category="Summary"),
    log:
        "logs/summary.log",
    conda:
        "../../envs/braid.yaml"
    script:
        "../../scripts/evaluate_summary.py"
