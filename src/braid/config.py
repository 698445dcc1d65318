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
    default's encoders. Likewise ``reconstruct.conditioning`` goes with the encoders it names: after
    the last layer that names encoders or semantic encoders, a layer must name it again, or there is
    none; and ``reconstruct.conditioning.strengths`` goes with ``reconstruct.strengths`` (all
    strengths unless named again after them).
    Changes ``config`` in place; returns the collections replaced.
    """
    replaced = replace_collections(config, layers, collection_keys(schema))
    for encoders, sweep in (("encoders", "sweep"), ("semantic_encoders", "semantic_sweep")):
        if encoders in replaced and sweep not in replaced:
            config[sweep] = {}
    def last(has) -> int:  # the index of the last layer for which has(layer, reconstruct block) holds; -1: none
        found = [i for i, layer in enumerate(layers) if isinstance(layer, dict)
                 and has(layer, layer.get("reconstruct") if isinstance(layer.get("reconstruct"), dict) else {})]
        return found[-1] if found else -1

    named = last(lambda layer, rec: "encoders" in layer or "semantic_encoders" in layer)
    if named >= 0 and last(lambda layer, rec: "conditioning" in rec) < named:
        config.setdefault("reconstruct", {})["conditioning"] = {}
    cond = config.get("reconstruct", {}).get("conditioning")
    strengths = last(lambda layer, rec: "strengths" in rec)
    if strengths >= 0 and isinstance(cond, dict) and last(
            lambda layer, rec: "strengths" in (rec.get("conditioning") or {})) < strengths:
        cond["strengths"] = None  # the modes' strengths go with the strengths they were chosen from
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
    """Raise one :class:`BraidError` listing every :func:`combination_problems` of ``config``."""
    problems = combination_problems(config)
    if problems:
        raise BraidError("config: " + "; ".join(problems))


def combination_problems(config: dict) -> list[str]:
    """What a schema cannot say: sessions a subject has, strengths the step count can run, the
    ROI files and encoder settings that exist, a local ``nsd.source`` folder that exists."""
    problems = _source_problems(config["nsd"]["source"])
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
    problems += _conditioning_problems(config)
    if config.get("semantic_encoders") and config.get("captions", {}).get("source") == "synthetic" \
            and config["nsd"]["source"] != "synthetic":
        problems.append("captions.source 'synthetic' holds the synthetic NSD's captions, not NSD's: set it to COCO's "
                        "annotation zip (http://images.cocodataset.org/annotations/annotations_trainval2017.zip), a "
                        "local copy of it or of its caption JSONs, or set semantic_encoders: {}")
    return problems


def _conditioning_problems(config: dict) -> list[str]:
    """``reconstruct.conditioning`` names latent sources and semantic encoders the config has."""
    from .encoder import REFERENCES

    cond = config["reconstruct"].get("conditioning") or {}
    modes = cond.get("modes") or []
    if not modes:
        return []
    key = "reconstruct.conditioning"
    problems = []
    if not config.get("semantic_encoders"):
        problems.append(f"{key}.modes {modes} condition img2img on captions, which needs the semantic route: define "
                        "semantic_encoders, or set reconstruct.conditioning.modes: []")
    sources = set(encoder_names(config)) | set(config["evaluate"].get("references") or [])
    latent = cond.get("latent") or []
    if not latent:
        problems.append(f"{key}.latent is empty: name the latent sources to condition (encoders, or "
                        f"{' / '.join(REFERENCES)})")
    unknown = sorted(set(latent) - sources)
    if unknown:
        problems.append(f"{key}.latent {unknown} are neither reconstructed encoders nor evaluate.references "
                        f"({sorted(sources)})")
    semantic = cond.get("semantic") or []
    if set(modes) & {"predicted", "retrieved"} and not semantic:
        problems.append(f"{key}.semantic is empty: predicted and retrieved need semantic encoders to read")
    unknown = sorted(set(semantic) - set(config.get("semantic_encoders") or {}))
    if unknown:
        problems.append(f"{key}.semantic {unknown} are not defined under semantic_encoders "
                        f"({sorted(config.get('semantic_encoders') or {})})")
    extra = sorted(set(cond.get("strengths") or []) - set(config["reconstruct"]["strengths"]))
    if extra:
        problems.append(f"{key}.strengths {extra} are not in reconstruct.strengths {config['reconstruct']['strengths']}")
    return problems


def _source_problems(source: str) -> list[str]:
    """A local mirror must exist when the run starts (a bucket is named by the first fetch that reaches it)."""
    if source == "synthetic" or source.startswith("s3://") or Path(source).is_dir():
        return []
    return [f"nsd.source: {source!r} is not a folder (seen from {Path.cwd()}); give a local copy of the bucket's "
            "keys (nsddata/, nsddata_betas/, nsddata_stimuli/), an s3:// URL such as s3://natural-scenes-dataset, "
            "or synthetic"]


def _roi_problems(config: dict) -> list[str]:
    """``roi`` names ROI files the data set has (NSD's, or the synthetic mirror's), with or without lh./rh."""
    from .nsd import ROI_FILES
    from .synthetic import ROIS

    synthetic = config["nsd"]["source"] == "synthetic"
    base = ROIS if synthetic else ROI_FILES
    valid = {f"{hemi}{name}" for name in base for hemi in ("", "lh.", "rh.")}
    where = "the synthetic NSD" if synthetic else "NSD (func1pt8mm and func1mm)"
    problems = []
    for key in ("roi", "semantic_roi"):
        unknown = sorted(set(config.get(key) or {}) - valid)
        if unknown:
            problems.append(f"{key} {unknown}: no such ROI file in {where}; valid names are {', '.join(base)}, each "
                            "also with an lh. or rh. prefix")
    return problems


def _encoder_problems(config: dict, route: str = "") -> list[str]:
    from .encoder import spec

    try:
        encoders = all_encoders(config, route)
    except BraidError as err:
        return [str(err)]
    problems, key = [], f"{route}encoders"
    for name in sorted(encoders):
        cfg = dict(encoders[name])
        target = cfg.pop("target", "pooled") if route else None
        try:
            sp = spec(cfg)
        except BraidError as err:
            problems.append(f"{key}.{name}: {err}")
            continue
        teacher = sp.get("teacher")
        if teacher and teacher not in encoders:
            problems.append(f"{key}.{name}: teacher {teacher!r} is not an encoder ({sorted(encoders)})")
        elif teacher == name:
            problems.append(f"{key}.{name}: an encoder cannot be its own teacher")
        elif teacher and route and encoders[teacher].get("target", "pooled") != target:
            problems.append(f"{key}.{name}: target {target!r} differs from its teacher {teacher!r}'s; a student "
                            "learns its teacher's outputs")
        ignored = sorted(set(cfg) - set(sp))
        if ignored:
            problems.append(f"{key}.{name}: {', '.join(ignored)} not used by kind {sp['kind']!r}; remove them")
    if not route:
        problems += _encoder_problems(config, "semantic_")
        if "semantic" in encoders:
            problems.append("encoders.semantic: the name is the semantic route's folder (results/<subject>/semantic); "
                            "rename the encoder")
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


def img2img_settings(config: dict) -> dict:
    """What decides an img2img job's images besides its wildcards (strength, guidance, seed,
    conditioning): ``reconstruct`` without the lists that make those wildcards and the batch size,
    plus the model's weights variant. The rule's params and anything rerunning its code use this."""
    skip = ("strengths", "seeds", "batch_size", "guidance_scales", "conditioning")
    return {k: v for k, v in config["reconstruct"].items() if k not in skip} | {"variant": config["model"]["variant"]}


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


def fetch_rois(config: dict) -> dict[str, list[int]]:
    """The ROI files and labels whose voxels are fetched and masked: ``roi`` united with ``semantic_roi``."""
    out: dict[str, set] = {}
    for key in ("roi", "semantic_roi"):
        for name, labels in (config.get(key) or {}).items():
            out.setdefault(name, set()).update(labels)
    return {name: sorted(labels) for name, labels in sorted(out.items())}


def text_identity(model: dict, text_dtype: str, captions_source: str, stimuli: dict | None = None) -> dict:
    """What a text-embedding cache's contents depend on: the model's weights (its text encoders),
    their dtype, and the captions: COCO's are fixed, the synthetic NSD's follow its stimulus
    settings ``stimuli``."""
    identity = {"model": model_identity(model), "dtype": text_dtype}
    if model["source"] == "tiny-trained":
        identity["trained_on"] = latent_identity(model, stimuli)["trained_on"]
    identity["captions"] = {"synthetic": stimuli} if captions_source == "synthetic" else "coco-2017"
    return identity


def text_store_name(model: dict, text_dtype: str, captions_source: str, stimuli: dict | None = None) -> str:
    """``<model>/<dtype>-<digest>``: one text-embedding cache per :func:`text_identity`."""
    identity = text_identity(model, text_dtype, captions_source, stimuli)
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{model_name(model)}/{identity['dtype']}-{digest}"


LIST_VALUED = ("hidden", "alphas")  # encoder settings whose value is itself a list


def _label(value) -> str:
    if isinstance(value, list):
        return "x".join(_label(v) for v in value) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def sweep_encoders(config: dict, route: str = "") -> dict[str, dict]:
    """Encoders of ``sweep``: for each base encoder, one per combination of the listed values.

    ``sweep: {lowrank: {rank: [8, 32]}, mlp: {hidden: [[64, 128]]}, ridge: {voxels: reliability,
    k: [100, 500]}}`` gives ``lowrank-rank8``, ``lowrank-rank32``, ``mlp-hidden64x128``,
    ``ridge-k100`` and ``ridge-k500``. A list is an axis (a list of lists for ``hidden`` and
    ``alphas``); any other value is a fixed override. Names carry the axes only. ``route="semantic_"``:
    the same for ``semantic_sweep`` over ``semantic_encoders``.
    """
    import itertools

    out: dict[str, dict] = {}
    named, sweep = config.get(f"{route}encoders") or {}, f"{route}sweep"
    for base in sorted(config.get(sweep) or {}):
        if base not in named:
            raise BraidError(f"{sweep}.{base}: no encoder {base!r} under {route}encoders ({sorted(named)})")
        grid = config[sweep][base]
        axes, fixed = {}, {}
        for key in sorted(grid):
            value = grid[key]
            is_axis = isinstance(value, list) and (key not in LIST_VALUED or all(isinstance(v, list) for v in value))
            (axes if is_axis else fixed)[key] = value
        if not axes:
            raise BraidError(f"{sweep}.{base}: give at least one setting a list of values to sweep")
        for combo in itertools.product(*axes.values()):
            values = dict(zip(axes, combo))
            name = "-".join([base, *(f"{k}{_label(v)}" for k, v in values.items())])
            if name in named or name in out:
                raise BraidError(f"{sweep}.{base}: encoder name {name!r} is already taken; rename the encoder")
            out[name] = copy.deepcopy(named[base]) | copy.deepcopy(fixed) | copy.deepcopy(values)
    return out


def validate_sweep(config: dict, schema: dict) -> None:
    """Each encoder a sweep makes must satisfy the schema's encoder entry (``rank: ["8"]`` is refused)."""
    problems = sweep_problems(config, schema)
    if problems:
        raise BraidError("config: " + "; ".join(problems))


def sweep_problems(config: dict, schema: dict) -> list[str]:
    import jsonschema

    problems = []
    for route in ("", "semantic_"):
        entry = schema["properties"][f"{route}encoders"]["additionalProperties"]
        try:
            made = sweep_encoders(config, route)
        except BraidError as err:
            problems.append(str(err))
            continue
        for name, cfg in made.items():
            for err in jsonschema.Draft202012Validator(entry).iter_errors(cfg):
                where = ".".join(str(p) for p in err.path)
                problems.append(f"{route}sweep encoder {name}{'.' + where if where else ''}: {err.message}")
    return problems


# --- every problem of a config, at once, where it was written ---------------------------------


def fill_defaults(config: dict, schema: dict) -> dict:
    """Fill in the schema's defaults where ``config`` leaves a property out (as Snakemake's validate does)."""
    for key, sub in schema.get("properties", {}).items():
        if key not in config and "default" in sub:
            config[key] = copy.deepcopy(sub["default"])
        if isinstance(config.get(key), dict) and sub.get("type") == "object":
            fill_defaults(config[key], sub)
    return config


def _short(value, width: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _dotted(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _line(node, path) -> int | None:
    """1-based line of ``path`` in a composed YAML node tree (the key's line for a mapping entry)."""
    import yaml

    line = None
    for part in path:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(part)]
            if not match:
                return line
            key, node = match[-1]
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _has(data, path) -> bool:
    for part in path:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return False
    return True


def _where(path, sources) -> str:
    """``file:line: `` of the last source that sets ``path`` (Snakemake applies them in order)."""
    import yaml

    for name, file, data in reversed(sources):
        if path and _has(data, path):
            if file is None:
                return f"{name}: "
            try:
                line = _line(yaml.compose(Path(file).read_text()), path)
            except (OSError, yaml.YAMLError):
                line = None
            return f"{name}:{line}: " if line else f"{name}: "
    return ""


def _describe(err, sources) -> list[str]:
    import difflib

    path = list(err.absolute_path)
    value, rule, allowed = err.instance, err.validator, err.validator_value
    if rule == "additionalProperties" and isinstance(value, dict):
        known = sorted(err.schema.get("properties", {}))
        out = []
        for key in [k for k in value if k not in known]:
            near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            what = f"not a setting of {_dotted(path)}" if path else "not a setting"
            hint = f"; did you mean {near[0]!r}?" if near else ""
            out.append(f"{_where([*path, key], sources)}{_dotted([*path, key])}: {what}{hint} (allowed: {', '.join(known)})")
        return out
    if rule == "enum":
        near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
        what = f"{_short(value)} is not allowed; allowed: {', '.join(_short(a) for a in allowed)}"
        what += f"; did you mean {near[0]!r}?" if near else ""
    elif rule == "type":
        kinds = allowed if isinstance(allowed, list) else [allowed]
        what = f"{_short(value)} is not of type {' or '.join(kinds)}"
    elif rule in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        words = {"minimum": "below the minimum", "maximum": "above the maximum",
                 "exclusiveMinimum": "not above", "exclusiveMaximum": "not below"}
        what = f"{_short(value)} is {words[rule]} {allowed}"
    else:
        what = err.message if len(err.message) <= 160 else err.message[:157] + "..."
    return [f"{_where(path, sources)}{_dotted(path)}: {what}"]


def problems(config: dict, schema: dict, sources: list[tuple[str, str | None, dict]] = ()) -> list[str]:
    """Every problem of ``config`` at once, one line each: the file and line that set the key
    (``sources``: ``(name, file or None, its mapping)`` in the order they were layered), the key
    path, the value, what is allowed, and a did-you-mean for a near-miss key or value. Schema
    problems first, then the combination checks (on the config with its defaults filled in)."""
    import jsonschema

    found = []
    for err in sorted(jsonschema.Draft202012Validator(schema).iter_errors(config),
                      key=lambda e: [str(p) for p in e.absolute_path]):
        found += _describe(err, sources)
    filled = fill_defaults(copy.deepcopy(config), schema)
    try:
        found += combination_problems(filled) + sweep_problems(filled, schema)
    except Exception:  # noqa: BLE001 - a config the schema refused may break a combination check
        if not found:
            raise
    return found


def all_encoders(config: dict, route: str = "") -> dict[str, dict]:
    """Every encoder the config can train: the named ones and the sweep's (``route="semantic_"``:
    the semantic encoders)."""
    return {**(config.get(f"{route}encoders") or {}), **sweep_encoders(config, route)}


def frontier_encoders(config: dict, route: str = "") -> list[str]:
    """Encoders on a subject's frontier: the trained named ones, the sweep, and their teachers."""
    encoders = all_encoders(config, route)
    named = encoder_names(config) if not route else sorted(config.get(f"{route}encoders") or {})
    names = set(named) | set(sweep_encoders(config, route))
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


# --- python -m braid.config FILE...: a config checked before Snakemake reads it -----------------


def read_layer(path: str | Path) -> dict:
    """One config file as a mapping; an unreadable, malformed or empty file is named with its line."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise BraidError(f"{path}: cannot be read ({err.strerror})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise BraidError(f"{where}: not valid YAML: {problem} (check the indentation there: spaces only, "
                         "a space after each ':', brackets and quotes closed)") from None
    if not isinstance(data, dict):
        what = "empty" if data is None else f"a {type(data).__name__}, not a mapping of settings"
        raise BraidError(f"{path}: the file is {what}; a config holds settings at its top level, "
                         "e.g. `subjects: [1]`")
    return data


def main(argv: list[str] | None = None) -> int:
    """Check config files as the workflow layers them over config/config.yaml; print every problem."""
    import argparse
    import sys

    import yaml

    parser = argparse.ArgumentParser(prog="python -m braid.config",
                                     description="Check BRAID config files (layered in order over config/config.yaml).")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    root = Path(__file__).resolve().parents[2] / "config"
    schema = yaml.safe_load((root / "schema.yaml").read_text())
    base = yaml.safe_load((root / "config.yaml").read_text())
    sources = [("config/config.yaml", str(root / "config.yaml"), base)]
    found = []
    for f in args.files:
        try:
            sources.append((f, f, read_layer(f)))
        except BraidError as err:
            found.append(str(err))
    if not found:
        found = problems(layered(base, [data for _, _, data in sources[1:]], schema), schema, sources)
    for line in found:
        print(line, file=sys.stderr)
    if not found:
        print(f"config ok: {', '.join(args.files)}")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
