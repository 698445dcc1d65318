"""Checks of the configuration that a JSON schema cannot express, and names derived from it.

``snakemake`` validates the config against ``config/schema.yaml`` first; :func:`check` then
looks at combinations (sessions a subject has, strengths the step count can run) so that a bad
config stops the workflow before any job, with one message per problem.
"""

from __future__ import annotations

import copy
from pathlib import Path

from .common import BraidError
from .nsd import check_sessions


def collection_keys(schema: dict) -> list[str]:
    """Top-level keys whose value maps names the user chooses (ROI files, encoders) to settings.

    In the schema they are objects with an ``additionalProperties`` schema and no fixed
    ``properties``.
    """
    return sorted(
        key for key, spec in schema.get("properties", {}).items()
        if spec.get("type") == "object" and isinstance(spec.get("additionalProperties"), dict)
        and not spec.get("properties")
    )


def replace_collections(config: dict, layers: list[dict], keys: list[str]) -> list[str]:
    """Give each collection in ``keys`` exactly the entries of the last layer that sets it.

    Snakemake deep-merges every ``--configfile`` (and ``--config``) into the default config,
    so ``roi: {prf-visualrois: [1, 2]}`` would silently be united with the default's
    ``nsdgeneral``. A layer that names a collection replaces it instead; a layer that does not
    keeps the one before. ``layers`` are the user's config mappings in the order Snakemake
    applied them. Returns the keys that were replaced.
    """
    replaced = []
    for key in keys:
        for layer in reversed(layers):
            if isinstance(layer, dict) and key in layer:
                config[key] = copy.deepcopy(layer[key])
                replaced.append(key)
                break
    return replaced


def check(config: dict) -> None:
    problems = []
    subjects, sessions = config["subjects"], config["sessions"]
    if config["nsd"]["source"] == "synthetic":
        syn = config["synthetic"]
        extra = sorted(set(subjects) - set(syn["subjects"]))
        if extra:
            problems.append(f"subjects {extra} are not in synthetic.subjects {syn['subjects']}")
        over = [s for s in sessions if s > syn["sessions"]]
        if over:
            problems.append(f"sessions {over} exceed synthetic.sessions ({syn['sessions']})")
    else:
        for s in subjects:
            try:
                check_sessions(s, sessions)
            except BraidError as err:
                problems.append(str(err))
    unknown = sorted(set(config.get("train_encoders") or []) - set(config["encoders"]))
    if unknown:
        problems.append(f"train_encoders {unknown} are not defined under encoders ({sorted(config['encoders'])})")
    steps = config["reconstruct"]["steps"]
    for s in config["reconstruct"]["strengths"]:
        if int(steps * s) == 0:
            problems.append(
                f"reconstruct.strengths {s} with reconstruct.steps {steps} runs no denoising step "
                f"(int({steps}*{s}) = 0); raise steps or the strength"
            )
    split = config["split"]
    if split["rule"] == "seed" and min(split["train"], split["val"], split["test"]) <= 0:
        problems.append("split.train, split.val and split.test must all be > 0 with split.rule 'seed'")
    if problems:
        raise BraidError("config: " + "; ".join(problems))


def model_is_local(model: dict) -> bool:
    """``model.source`` names a folder on this machine (used as is, never fetched)."""
    source = model["source"]
    return source not in ("tiny", "ssd1b-architecture") and (source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().is_dir())


def model_name(model: dict) -> str:
    """Folder name under resources/models for the configured model: ``<repo>@<revision>[+vae-<repo>@<rev>]``."""
    if model["source"] == "tiny":
        return f"tiny-ssd1b-seed{model.get('seed', 0)}"
    if model["source"] == "ssd1b-architecture":
        return f"ssd1b-architecture-seed{model.get('seed', 0)}"
    if model_is_local(model):
        return Path(model["source"]).expanduser().resolve().name
    name = f"{model['source'].replace('/', '--')}@{model.get('revision') or 'main'}"
    if model.get("vae"):
        name += f"+vae-{model['vae'].replace('/', '--')}@{model.get('vae_revision') or 'main'}"
    return name


def model_dir(model: dict) -> str:
    """Where compute jobs load the model from: the local folder, or resources/models/<name>."""
    if model_is_local(model):
        return str(Path(model["source"]).expanduser().resolve())
    return f"resources/models/{model_name(model)}"


def latent_identity(model: dict) -> dict:
    """What defines the weights that encode latents; :func:`braid.latents.update_cache` adds the
    image size, dtype, preprocessing and scaling factor, and stores the whole identity."""
    identity = {"model": model["source"], "revision": model.get("revision"), "variant": model.get("variant"),
                "vae": model.get("vae"), "vae_revision": model.get("vae_revision")}
    if model["source"] in ("tiny", "ssd1b-architecture"):
        identity["seed"] = model.get("seed", 0)
    return identity


def latent_store_name(model: dict) -> str:
    """``<model name>/<size>px-<dtype>[-<variant>]``: one cache per identity, so settings never mix."""
    name = f"{model_name(model)}/{model['image_size']}px-{model['dtype']}"
    return name + (f"-{model['variant']}" if model.get("variant") else "")


def encoder_names(config: dict) -> list[str]:
    return sorted(config.get("train_encoders") or config["encoders"])


def strength_label(strength: float) -> str:
    return f"{float(strength):g}"
