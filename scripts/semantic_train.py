"""Rule semantic_train: fit one semantic encoder for one subject and predict its validation and test targets."""
import json

import pandas as pd

from braid.common import snakemake_job, store_path
from braid.device import device_of
from braid.encoder import train
from braid.semantic import SemanticTargets

with snakemake_job(snakemake):
    i, o = snakemake.input, snakemake.output
    spec = json.loads(snakemake.params.spec)
    trials = pd.read_parquet(i.trials)
    targets = SemanticTargets(i.embeddings, spec["target"], spec.get("token_components") or 1,
                              fit_ids=trials.loc[trials["split"] == "train", "nsd_id"].unique(),
                              check_ids=trials.loc[trials["split"] == "val", "nsd_id"].unique())
    train(store_path(i.betas), i.trials, targets, spec, o.model, o.history, o.plot, store_path(o.predictions),
          device=device_of(snakemake.config), teacher=i.teacher or None, ncsnr=i.ncsnr or None,
          checkpoint_minutes=snakemake.config["training"]["checkpoint_minutes"])
