# The semantic route: COCO captions of every NSD image (a local rule: the network is on the
# submit host), the model's text conditioning of each image's captions in one cache per model
# identity shared by all subjects (like the latents), ROI-masked betas of the semantic ROI,
# semantic encoders of every kind, and per subject their scores in embedding space, the
# retrieval bank and the semantic frontier. Rules exist only when semantic_encoders is not empty.

if SEMANTIC:

    rule captions_fetch:
        """COCO 2017 captions of every NSD image into one table (nsd_id, coco_id, coco_split,
        caption_index, caption): from the synthetic NSD, a local folder or zip, or COCO's
        annotations_trainval2017.zip downloaded here (resumable; only its caption members are read)."""
        input:
            stim_info=fetched(nsd_file(braid.nsd.STIM_INFO)),
            sources=[*fetch_sources(braid.nsd.STIM_INFO), *captions_source_files()],
            code=script_code("captions_fetch"),
        output:
            CAPTIONS,
        log:
            "logs/captions/captions_fetch.log",
        benchmark:
            "logs/benchmark/captions_fetch/captions.tsv"
        localrule: True
        conda:
            "../../envs/braid.yaml"
        params:
            source=CAPTIONS_SOURCE,
            download="resources/captions/annotations_trainval2017.zip",
        script:
            "../../scripts/captions_fetch.py"

    use rule betas_mask as betas_mask_semantic with:
        input:
            sessions=lambda wc: fetched(list(get_session_files(wc).values())),
            rois=lambda wc: fetched(list(get_roi_files(wc, "semantic_roi").values())),
            expdesign=fetched(nsd_file(braid.nsd.EXPDESIGN)),
            sources=lambda wc: get_betas_sources(wc, "semantic_roi"),
            code=script_code("betas_mask"),
        output:
            betas=zarr_store("results/{subject}/semantic/betas.zarr"),
            trials="results/{subject}/semantic/trials.parquet",
        log:
            "logs/{subject}/semantic/betas.log",
        benchmark:
            "logs/benchmark/betas_mask_semantic/{subject}/betas.tsv"
        params:
            sessions=lambda wc: as_json(get_session_files(wc)),
            rois=lambda wc: as_json(get_roi_files(wc, "semantic_roi")),
            roi_labels=as_json(config["semantic_roi"]),
            split=as_json(config["split"]),
            betas=as_json(config["betas"]),
            pilot_images=as_json(config["pilot_images"]),

    rule semantic_encode:
        """Add the text embeddings of the subject's images (every captioned image with semantic.bank
        all-but-test) to the shared cache; write the subject's manifest."""
        input:
            captions=CAPTIONS,
            expdesign=fetched(nsd_file(braid.nsd.EXPDESIGN)),
            sources=fetch_sources(braid.nsd.EXPDESIGN),
            model=MODEL_DIR,
            code=script_code("semantic_encode"),
        output:
            "results/{subject}/text_embeddings.json",
        log:
            "logs/{subject}/semantic_encode.log",
        benchmark:
            "logs/benchmark/semantic_encode/{subject}/semantic_encode.tsv"
        conda:
            "../../envs/braid.yaml"
        threads: 8
        resources:
            mem_mb=mem_semantic_encode,
            runtime=240,
            gpu=GPU,
        params:
            store=TEXT_STORE,
            identity=as_json(TEXT_IDENTITY),
            dtype=config["semantic"]["text_dtype"],
            variant=config["model"]["variant"],
            shown=as_json(SHOWN),
            every_image=config["semantic"]["bank"] == "all-but-test",
        script:
            "../../scripts/semantic_encode.py"

    rule semantic_bank:
        """The subject's retrieval bank: captions of images never in its test split, with their pooled embeddings."""
        input:
            embeddings="results/{subject}/text_embeddings.json",
            captions=CAPTIONS,
            trials="results/{subject}/semantic/trials.parquet",
            code=script_code("semantic_bank"),
        output:
            zarr_store("results/{subject}/semantic/bank.zarr"),
        log:
            "logs/{subject}/semantic/bank.log",
        benchmark:
            "logs/benchmark/semantic_bank/{subject}/bank.tsv"
        conda:
            "../../envs/braid.yaml"
        params:
            mode=config["semantic"]["bank"],
        script:
            "../../scripts/semantic_bank.py"

    rule semantic_train:
        """Fit one semantic encoder per subject: semantic-ROI voxels -> the text conditioning target."""
        input:
            betas=zarr_store("results/{subject}/semantic/betas.zarr"),
            trials="results/{subject}/semantic/trials.parquet",
            embeddings="results/{subject}/text_embeddings.json",
            teacher=get_semantic_teacher,
            ncsnr=get_semantic_ncsnr,
            code=script_code("semantic_train"),
        output:
            model="results/{subject}/semantic/{encoder}/encoder.safetensors",
            config="results/{subject}/semantic/{encoder}/encoder.json",
            history="results/{subject}/semantic/{encoder}/history.csv",
            plot="results/{subject}/semantic/{encoder}/loss.png",
            predictions=zarr_store("results/{subject}/semantic/{encoder}/predictions.zarr"),
        log:
            "logs/{subject}/semantic/{encoder}/train.log",
        benchmark:
            "logs/benchmark/semantic_train/{subject}/{encoder}/train.tsv"
        conda:
            "../../envs/braid.yaml"
        threads: 8
        resources:
            mem_mb=mem_semantic_train,
            runtime=720,
            gpu=GPU,
        params:
            spec=lambda wc: as_json(semantic_spec(wc.encoder)),
        script:
            "../../scripts/semantic_train.py"

    if NSD["source"] == "synthetic":

        rule semantic_oracle:
            """Synthetic data only: the best linear decoder of the pooled embedding from the semantic ROI."""
            input:
                oracle=lambda wc: f"{SYNTHETIC_ROOT}/{braid.synthetic.oracle_key(subject_number(wc.subject), 'semantic')}",
                sessions=lambda wc: fetched(list(get_session_files(wc).values())),
                rois=lambda wc: fetched(list(get_roi_files(wc, "semantic_roi").values())),
                expdesign=fetched(nsd_file(braid.nsd.EXPDESIGN)),
                sources=lambda wc: get_betas_sources(wc, "semantic_roi"),
                trials="results/{subject}/semantic/trials.parquet",
                code=script_code("semantic_oracle"),
            output:
                zarr_store("results/{subject}/semantic/oracle_predictions.zarr"),
            log:
                "logs/{subject}/semantic/oracle.log",
            benchmark:
                "logs/benchmark/semantic_oracle/{subject}/oracle.tsv"
            conda:
                "../../envs/braid.yaml"
            params:
                sessions=lambda wc: as_json(get_session_files(wc)),
                rois=lambda wc: as_json(get_roi_files(wc, "semantic_roi")),
                roi_labels=as_json(config["semantic_roi"]),
            script:
                "../../scripts/semantic_oracle.py"

    rule semantic_frontier:
        """Per subject: every semantic encoder scored in embedding space (pooled r, 2-way, caption
        retrieval, category accuracy), the nearest bank caption of each test prediction, and the
        semantic frontier."""
        input:
            predictions=expand(
                zarr_store("results/{{subject}}/semantic/{encoder}/predictions.zarr"), encoder=SEMANTIC_FRONTIER
            ),
            oracle=(
                [zarr_store("results/{subject}/semantic/oracle_predictions.zarr")]
                if NSD["source"] == "synthetic"
                else []
            ),
            embeddings="results/{subject}/text_embeddings.json",
            trials="results/{subject}/semantic/trials.parquet",
            stim_info=fetched(nsd_file(braid.nsd.STIM_INFO)),
            bank=zarr_store("results/{subject}/semantic/bank.zarr"),
            code=script_code("semantic_frontier"),
        output:
            table="results/{subject}/semantic/frontier.csv",
            plot=report(
                "results/{subject}/semantic/frontier.png",
                caption="../report/semantic_frontier.rst",
                category="Summary",
                labels={"subject": "{subject}", "figure": "semantic frontier"},
            ),
            retrieved="results/{subject}/semantic/retrieved.parquet",
        log:
            "logs/{subject}/semantic/frontier.log",
        benchmark:
            "logs/benchmark/semantic_frontier/{subject}/frontier.tsv"
        conda:
            "../../envs/braid.yaml"
        params:
            encoders=SEMANTIC_FRONTIER,
            reference=config["semantic"]["reference"],
        script:
            "../../scripts/semantic_frontier.py"
