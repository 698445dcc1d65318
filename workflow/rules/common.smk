# Helpers shared by the rules files, and the config checks that run before any job.

import json
import sys
from pathlib import Path

from snakemake.common.configfile import load_configfile
from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

min_version("9.0")

# BRAID's own folder (this file is workflow/rules/common.smk in it): not workflow.basedir, which
# is the host's folder when BRAID is used as a module (`module braid: snakefile: ...`).
BRAID_ROOT = Path(str(workflow.current_basedir)).resolve().parents[1]
# The library lives in src/braid. Snakemake tracks this checkout's modules as the jobs' code
# inputs (script_code), so every job must run them, not another braid that the environment has
# installed (an editable install of another clone, a pip-installed release): src/ goes first on
# sys.path here and on PYTHONPATH for the jobs, which inherit it in .venv, a conda env, an
# Apptainer image or on a SLURM node; braid.common.snakemake_job refuses a job whose braid is not
# this checkout's.
sys.path.insert(0, str(BRAID_ROOT / "src"))

import braid.conditioning
import braid.config
import braid.encoder
import braid.metric_networks
import braid.nsd
import braid.resources
import braid.synthetic
from braid.common import BraidError, pythonpath_first, subject_label, subject_number

pythonpath_first(BRAID_ROOT / "src")

# Mappings of user-chosen names (roi, encoders) are replaced, not merged, by a --configfile or
# --config that names them: a config gets exactly the ROIs and encoders it lists. A config that
# names its encoders and no sweep gets no sweep (the default's sweep is over the default's encoders).
_SCHEMA = load_configfile(str(BRAID_ROOT / "config" / "schema.yaml"))
# where each setting came from, for the messages: the default, each --configfile, --config
_SOURCES = [
    (
        "config/config.yaml",
        str(BRAID_ROOT / "config" / "config.yaml"),
        load_configfile(str(BRAID_ROOT / "config" / "config.yaml")),
    ),
    *((str(f), str(f), load_configfile(f)) for f in workflow.config_settings.configfiles),
    ("--config", None, dict(workflow.config_settings.config)),
]
braid.config.apply_layers(config, [data for _, _, data in _SOURCES[1:]], _SCHEMA)
# every problem at once, each with its file and line, before any job; then the schema's defaults
_PROBLEMS = braid.config.problems(config, _SCHEMA, _SOURCES)
if _PROBLEMS:
    raise WorkflowError(f"config: {len(_PROBLEMS)} problem(s), nothing was run:\n  " + "\n  ".join(_PROBLEMS))
validate(config, "../../config/schema.yaml")


# the image every job runs in under --sdm apptainer (envs/braid.def); none by default
if config["container"]:

    container: config["container"]


wildcard_constraints:
    subject=r"subj0[1-8]",
    encoder=r"[A-Za-z0-9_-]+",
    strength=r"[0-9.]+",
    guidance=r"[0-9.]+",
    seed=r"[0-9]+",
    conditioning=r"none|true-caption|(predicted|retrieved)-[A-Za-z0-9_-]+",


NSD = config["nsd"]
SYNTHETIC_ROOT = "resources/synthetic_nsd"
SYNTHETIC_STIMULUS_CONFIG = braid.synthetic.stimulus_config(config["synthetic"])
FETCH_SOURCE = SYNTHETIC_ROOT if NSD["source"] == "synthetic" else NSD["source"]
# how fetch jobs reach S3 (keywords of braid.transfer.s3_client); a dict param, compared by sorted repr
S3_SETTINGS = {k: NSD[k] for k in ("anonymous", "endpoint_url", "profile", "region")}
MODEL_DIR = braid.config.model_dir(config["model"])
MODEL_IS_LOCAL = braid.config.model_is_local(config["model"])
# One latent cache per model identity (model, revision, VAE, image size, dtype, preprocessing),
# shared by every subject and encoder; each subject's latents_encode adds the ids it lacks.
LATENT_IDENTITY = braid.config.latent_identity(config["model"], SYNTHETIC_STIMULUS_CONFIG)
LATENT_STORE = f"results/latents/{braid.config.latent_store_name(config['model'], SYNTHETIC_STIMULUS_CONFIG)}.zarr"
SUBJECTS = [subject_label(s) for s in config["subjects"]]
STRENGTHS = [braid.config.strength_label(s) for s in config["reconstruct"]["strengths"]]
ENCODERS = braid.config.encoder_names(config)  # named encoders: trained, reconstructed, evaluated
ALL_ENCODERS = braid.config.all_encoders(config)  # and the sweep's, for the frontier
FRONTIER_ENCODERS = braid.config.frontier_encoders(config)
# the semantic route (rules/semantic.smk): encoders of the text conditioning of each image's captions
SEMANTIC = bool(config["semantic_encoders"])
SEMANTIC_ENCODERS = braid.config.all_encoders(config, "semantic_")
SEMANTIC_FRONTIER = braid.config.frontier_encoders(config, "semantic_")
TEXT_STORE = "results/text_embeddings/{}.zarr".format(
    braid.config.text_store_name(
        config["model"], config["semantic"]["text_dtype"], config["captions"]["source"], SYNTHETIC_STIMULUS_CONFIG
    )
)
TEXT_IDENTITY = braid.config.text_identity(
    config["model"], config["semantic"]["text_dtype"], config["captions"]["source"], SYNTHETIC_STIMULUS_CONFIG
)
# the ROI files and labels fetched (ROI-only) for both routes
FETCH_ROIS = braid.config.fetch_rois(config) if SEMANTIC else config["roi"]
REFERENCES = sorted(config["evaluate"]["references"])  # true-latent / mean-latent rows, scored like encoders
SEEDS = [str(s) for s in config["reconstruct"]["seeds"]]
GUIDANCES = [braid.config.strength_label(g) for g in config["reconstruct"]["guidance_scales"]]
# img2img's text conditioning (braid.conditioning): `none` (the fixed prompt) for every latent source;
# the semantic modes for the sources reconstruct.conditioning.latent names
CONDITIONING = config["reconstruct"]["conditioning"]
SEMANTIC_CONDITIONINGS = braid.conditioning.names(CONDITIONING["modes"], CONDITIONING["semantic"]) if SEMANTIC else []


CONDITIONING_STRENGTHS = [
    braid.config.strength_label(s) for s in (CONDITIONING.get("strengths") or config["reconstruct"]["strengths"])
]


def conditionings_of(source, strength=None):
    """A latent source's conditionings (at ``strength``: the semantic modes run at CONDITIONING_STRENGTHS)."""
    if source not in CONDITIONING["latent"] or (strength is not None and strength not in CONDITIONING_STRENGTHS):
        return ["none"]
    return ["none", *SEMANTIC_CONDITIONINGS]


def runs_of(source):
    """A latent source's reconstructions: decode-only, and img2img per conditioning, guidance, strength and seed."""
    return [
        "decode",
        *(
            f"{c}/guidance-{g}/strength-{s}/seed-{k}"
            for s in STRENGTHS
            for c in conditionings_of(source, s)
            for g in GUIDANCES
            for k in SEEDS
        ),
    ]


# network -> its weights folder (resources/metric_weights/<pretrained|random-seedN>/<network>)
METRIC_WEIGHTS = braid.config.metric_weights(config["evaluate"])


def as_json(value):
    """Params are compared by repr(): a sorted JSON string reruns a job only when a value changes."""
    return json.dumps(value, sort_keys=True)


def without(block, *keys):
    """A config block without ``keys``: settings that cannot change a result (batch sizes) are not
    params, so that changing them reruns nothing. Scripts read those, and ``device``, from the config."""
    return {k: v for k, v in block.items() if k not in keys}


def encoder_spec(name):
    """The settings that define encoder ``name`` (its kind's keys, defaults filled in)."""
    return braid.encoder.spec(ALL_ENCODERS[name])


def get_teacher(wildcards):
    teacher = ALL_ENCODERS[wildcards.encoder].get("teacher")
    return f"results/{wildcards.subject}/{teacher}/encoder.safetensors" if teacher else []


def ncsnr_key(wildcards):
    """NSD's ncsnr volume, for an encoder that selects voxels by it (a whole-object fetch); else None."""
    if braid.encoder.spec(ALL_ENCODERS[wildcards.encoder])["voxels"] != "ncsnr":
        return None
    return braid.nsd.ncsnr_key(subject_number(wildcards.subject), NSD["resolution"], NSD["beta_version"])


def get_ncsnr(wildcards):
    key = ncsnr_key(wildcards)
    return fetched(nsd_file(key)) if key else []


def get_ncsnr_source(wildcards):
    key = ncsnr_key(wildcards)
    return fetch_sources(key) if key else []


def zarr_store(path):
    """A Zarr store as a rule's input or output, by its root metadata file ``zarr.json``.

    Not ``directory()``: Snakemake would put a ``.snakemake_timestamp`` file inside the store,
    which zarr then reports as a stray object. Scripts pass ``braid.common.store_path()`` of it.
    """
    return f"{path}/zarr.json"


def script_code(script):
    """The library code that scripts/<script>.py may run, as inputs: every braid module it imports,
    directly or through others (braid.config.code_modules). Snakemake tracks the script, not what it
    imports: with these inputs, editing a module reruns each stage that can run it."""
    folder = BRAID_ROOT / "src" / "braid"
    imported = braid.config.braid_imports(BRAID_ROOT / "scripts" / f"{script}.py", folder)
    return [str(folder / f"{m}.py") for m in braid.config.code_modules(imported, folder)]


def nsd_file(key):
    return f"resources/nsd/{key}"


def mirror_file(key):
    """The source file a fetch reads, when the source is on this machine (synthetic or a mirror)."""
    return [] if FETCH_SOURCE.startswith("s3://") else str(Path(FETCH_SOURCE) / key)


def fetch_source(mirror, key):
    """The source a fetch job reads: the bucket URL, or the local mirror's root derived from its input file."""
    return FETCH_SOURCE if FETCH_SOURCE.startswith("s3://") else str(mirror)[: -len(key) - 1]


ROI_ONLY = NSD["fetch"] == "roi"


def fetched_file(key):
    """Where a betas file or the stimuli land: sparse ROI-only/row-only copies, or whole objects."""
    return f"resources/nsd_roi/{key}" if ROI_ONLY else nsd_file(key)


def stimuli_file(subject):
    """The stimuli a subject's jobs read: the whole imgBrick, or (ROI-only fetching) a sparse copy
    of the subject's own rows, so that adding a subject never changes an input of another's jobs."""
    return f"resources/nsd_roi/{subject}/{braid.nsd.STIMULI}" if ROI_ONLY else nsd_file(braid.nsd.STIMULI)


# Fetched files as inputs of the jobs that read them. A fetched file is a copy of its source,
# verified against it (size, ETag, chunk checksums) and named by its key: what it holds is fixed by
# the source, not by the code that moved it. Its readers take it as ancient() and take the source
# itself as an input where it is a file on this machine (the synthetic NSD, a mirror). So they rerun
# when the source or the key changes, and not when a fetch job reruns and writes the same bytes
# again (an edit of braid/transfer.py, a deleted copy fetched anew).
def fetched(path):
    return ancient(path)


def fetch_sources(*keys):
    """The local source files of NSD ``keys`` (none when the source is the bucket)."""
    return [] if FETCH_SOURCE.startswith("s3://") else [str(Path(FETCH_SOURCE) / k) for k in keys]


def get_betas_sources(wildcards, rois="roi"):
    """The sources of what betas_mask and evaluate_oracle read: the design, the sessions, the ROI files
    (``rois``: the config key of the ROI set)."""
    s = subject_number(wildcards.subject)
    return fetch_sources(
        braid.nsd.EXPDESIGN,
        *(braid.nsd.betas_key(s, n, NSD["resolution"], NSD["beta_version"]) for n in sorted(config["sessions"])),
        *(braid.nsd.roi_key(s, name, NSD["resolution"]) for name in sorted(config[rois])),
    )


def get_session_files(wildcards):
    s = int(wildcards.subject[4:])
    return {
        str(n): fetched_file(braid.nsd.betas_key(s, n, NSD["resolution"], NSD["beta_version"]))
        for n in sorted(config["sessions"])
    }


def get_betas_roi_inputs(wildcards):
    """ROI files of the subject whose betas file is being fetched ROI-only."""
    subject = int(wildcards.path.split("/")[1][4:])
    return [nsd_file(braid.nsd.roi_key(subject, name, NSD["resolution"])) for name in sorted(FETCH_ROIS)]


def get_manifests(wildcards):
    if not ROI_ONLY:
        return []
    return [
        f"{path}.manifest.json" for path in [*get_session_files(wildcards).values(), stimuli_file(wildcards.subject)]
    ]


def get_roi_files(wildcards, rois="roi"):
    """ROI file name -> fetched file of the subject, for the ROI set ``rois`` (a config key)."""
    s = int(wildcards.subject[4:])
    return {name: nsd_file(braid.nsd.roi_key(s, name, NSD["resolution"])) for name in sorted(config[rois])}


def get_oracle_metrics():
    if NSD["source"] != "synthetic":
        return []
    return expand("results/{subject}/oracle_metrics.csv", subject=SUBJECTS)


def get_image_metric_files():
    return [
        f"results/{subject}/{source}/{run}/image_metrics.parquet"
        for subject in SUBJECTS
        for source in [*ENCODERS, *REFERENCES]
        for run in runs_of(source)
    ]


def get_grid_images(wildcards):
    """Image folders of a subject's grid at one strength: every source decoded and through img2img
    in each of its conditionings (first guidance scale, first seed)."""
    img2img = f"guidance-{GUIDANCES[0]}/strength-{wildcards.strength}/seed-{SEEDS[0]}"
    out = {}
    for source in [*ENCODERS, *REFERENCES]:
        out[f"{source}|decode"] = f"results/{wildcards.subject}/{source}/decode/images"
        for c in conditionings_of(source, wildcards.strength):
            out[f"{source}|{c}"] = f"results/{wildcards.subject}/{source}/{c}/{img2img}/images"
    return out


def get_grid_captions(wildcards):
    """The captions of the semantic conditionings (printed under their rows)."""
    if wildcards.strength not in CONDITIONING_STRENGTHS:
        return []
    return [f"results/{wildcards.subject}/conditioning/{c}.csv" for c in SEMANTIC_CONDITIONINGS]


def get_run_conditioning(wildcards):
    """The conditioning store of a semantic img2img run (its semantic encoder's parameters count)."""
    conditioning = wildcards.run.split("/")[0]
    if wildcards.run == "decode" or conditioning == "none":
        return []
    return zarr_store(f"results/{wildcards.subject}/conditioning/{conditioning}.zarr")


def get_conditioning(wildcards):
    """The conditioning store an img2img job reads (none for the fixed prompt)."""
    if wildcards.conditioning == "none":
        return []
    return zarr_store(f"results/{wildcards.subject}/conditioning/{wildcards.conditioning}.zarr")


def get_conditioning_inputs(wildcards):
    """What reconstruct_conditioning reads: the text cache and captions; a semantic encoder's
    predictions (predicted, retrieved); the retrieval bank and the model's text encoders (retrieved)."""
    mode, encoder = braid.conditioning.parse(wildcards.conditioning)
    out = {"cache": f"results/{wildcards.subject}/text_embeddings.json", "captions": CAPTIONS}
    if encoder:
        out["predictions"] = zarr_store(f"results/{wildcards.subject}/semantic/{encoder}/predictions.zarr")
    if mode == "retrieved":
        out["bank"] = zarr_store(f"results/{wildcards.subject}/semantic/bank.zarr")
        out["model"] = MODEL_DIR
    return out


def get_final_outputs():
    manifests = expand("results/{subject}/fetch_manifest.csv", subject=SUBJECTS) if ROI_ONLY else []
    return [
        *manifests,
        "results/summary.csv",
        "results/summary.png",
        "results/summary.html",
        "results/frontier_metrics.csv",
        "results/frontier_images.png",
        *expand("results/{subject}/{encoder}/loss.png", subject=SUBJECTS, encoder=ENCODERS),
        *expand("results/{subject}/latent_stats.png", subject=SUBJECTS),
        *expand("results/{subject}/frontier.png", subject=SUBJECTS),
        *expand("results/{subject}/grid-strength-{strength}.png", subject=SUBJECTS, strength=STRENGTHS),
        *(expand("results/{subject}/semantic/frontier.png", subject=SUBJECTS) if SEMANTIC else []),
    ]


# The semantic route (rules/semantic.smk): its files, settings and resources.
CAPTIONS = "resources/captions/nsd_captions.parquet"
CAPTIONS_SOURCE = config["captions"]["source"]
CAPTIONS_IS_URL = CAPTIONS_SOURCE.startswith(("http://", "https://"))


def captions_source_files():
    """The local files the caption table is read from (none for a URL: the job downloads it)."""
    if CAPTIONS_SOURCE == "synthetic":
        return [f"{SYNTHETIC_ROOT}/{key}" for key in braid.synthetic.CAPTION_KEYS.values()]
    return [] if CAPTIONS_IS_URL else [CAPTIONS_SOURCE]


def semantic_spec(name):
    """A semantic encoder's settings: its kind's, its target, and (tokens) the number of components."""
    cfg = dict(SEMANTIC_ENCODERS[name])
    target = cfg.pop("target", "pooled")
    out = braid.encoder.spec(cfg) | {"target": target}
    if target == "tokens":
        out["token_components"] = config["semantic"]["token_components"]
    return out


# the text encoders' weights (CLIP-L and bigG: about 0.25 and 1.4 GB in float16), until on disk (then measured)
TEXT_WIDTH = 64 if config["model"]["source"] in ("tiny", "tiny-trained") else 2048


def mem_semantic_encode(wildcards, attempt):
    weights = sum(
        braid.resources.weights_bytes(Path(MODEL_DIR) / sub, config["model"]["variant"]) or estimate
        for sub, estimate in (("text_encoder", 250 * 2**20), ("text_encoder_2", 1400 * 2**20))
    )
    scale = 2 if config["semantic"]["text_dtype"] == "float32" else 1  # fp16 files loaded in float32
    return braid.resources.model_job_mb(scale * weights, 1, 64) * attempt


def mem_semantic_train(wildcards, attempt):
    """As an encoder's (closed form or gradient), plus (target tokens) the training images' token
    embeddings in float32 and the components fitted on them."""
    shape = braid.resources.zarr_shape(f"results/{wildcards.subject}/semantic/betas.zarr/betas")
    trials, voxels = shape or (
        len(config["sessions"]) * TRIALS_PER_SESSION,
        VOXELS_ESTIMATE[subject_number(wildcards.subject)],
    )
    sp = semantic_spec(wildcards.encoder)
    n_in = min(sp["k"], voxels) if sp["voxels"] != "all" and sp["k"] else voxels
    outputs = 1280 + (sp.get("token_components") or 0)
    if sp["kind"] in ("ridge", "lowrank"):
        mb = braid.resources.ridge_path_mb(trials, n_in, outputs)
    else:
        n_params = braid.resources.encoder_parameters(braid.encoder.architecture(sp), n_in, outputs)
        mb = braid.resources.encoder_train_mb(trials, voxels, outputs, n_params)
    if sp["target"] == "tokens":  # at most one image per trial
        mb += trials * 77 * TEXT_WIDTH * 4 * 1.5 / 2**20
    return int(mb) * attempt


def mem_conditioning(wildcards, attempt):
    """The test images' conditioning (tokens in float32, three copies at most) and, to encode the
    retrieved captions, the text encoders (as semantic_encode)."""
    images = 1000 if NSD["source"] != "synthetic" else config["synthetic"]["images_per_subject"]
    mb = int(images * 77 * TEXT_WIDTH * 4 * 3 / 2**20) + 1024
    if wildcards.conditioning.startswith("retrieved-"):
        mb += mem_semantic_encode(wildcards, 1)
    return mb * attempt


def get_semantic_teacher(wildcards):
    teacher = SEMANTIC_ENCODERS[wildcards.encoder].get("teacher")
    return f"results/{wildcards.subject}/semantic/{teacher}/encoder.safetensors" if teacher else []


def get_semantic_ncsnr(wildcards):
    if semantic_spec(wildcards.encoder)["voxels"] != "ncsnr":
        return []
    return fetched(
        nsd_file(braid.nsd.ncsnr_key(subject_number(wildcards.subject), NSD["resolution"], NSD["beta_version"]))
    )


# Resources: threads, mem_mb and runtime per rule, sized from what the job will hold
# (braid.resources); `gpu` for the rules that use a GPU (none when config device is "cpu").
# A profile's set-threads / set-resources override them; on SLURM, threads become
# --cpus-per-task, mem_mb --mem, runtime (minutes) -t and gpu --gpus. Memory is measured from the
# inputs when the job is scheduled (they exist by then) and estimated from the config before
# (what a dry run shows). Each retry asks for `attempt` times the memory.
GPU = 0 if config["device"] == "cpu" else 1
LATENT_DIM = 4 * (config["model"]["image_size"] // 8) ** 2
if NSD["source"] == "synthetic":
    TRIALS_PER_SESSION = config["synthetic"]["trials_per_session"]
    _volume = config["synthetic"]["volume"]
    VOXELS_ESTIMATE = {
        s: round(_volume[0] * _volume[1] * _volume[2] * config["synthetic"]["roi_fraction"]) for s in range(1, 9)
    }
else:
    TRIALS_PER_SESSION = braid.nsd.TRIALS_PER_SESSION
    VOXELS_ESTIMATE = braid.nsd.NSDGENERAL_VOXELS
# which images a subject's jobs fetch and encode: those its configured sessions show, or a pilot's
# (a param of nsd_fetch_stimuli_rows and latents_encode, so that other sessions or a pilot rerun them)
SHOWN = {
    "sessions": sorted(config["sessions"]),
    "pilot_images": config["pilot_images"],
    "trials_per_session": TRIALS_PER_SESSION,
}
# weights a job loads (whole pipeline "", or its VAE), until the model is on disk (then measured):
# the tiny models are a few MB; SSD-1B's fp16 files are about 4.5 GB, SDXL's VAE 0.2-0.35 GB
if config["model"]["source"] in ("tiny", "tiny-trained"):
    MODEL_BYTES_ESTIMATE = {"": 200 * 2**20, "vae": 200 * 2**20}
else:
    MODEL_BYTES_ESTIMATE = {"": 5 * 2**30, "vae": 400 * 2**20}
METRIC_BYTES_ESTIMATE = 2 * 2**30


def mem_betas_mask(wildcards, attempt):
    sessions = get_session_files(wildcards)
    voxels = (
        braid.resources.roi_voxels(get_roi_files(wildcards), config["roi"])
        or VOXELS_ESTIMATE[subject_number(wildcards.subject)]
    )
    trials = braid.resources.session_trials(next(iter(sessions.values()))) or TRIALS_PER_SESSION
    average = config["betas"]["trials"] != "single"
    return braid.resources.betas_mask_mb(len(sessions), trials, voxels, average) * attempt


def mem_encoder_train(wildcards, attempt):
    shape = braid.resources.zarr_shape(f"results/{wildcards.subject}/betas.zarr/betas")
    trials, voxels = shape or (
        len(config["sessions"]) * TRIALS_PER_SESSION,
        VOXELS_ESTIMATE[subject_number(wildcards.subject)],
    )
    sp = encoder_spec(wildcards.encoder)
    n_in = min(sp["k"], voxels) if sp["voxels"] != "all" and sp["k"] else voxels
    if sp["kind"] in ("ridge", "lowrank"):
        return braid.resources.ridge_path_mb(trials, n_in, LATENT_DIM) * attempt
    n_params = braid.resources.encoder_parameters(braid.encoder.architecture(sp), n_in, LATENT_DIM)
    return braid.resources.encoder_train_mb(trials, voxels, LATENT_DIM, n_params) * attempt


def model_bytes(subfolder=""):
    found = braid.resources.weights_bytes(Path(MODEL_DIR) / subfolder, config["model"]["variant"])
    return MODEL_BYTES_ESTIMATE[subfolder] if found is None else found


def mem_model_job(subfolder="", batch=1):
    """mem_mb of a job that loads the model (or its `subfolder`) and runs its VAE on `batch` images."""

    def mem(wildcards, attempt):
        size = config["model"]["image_size"]
        per_pixel = braid.resources.VAE_BYTES_PER_PIXEL
        return braid.resources.model_job_mb(model_bytes(subfolder), batch, size, per_pixel) * attempt

    return mem


def mem_metrics(wildcards, attempt):
    """The metric networks' weights, and a batch of 512-pixel images for them."""
    found = [braid.resources.weights_bytes(path) for path in METRIC_WEIGHTS.values()]
    weights = METRIC_BYTES_ESTIMATE if None in found else sum(found)
    return braid.resources.model_job_mb(weights, config["evaluate"]["batch_size"], 512) * attempt


def start_slurm_checks():
    """Under the SLURM executor: fit threads to the largest node of each job's partition (one
    warning), refuse jobs that no node can run (memory, GPUs, an explicit cpus_per_task) before
    submitting any, and watch this run's pending jobs for ones SLURM will never start (braid.slurm)."""
    if getattr(workflow.executor_plugin, "name", None) != "slurm":
        return
    import braid.slurm

    try:
        partitions = braid.slurm.cluster_partitions()
        jobs = [job for job in workflow.dag.needrun_jobs() if not job.is_local]
        fits = braid.slurm.fit_threads(jobs, partitions)
        for rule_name, (_, cap, _) in fits.items():
            workflow.get_rule(rule_name).resources["_cores"] = cap  # what `threads:` set; retries keep it
        if fits:
            for job in jobs:
                job._resources = None  # Snakemake caches a job's resources: recomputed with the fitted threads
            logger.warning(braid.slurm.fit_message(fits))
        # memory sized from inputs not yet written is an estimate: SLURM judges it at submission
        braid.slurm.preflight(jobs, partitions, check_memory=lambda job: all(Path(f).exists() for f in job.input))
    except BraidError as err:
        raise WorkflowError(str(err))
    braid.slurm.Watchdog(Path.cwd(), report=logger.error).start()


onstart:
    start_slurm_checks()
