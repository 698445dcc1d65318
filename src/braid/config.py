"""Checks of the configuration that a JSON schema cannot express, and names derived from it.

``snakemake`` validates the config against ``config/schema.yaml`` first; :func:`check` then
looks at combinations (sessions a subject has, strengths the step count can run) so that a bad
config stops the workflow before any job, with one message per problem.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
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


def apply_layers(config: dict, layers: list[dict], schema: dict) -> list[str]:
    """BRAID's rules on top of Snakemake's deep merge of ``layers`` (``--configfile``s, then ``--config``).

    The collections (:func:`collection_keys`) a layer names are replaced (:func:`replace_collections`),
    and a layer that names its encoders but no sweep gets no sweep: the default's sweep is over the
    default's encoders. Changes ``config`` in place; returns the collections replaced.
    """
    replaced = replace_collections(config, layers, collection_keys(schema))
    if "encoders" in replaced and "sweep" not in replaced:
        config["sweep"] = {}
    return replaced


def layered(base: dict, layers: list[dict], schema: dict) -> dict:
    """The config a run gets from ``base`` (config/config.yaml) and ``layers`` (its ``--configfile``s in
    order): Snakemake's deep merge (``snakemake.utils.update_config``), then :func:`apply_layers`."""
    from snakemake.utils import update_config

    config = copy.deepcopy(base)
    for layer in layers:
        update_config(config, copy.deepcopy(layer))
    apply_layers(config, layers, schema)
    return config


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
    problems += _encoder_problems(config)
    from .encoder import REFERENCES

    taken = sorted(set(config["encoders"]) & set(REFERENCES))
    if taken:
        problems.append(f"encoders {taken}: these names are the reference rows' (evaluate.references); rename the encoders")
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
    elif split["rule"] == "seed":
        from .betas import check_fractions

        try:
            check_fractions(split)
        except BraidError as err:
            problems.append(str(err).removeprefix("config "))
    problems += _roi_problems(config)
    if problems:
        raise BraidError("config: " + "; ".join(problems))


def _roi_problems(config: dict) -> list[str]:
    """``roi`` names ROI files the data set has (NSD's, or the synthetic mirror's), with or without lh./rh."""
    from .nsd import ROI_FILES
    from .synthetic import ROIS

    synthetic = config["nsd"]["source"] == "synthetic"
    base = ROIS if synthetic else ROI_FILES
    valid = {f"{hemi}{name}" for name in base for hemi in ("", "lh.", "rh.")}
    unknown = sorted(set(config["roi"]) - valid)
    if not unknown:
        return []
    where = "the synthetic NSD" if synthetic else "NSD (func1pt8mm and func1mm)"
    return [f"roi {unknown}: no such ROI file in {where}; valid names are {', '.join(base)}, each also with an "
            "lh. or rh. prefix"]


def _encoder_problems(config: dict) -> list[str]:
    from .encoder import spec

    try:
        encoders = all_encoders(config)
    except BraidError as err:
        return [str(err)]
    problems = []
    for name in sorted(encoders):
        cfg = encoders[name]
        try:
            sp = spec(cfg)
        except BraidError as err:
            problems.append(f"encoders.{name}: {err}")
            continue
        teacher = sp.get("teacher")
        if teacher and teacher not in encoders:
            problems.append(f"encoders.{name}: teacher {teacher!r} is not an encoder ({sorted(encoders)})")
        elif teacher == name:
            problems.append(f"encoders.{name}: an encoder cannot be its own teacher")
        ignored = sorted(set(cfg) - set(sp))
        if ignored:
            problems.append(f"encoders.{name}: {', '.join(ignored)} not used by kind {sp['kind']!r}; remove them")
    return problems


def braid_imports(path: str | Path, package_dir: str | Path | None = None) -> list[str]:
    """The ``braid`` modules a Python file imports (``from braid.x``, ``import braid.x``, and inside the
    library ``from .x``/``from . import x``), at module level or inside functions; read with ``ast``."""
    folder = Path(package_dir) if package_dir else Path(__file__).parent
    return list(_braid_imports(str(path), str(folder), Path(path).stat().st_mtime_ns))


@functools.lru_cache(maxsize=None)
def _braid_imports(path: str, package_dir: str, mtime_ns: int) -> tuple[str, ...]:
    """:func:`braid_imports`, parsed once per file version (the workflow asks for each rule)."""
    import ast

    folder = Path(package_dir)
    found = []
    for node in ast.walk(ast.parse(Path(path).read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").split(".")[0] == "braid"):
            module = (node.module or "").removeprefix("braid").lstrip(".")
            if module:
                found.append(module.split(".")[0])
            else:  # from . import x / from braid import x: a module, or a name of the package's __init__
                found += [a.name if (folder / f"{a.name}.py").is_file() else "__init__" for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name.split(".")[1] for a in node.names if a.name.startswith("braid.")]
    return tuple(sorted(set(found)))


def code_modules(names, package_dir: str | Path | None = None) -> list[str]:
    """``names`` and every ``braid`` module they import, directly or through others (sorted names,
    e.g. ``["common", "hdf5_ranges", "nsd"]``): the library code that running them may execute.

    Snakemake tracks a rule's script but not what the script imports; the workflow lists these
    files as each rule's inputs, so that editing a module reruns every stage that can run it.
    """
    folder = Path(package_dir) if package_dir else Path(__file__).parent
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = folder / f"{name}.py"
        if not path.is_file():
            raise BraidError(f"{path}: no such module of the braid library")
        seen.add(name)
        todo += braid_imports(path, folder)
    return sorted(seen)


BUILT_MODELS = ("tiny", "tiny-trained", "ssd1b-architecture")  # model.source values built here, offline


def model_is_local(model: dict) -> bool:
    """``model.source`` names a folder on this machine (used as is, never fetched)."""
    source = model["source"]
    return source not in BUILT_MODELS and (source.startswith(("/", "./", "../", "~")) or Path(source).expanduser().is_dir())


def model_name(model: dict) -> str:
    """Folder name under resources/models for the configured model: ``<repo>@<revision>[+vae-<repo>@<rev>]``."""
    if model["source"] == "tiny":
        return f"tiny-ssd1b-seed{model.get('seed', 0)}"
    if model["source"] == "tiny-trained":
        return f"tiny-trained-ssd1b-seed{model.get('seed', 0)}"
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


def model_identity(model: dict) -> dict:
    """What names the weights ``model_fetch`` gets: source, revision, variant and the VAE override
    (and the seed of a model built here); sorted. Settings of how it runs (dtype, image size,
    batch sizes, compile) are not part of it."""
    identity = {k: model.get(k) for k in ("revision", "source", "vae", "vae_revision", "variant")}
    if model["source"] in BUILT_MODELS:
        identity["seed"] = model.get("seed", 0)
    return dict(sorted(identity.items()))


def latent_identity(model: dict, trained_on: dict | None = None) -> dict:
    """What defines the weights that encode latents; :func:`braid.latents.update_cache` adds the
    image size, dtype, preprocessing and scaling factor, and stores the whole identity.

    A model trained here (``tiny-trained``) is also defined by its recipe (``model.train``) and
    by ``trained_on``, the synthetic block's keys that decide the stimuli it learned from.
    """
    identity = {"model": model["source"], "revision": model.get("revision"), "variant": model.get("variant"),
                "vae": model.get("vae"), "vae_revision": model.get("vae_revision")}
    if model["source"] in BUILT_MODELS:
        identity["seed"] = model.get("seed", 0)
    if model["source"] == "tiny-trained":
        identity["train"] = training_recipe(model)
        identity["trained_on"] = dict(sorted((trained_on or {}).items()))
    return identity


def training_recipe(model: dict) -> dict:
    """The tiny model's training recipe: ``model.train`` over :data:`braid.model_training.RECIPE_DEFAULTS`."""
    from .model_training import RECIPE_DEFAULTS

    return dict(sorted({**RECIPE_DEFAULTS, **model.get("train", {})}.items()))


def latent_store_name(model: dict, trained_on: dict | None = None) -> str:
    """``<model name>/<size>px-<dtype>[-<variant>]``: one cache per identity, so settings never mix.

    A model trained here adds a digest of its recipe and training data (:func:`latent_identity`):
    another recipe is another model, whose latents go to another cache.
    """
    name = f"{model_name(model)}/{model['image_size']}px-{model['dtype']}"
    if model["source"] == "tiny-trained":
        identity = latent_identity(model, trained_on)
        digest = hashlib.sha256(json.dumps([identity["train"], identity["trained_on"]], sort_keys=True).encode())
        name += f"-{digest.hexdigest()[:8]}"
    return name + (f"-{model['variant']}" if model.get("variant") else "")


def encoder_names(config: dict) -> list[str]:
    """The named encoders that are trained, reconstructed and evaluated (``train_encoders`` or all)."""
    return sorted(config.get("train_encoders") or config["encoders"])


LIST_VALUED = ("hidden", "alphas")  # encoder settings whose value is itself a list


def _label(value) -> str:
    if isinstance(value, list):
        return "x".join(_label(v) for v in value) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def sweep_encoders(config: dict) -> dict[str, dict]:
    """Encoders of ``sweep``: for each base encoder, one per combination of the listed values.

    ``sweep: {lowrank: {rank: [8, 32]}, mlp: {hidden: [[64, 128]]}, ridge: {voxels: reliability,
    k: [100, 500]}}`` gives ``lowrank-rank8``, ``lowrank-rank32``, ``mlp-hidden64x128``,
    ``ridge-k100`` and ``ridge-k500``. A list is an axis (a list of lists for ``hidden`` and
    ``alphas``); any other value is a fixed override. Names carry the axes only.
    """
    import itertools

    out: dict[str, dict] = {}
    for base in sorted(config.get("sweep") or {}):
        if base not in config["encoders"]:
            raise BraidError(f"sweep.{base}: no encoder {base!r} under encoders ({sorted(config['encoders'])})")
        grid = config["sweep"][base]
        axes, fixed = {}, {}
        for key in sorted(grid):
            value = grid[key]
            is_axis = isinstance(value, list) and (key not in LIST_VALUED or all(isinstance(v, list) for v in value))
            (axes if is_axis else fixed)[key] = value
        if not axes:
            raise BraidError(f"sweep.{base}: give at least one setting a list of values to sweep")
        for combo in itertools.product(*axes.values()):
            values = dict(zip(axes, combo))
            name = "-".join([base, *(f"{k}{_label(v)}" for k, v in values.items())])
            if name in config["encoders"] or name in out:
                raise BraidError(f"sweep.{base}: encoder name {name!r} is already taken; rename the encoder")
            out[name] = copy.deepcopy(config["encoders"][base]) | copy.deepcopy(fixed) | copy.deepcopy(values)
    return out


def validate_sweep(config: dict, schema: dict) -> None:
    """Each encoder a sweep makes must satisfy the schema's encoder entry (``rank: ["8"]`` is refused)."""
    import jsonschema

    entry = schema["properties"]["encoders"]["additionalProperties"]
    problems = []
    for name, cfg in sweep_encoders(config).items():
        for err in jsonschema.Draft202012Validator(entry).iter_errors(cfg):
            where = ".".join(str(p) for p in err.path)
            problems.append(f"sweep encoder {name}{'.' + where if where else ''}: {err.message}")
    if problems:
        raise BraidError("config: " + "; ".join(problems))


def all_encoders(config: dict) -> dict[str, dict]:
    """Every encoder the config can train: the named ones and the sweep's."""
    return {**config["encoders"], **sweep_encoders(config)}


def frontier_encoders(config: dict) -> list[str]:
    """Encoders on a subject's frontier: the trained named ones, the sweep, and their teachers."""
    encoders = all_encoders(config)
    names = set(encoder_names(config)) | set(sweep_encoders(config))
    todo = list(names)
    while todo:
        teacher = encoders[todo.pop()].get("teacher")
        if teacher and teacher not in names:
            names.add(teacher)
            todo.append(teacher)
    return sorted(names)


def metric_weights(evaluate: dict) -> dict[str, str]:
    """network -> the folder of its weights: resources/metric_weights/pretrained/<network>, or
    random-seed<N>/<network> for the same architectures with random weights (evaluate.weights random)."""
    mode = "pretrained" if evaluate["weights"] == "pretrained" else f"random-seed{evaluate['seed']}"
    return {n: f"resources/metric_weights/{mode}/{n}" for n in sorted(evaluate["networks"])}


def strength_label(strength: float) -> str:
    return f"{float(strength):g}"
