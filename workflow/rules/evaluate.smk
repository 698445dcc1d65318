# Stage 6: metrics per subject x encoder x strength, a picture of each, and one summary.


rule evaluate_metrics:
    input:
        images="results/{subject}/{encoder}/strength-{strength}/images",
        predictions="results/{subject}/{encoder}/predictions.zarr",
        latents="results/latents.zarr",
        stimuli=stimuli_file(),
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


rule evaluate_summary:
    input:
        metrics=get_metric_files(),
        ceiling=get_ceiling(),
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
