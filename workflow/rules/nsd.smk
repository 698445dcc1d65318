# Stage 1: NSD files into resources/nsd/<bucket key>. Fetching is a local rule: on a cluster it
# runs on the submit host (network), and compute jobs read only what it fetched.

localrules:
    nsd_fetch,


rule nsd_synthetic:
    """Generate a synthetic NSD with the bucket's keys and a planted signal (the demo's source)."""
    input:
        model=MODEL_DIR,
        code=src("synthetic"),
    output:
        [f"{SYNTHETIC_ROOT}/{key}" for key in braid.synthetic.keys(config["synthetic"], NSD["resolution"], NSD["beta_version"])],
        meta=f"{SYNTHETIC_ROOT}/{braid.synthetic.META}",
    params:
        cfg=as_json(config["synthetic"]),
        root=SYNTHETIC_ROOT,
        image_size=config["model"]["image_size"],
        resolution=NSD["resolution"],
        beta_version=NSD["beta_version"],
    log:
        "logs/nsd/synthetic.log",
    conda:
        "../../envs/braid.yaml"
    script:
        "../../scripts/nsd_synthetic.py"


rule nsd_fetch:
    """Copy one NSD object from the configured source (S3 via boto3, or a local mirror)."""
    input:
        get_mirror_file,
    output:
        "resources/nsd/{key}",
    params:
        source=NSD["source"] if NSD["source"] != "synthetic" else SYNTHETIC_ROOT,
        endpoint_url=NSD["endpoint_url"],
        region=NSD["region"],
        anonymous=NSD["anonymous"],
    wildcard_constraints:
        key=r"nsddata(_betas|_stimuli)?/.+",
    retries: 2
    log:
        "logs/nsd/fetch/{key}.log",
    conda:
        "../../envs/braid.yaml"
    script:
        "../../scripts/nsd_fetch.py"
