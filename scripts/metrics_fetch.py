"""Rule metrics_fetch: one metric network's weights, downloaded (pretrained) or built with random weights."""
from braid import metric_networks
from braid.common import snakemake_job

with snakemake_job(snakemake, offline=snakemake.wildcards.weights != "pretrained"):
    weights, network = snakemake.wildcards.weights, snakemake.wildcards.network
    if weights == "pretrained":
        metric_networks.fetch(network, snakemake.output[0])
    else:
        metric_networks.build_random(network, snakemake.output[0], seed=int(weights.removeprefix("random-seed")))
