# Stage 1: NSD files into resources/nsd/<bucket key> (whole objects) or resources/nsd_roi/<key>
# (betas: only the ROI voxels' chunks; stimuli: only the needed rows). Fetching is a local rule: on a cluster it
# runs on the submit host (network), and compute jobs read only what it fetched. No `retries:`:
# transient network faults are retried inside the job (botocore, then braid.transfer.RangeSource) and a
# rerun resumes a partial download, while a 403/404 is deterministic and must fail once, at once.


rule nsd_synthetic_stimuli:
    """The synthetic NSD's stimuli, design and stimulus info (no model needed: a model may be trained on them)."""
    input:
        code=script_code("nsd_synthetic_stimuli"),
    output:
        [f"{SYNTHETIC_ROOT}/{key}" for key in braid.synthetic.STIMULUS_KEYS],
    log:
        "logs/nsd/synthetic_stimuli.log",
    benchmark:
        "logs/benchmark/nsd_synthetic_stimuli/nsd/synthetic_stimuli.tsv"
    conda:
        "../../envs/braid.yaml"
    params:
        cfg=as_json(SYNTHETIC_STIMULUS_CONFIG),
    script:
        "../../scripts/nsd_synthetic_stimuli.py"


rule nsd_synthetic:
    """The synthetic NSD's volumes and betas, the signal planted in the model's latents of the stimuli."""
    input:
        stimuli=[f"{SYNTHETIC_ROOT}/{key}" for key in braid.synthetic.STIMULUS_KEYS],
        model=MODEL_DIR,
        code=script_code("nsd_synthetic"),
    output:
        [
            f"{SYNTHETIC_ROOT}/{key}"
            for key in braid.synthetic.keys(config["synthetic"], NSD["resolution"], NSD["beta_version"])
            if key not in braid.synthetic.STIMULUS_KEYS
        ],
        meta=f"{SYNTHETIC_ROOT}/{braid.synthetic.META}",
        oracle=[
            f"{SYNTHETIC_ROOT}/{braid.synthetic.oracle_key(s, target)}"
            for s in config["synthetic"]["subjects"]
            for target in ("latent", "semantic")
        ],
    log:
        "logs/nsd/synthetic.log",
    benchmark:
        "logs/benchmark/nsd_synthetic/nsd/synthetic.tsv"
    conda:
        "../../envs/braid.yaml"
    resources:
        mem_mb=mem_model_job("vae", config["model"]["latent_batch_size"]),
        runtime=30,
    params:
        cfg=as_json(config["synthetic"]),
        image_size=config["model"]["image_size"],
        resolution=NSD["resolution"],
        beta_version=NSD["beta_version"],
    script:
        "../../scripts/nsd_synthetic.py"


rule nsd_fetch:
    """Copy one NSD object from the configured source (S3 via boto3, or a local mirror)."""
    input:
        mirror=lambda wc: mirror_file(wc.key),
    output:
        "resources/nsd/{key}",
    log:
        "logs/nsd/fetch/{key}.log",
    benchmark:
        "logs/benchmark/nsd_fetch/nsd/fetch/{key}.tsv"
    wildcard_constraints:
        key=r"nsddata(_betas|_stimuli)?/.+",
    localrule: True
    conda:
        "../../envs/braid.yaml"
    params:
        source=FETCH_SOURCE,
        s3=S3_SETTINGS,
    script:
        "../../scripts/nsd_fetch.py"


rule nsd_fetch_betas_roi:
    """Fetch only the chunks of the configured ROIs' voxels of one betas file (ranged reads)."""
    input:
        rois=get_betas_roi_inputs,
        mirror=lambda wc: mirror_file(f"nsddata_betas/{wc.path}"),
        code=script_code("nsd_fetch_betas_roi"),
    output:
        betas="resources/nsd_roi/nsddata_betas/{path}",
        manifest="resources/nsd_roi/nsddata_betas/{path}.manifest.json",
    log:
        "logs/nsd/fetch_roi/{path}.log",
    benchmark:
        "logs/benchmark/nsd_fetch_betas_roi/nsd/fetch_roi/{path}.tsv"
    wildcard_constraints:
        path=r"ppdata/subj0[1-8]/.+\.hdf5",
    localrule: True
    conda:
        "../../envs/braid.yaml"
    params:
        source=FETCH_SOURCE,
        s3=S3_SETTINGS,
        roi_labels=as_json(FETCH_ROIS),
    script:
        "../../scripts/nsd_fetch_betas_roi.py"


rule nsd_fetch_stimuli_rows:
    """Fetch only the imgBrick rows of the images one subject was scheduled to see."""
    input:
        expdesign=nsd_file(braid.nsd.EXPDESIGN),
        mirror=mirror_file(braid.nsd.STIMULI),
        code=script_code("nsd_fetch_stimuli_rows"),
    output:
        stimuli=f"resources/nsd_roi/{{subject}}/{braid.nsd.STIMULI}",
        manifest=f"resources/nsd_roi/{{subject}}/{braid.nsd.STIMULI}.manifest.json",
    log:
        "logs/nsd/{subject}/fetch_stimuli_rows.log",
    benchmark:
        "logs/benchmark/nsd_fetch_stimuli_rows/nsd/{subject}/fetch_stimuli_rows.tsv"
    localrule: True
    conda:
        "../../envs/braid.yaml"
    params:
        source=lambda wc, input: fetch_source(input.mirror, braid.nsd.STIMULI),
        s3=S3_SETTINGS,
        shown=as_json(SHOWN),
    script:
        "../../scripts/nsd_fetch_stimuli_rows.py"


rule nsd_manifest:
    """Per subject: what was fetched ROI-only, bytes requested and stored, checksums."""
    input:
        manifests=get_manifests,
        code=script_code("nsd_manifest"),
    output:
        "results/{subject}/fetch_manifest.csv",
    log:
        "logs/{subject}/fetch_manifest.log",
    benchmark:
        "logs/benchmark/nsd_manifest/{subject}/fetch_manifest.tsv"
    localrule: True
    conda:
        "../../envs/braid.yaml"
    script:
        "../../scripts/nsd_manifest.py"
