# The diffusion model, into resources/models/<name>@<revision>: downloaded from the Hugging Face
# hub (a local rule: it runs where the network is, e.g. the login node) or, for the demo and
# tests, built offline as a tiny SSD-1B-shaped pipeline: with random weights (tiny), or trained
# on the synthetic stimuli and their captions (tiny-trained, a compute job of a few CPU minutes). Every later stage loads it from that
# folder with the hub offline (HF_HUB_OFFLINE=1 in their jobs). A model.source that is a local
# folder is used as it is: no rule writes it.

if config["model"]["source"] == "tiny-trained":

    rule model_train:
        """Train the tiny SSD-1B-shaped pipeline on the synthetic stimuli and their captions (braid.model_training)."""
        input:
            stimuli=f"{SYNTHETIC_ROOT}/{braid.nsd.STIMULI}",
            stim_info=f"{SYNTHETIC_ROOT}/{braid.nsd.STIM_INFO}",
            captions=[f"{SYNTHETIC_ROOT}/{key}" for key in braid.synthetic.CAPTION_KEYS.values()],
            code=script_code("model_train"),
        output:
            directory(MODEL_DIR),
        log:
            "logs/model/train.log",
        benchmark:
            "logs/benchmark/model_train/model/train.tsv"
        conda:
            "../../envs/braid.yaml"
        threads: 4
        resources:
            mem_mb=4096,
            runtime=30,
        params:
            image_size=config["model"]["image_size"],
            recipe=as_json(braid.config.training_recipe(config["model"])),
            seed=config["model"]["seed"],
        script:
            "../../scripts/model_train.py"

elif not MODEL_IS_LOCAL:

    rule model_fetch:
        output:
            directory(MODEL_DIR),
        log:
            "logs/model/fetch.log",
        benchmark:
            "logs/benchmark/model_fetch/model/fetch.tsv"
        localrule: True
        conda:
            "../../envs/braid.yaml"
        params:
            # the model's identity, nothing else: a download reruns only when it names other weights
            model=as_json(braid.config.model_identity(config["model"])),
        script:
            "../../scripts/model_fetch.py"
