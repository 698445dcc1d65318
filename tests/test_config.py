"""Config files validate; config checks catch bad combinations; the conda env matches the package."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

import braid.config
import braid.encoder
import braid.metric_networks
from braid.common import BraidError

REPO = Path(__file__).resolve().parents[1]
SCHEMA = str(REPO / "config" / "schema.yaml")


# presets layered over the real config
LAYERS = {"nsd_literature.yaml": ["nsd_ssd1b.yaml", "nsd_literature.yaml"], "rehearsal.yaml": ["nsd_ssd1b.yaml", "rehearsal.yaml"]}


def load(name):
    layers = [yaml.safe_load((REPO / "config" / layer).read_text())
              for layer in LAYERS.get(name, [name] if name != "config.yaml" else [])]
    config = braid.config.layered(yaml.safe_load((REPO / "config" / "config.yaml").read_text()), layers,
                                  yaml.safe_load(Path(SCHEMA).read_text()))
    validate(config, SCHEMA)
    return config


def test_collections_are_the_schemas_named_mappings_and_are_replaced():
    schema = yaml.safe_load(Path(SCHEMA).read_text())
    assert braid.config.collection_keys(schema) == ["encoders", "roi", "semantic_encoders", "semantic_roi",
                                                    "semantic_sweep", "sweep"]
    config = {"roi": {"nsdgeneral": [1]}, "encoders": {"mlp": {"lr": 1}, "linear": {}}, "betas": {"trials": "single"}}
    layers = [{"roi": {"prf-visualrois": [1, 2]}, "betas": {"dtype": "float16"}}, {"encoders": {"ridge": {}}}]
    assert braid.config.replace_collections(config, layers, ["encoders", "roi"]) == ["encoders", "roi"]
    assert config["roi"] == {"prf-visualrois": [1, 2]} and config["encoders"] == {"ridge": {}}
    assert config["betas"] == {"trials": "single"}  # other mappings are Snakemake's to merge
    layers[0]["roi"]["prf-visualrois"].append(3)
    assert config["roi"] == {"prf-visualrois": [1, 2]}  # a copy, not the layer itself


def test_layered_deep_merges_mappings_and_replaces_collections():
    schema = yaml.safe_load(Path(SCHEMA).read_text())
    base = {"roi": {"nsdgeneral": [1]}, "encoders": {"mlp": {"lr": 1}}, "sweep": {"mlp": {"lr": [1, 2]}},
            "nsd": {"source": "s3://a", "fetch": "roi", "retry": {"attempts": 3, "wait": 1}}, "sessions": [1, 2]}
    layers = [{"nsd": {"retry": {"wait": 5}}, "sessions": [3]}, {"encoders": {"ridge": {}}, "nsd": {"source": "s3://b"}}]
    out = braid.config.layered(base, layers, schema)
    assert out["nsd"] == {"source": "s3://b", "fetch": "roi", "retry": {"attempts": 3, "wait": 5}}  # merged at depth
    assert out["sessions"] == [3]  # lists are replaced
    assert out["encoders"] == {"ridge": {}} and out["sweep"] == {}  # the default's sweep went with its encoders
    assert out["roi"] == {"nsdgeneral": [1]}
    assert base["nsd"]["source"] == "s3://a" and base["encoders"] == {"mlp": {"lr": 1}}  # inputs untouched
    kept = braid.config.layered(base, [{"encoders": {"ridge": {}}, "sweep": {"ridge": {"alpha": [1]}}}], schema)
    assert kept["sweep"] == {"ridge": {"alpha": [1]}}
    # the semantic route's collections follow the same rules
    base |= {"semantic_roi": {"streams": [5]}, "semantic_encoders": {"mlp": {}}, "semantic_sweep": {"mlp": {"lr": [1]}}}
    out = braid.config.layered(base, [{"semantic_roi": {"floc-faces": [1]}, "semantic_encoders": {"ridge": {}}}], schema)
    assert out["semantic_roi"] == {"floc-faces": [1]} and out["semantic_encoders"] == {"ridge": {}}
    assert out["semantic_sweep"] == {} and out["sweep"] == {"mlp": {"lr": [1, 2]}}
    # img2img's semantic conditioning names encoders: it goes with them, unless the layer sets it
    base["reconstruct"] = {"steps": 4, "conditioning": {"modes": ["predicted"], "latent": ["mlp"], "semantic": ["mlp"]}}
    out = braid.config.layered(base, [{"encoders": {"ridge": {}}}], schema)
    assert out["reconstruct"] == {"steps": 4, "conditioning": {}}
    mine = {"modes": ["true-caption"], "latent": ["ridge"]}
    out = braid.config.layered(base, [{"encoders": {"ridge": {}}}, {"reconstruct": {"conditioning": mine}}], schema)
    assert out["reconstruct"]["conditioning"] == mine | {"semantic": ["mlp"]}  # a mapping: merged
    assert braid.config.layered(base, [{"sessions": [1]}], schema)["reconstruct"] == base["reconstruct"]
    # named before the encoders, it goes with the default's encoders too (layers apply in order)
    out = braid.config.layered(base, [{"reconstruct": {"conditioning": mine}}, {"encoders": {"ridge": {}}}], schema)
    assert out["reconstruct"]["conditioning"] == {}
    # the modes' strengths go with reconstruct.strengths, unless named after them
    base["reconstruct"]["conditioning"]["strengths"] = [0.7]
    out = braid.config.layered(base, [{"reconstruct": {"strengths": [0.5]}}], schema)
    assert out["reconstruct"]["conditioning"]["strengths"] is None and out["reconstruct"]["strengths"] == [0.5]
    out = braid.config.layered(base, [{"reconstruct": {"strengths": [0.5, 0.9], "conditioning": {"strengths": [0.9]}}}],
                               schema)
    assert out["reconstruct"]["conditioning"]["strengths"] == [0.9]


@pytest.mark.parametrize("name", ["config.yaml", "nsd_ssd1b.yaml", "nsd_literature.yaml", "rehearsal.yaml"])
def test_shipped_configs_validate_and_pass_checks(name):
    config = load(name)
    braid.config.check(config)
    assert config["sweep"]  # both configs draw a frontier
    kinds = {braid.encoder.spec(cfg)["kind"] for cfg in braid.config.all_encoders(config).values()}
    assert kinds == {"mlp", "ridge", "lowrank", "student"}
    assert config["frontier"]["reference"] in braid.config.frontier_encoders(config)


def test_real_config_is_the_seed_design():
    config = load("nsd_ssd1b.yaml")
    mlp = braid.encoder.spec(config["encoders"]["mlp"])
    assert (mlp["kind"], mlp["hidden"], mlp["dropout"], mlp["lr"], mlp["weight_decay"], mlp["batch_size"], mlp["epochs"]) == (
        "mlp", [2048, 4096], 0.5, 1e-4, 0.0, 512, 200)
    assert mlp["k"] == 4657  # the seed's input dimension (85,069,824 parameters with 16,384 latents)
    assert config["model"]["source"] == "segmind/SSD-1B" and config["nsd"]["source"] == "s3://natural-scenes-dataset"
    assert (config["split"]["train"], config["split"]["val"], config["split"]["test"]) == (0.9, 0.05, 0.05)
    assert len(config["sessions"]) * 750 == 7500
    assert braid.config.encoder_names(config) == ["lowrank", "mlp", "ridge", "student"]


def test_the_rehearsal_keeps_every_real_shape_and_cuts_only_amounts():
    real, rehearsal = load("nsd_ssd1b.yaml"), load("rehearsal.yaml")
    same = ("resolution", "beta_version")
    assert {k: rehearsal["nsd"][k] for k in same} == {k: real["nsd"][k] for k in same}
    assert rehearsal["nsd"]["source"] == real["nsd"]["source"] and rehearsal["nsd"]["fetch"] == "roi"
    assert rehearsal["nsd"]["endpoint_url"].startswith("http://127.0.0.1:")  # loopback, never AWS
    assert rehearsal["roi"] == real["roi"] and rehearsal["subjects"] == real["subjects"]
    assert rehearsal["model"]["source"] == "ssd1b-architecture"
    for key in ("image_size", "variant", "dtype", "compile"):
        assert rehearsal["model"][key] == real["model"][key], key
    assert braid.config.encoder_names(rehearsal) == braid.config.encoder_names(real)
    for name, encoder in real["encoders"].items():
        cut = {k: v for k, v in rehearsal["encoders"][name].items() if k not in ("epochs",)}
        assert cut == {k: v for k, v in encoder.items() if k != "epochs"}, name
    assert sorted(rehearsal["evaluate"]["networks"]) == sorted(real["evaluate"]["networks"])
    assert set(rehearsal["sweep"]) == set(real["sweep"])
    assert rehearsal["pilot_images"] and len(rehearsal["sessions"]) < len(real["sessions"])
    # the semantic route at its real shapes: the same ROI, targets and encoders, each conditioning mode
    assert rehearsal["semantic_roi"] == real["semantic_roi"]
    assert rehearsal["semantic"]["token_components"] == real["semantic"]["token_components"]
    for name, encoder in real["semantic_encoders"].items():
        cut = {k: v for k, v in rehearsal["semantic_encoders"][name].items() if k != "epochs"}
        assert cut == {k: v for k, v in encoder.items() if k != "epochs"}, name
    assert set(rehearsal["semantic_sweep"]) == set(real["semantic_sweep"])
    modes = rehearsal["reconstruct"]["conditioning"]
    assert modes["modes"] == real["reconstruct"]["conditioning"]["modes"]
    assert modes["semantic"] == real["reconstruct"]["conditioning"]["semantic"]
    assert rehearsal["captions"]["source"].startswith("http://127.0.0.1:")  # COCO's zip over loopback, downloaded


def test_schema_rejects_unknown_keys_and_values():
    config = load("config.yaml")
    for mutate in (lambda c: c.update(subject=[1]), lambda c: c["split"].update(rule="random"),
                   lambda c: c["encoders"].update({"a b": {}}), lambda c: c["reconstruct"].update(strengths=[1.5])):
        bad = copy.deepcopy(config)
        mutate(bad)
        with pytest.raises(Exception):
            validate(bad, SCHEMA)


def test_checks_name_the_keys():
    config = load("config.yaml")
    config["nsd"]["source"] = "s3://natural-scenes-dataset"
    config["subjects"] = [4]
    config["sessions"] = [29, 31, 33]
    with pytest.raises(BraidError, match=r"sessions \[31, 33\] are outside subj04's NSD sessions 1..30"):
        braid.config.check(config)


def test_a_split_that_does_not_sum_to_one_is_refused_not_renormalised():
    config = load("config.yaml")
    braid.config.check(config)  # 0.8 + 0.1 + 0.1
    config["split"].update(train=0.8, val=0.1, test=0.2)
    with pytest.raises(BraidError, match=r"split: train 0.8 \+ val 0.1 \+ test 0.2 = 1.1, not 1"):
        braid.config.check(config)
    config["split"].update(rule="shared1000")  # test = the shared images; only val is a fraction
    braid.config.check(config)


def test_roi_names_the_data_set_lacks_are_refused_listing_the_valid_ones():
    config = load("config.yaml")  # the synthetic NSD: nsdgeneral, prf-visualrois and streams
    config["roi"] = {"lh.nsdgeneral": [1], "floc-faces": [1]}
    with pytest.raises(BraidError, match=r"roi \['floc-faces'\]: no such ROI file in the synthetic NSD; valid names "
                                         r"are nsdgeneral, prf-visualrois, streams, each also with an lh. or rh. prefix"):
        braid.config.check(config)
    config["roi"] = {"streams": [5]}
    config["semantic_roi"] = {"floc-places": [1]}
    with pytest.raises(BraidError, match=r"semantic_roi \['floc-places'\]: no such ROI file in the synthetic NSD"):
        braid.config.check(config)
    config["semantic_roi"] = {"streams": [5]}
    config["nsd"]["source"] = "s3://natural-scenes-dataset"  # NSD has streams, not "nsd_general"
    config["captions"]["source"] = "http://images.cocodataset.org/annotations/annotations_trainval2017.zip"
    braid.config.check(config)
    config["roi"] = {"nsd_general": [1], "rh.floc-faces": [2]}
    with pytest.raises(BraidError, match=r"roi \['nsd_general'\]: no such ROI file in NSD .*HCP_MMP1, Kastner2015, MTL"):
        braid.config.check(config)


def test_model_folders_are_named_by_repository_revision_and_vae(tmp_path):
    name, folder = braid.config.model_name, braid.config.model_dir
    assert name({"source": "segmind/SSD-1B"}) == "segmind--SSD-1B@main"
    assert folder({"source": "segmind/SSD-1B", "revision": "abc123"}) == "resources/models/segmind--SSD-1B@abc123"
    assert name({"source": "segmind/SSD-1B", "revision": "abc", "vae": "madebyollin/sdxl-vae-fp16-fix"}) == (
        "segmind--SSD-1B@abc+vae-madebyollin--sdxl-vae-fp16-fix@main")
    assert name({"source": "tiny", "seed": 3}) == "tiny-ssd1b-seed3"
    local = tmp_path / "my-ssd1b"
    local.mkdir()
    assert braid.config.model_is_local({"source": str(local)}) and folder({"source": str(local)}) == str(local)
    assert not braid.config.model_is_local({"source": "segmind/SSD-1B"})
    stores = {braid.config.latent_store_name({"source": "segmind/SSD-1B", "image_size": 512, "dtype": d, "vae": v})
              for d in ("float32", "bfloat16") for v in (None, "madebyollin/sdxl-vae-fp16-fix")}
    assert len(stores) == 4  # every identity its own latent cache


def test_model_identity_is_what_names_the_weights_and_nothing_else():
    ssd1b = {"source": "segmind/SSD-1B", "revision": "abc", "variant": "fp16", "vae": None, "vae_revision": None,
             "seed": 0, "dtype": "float32", "image_size": 512, "latent_batch_size": 16, "compile": False}
    identity = braid.config.model_identity(ssd1b)
    assert identity == {"revision": "abc", "source": "segmind/SSD-1B", "vae": None, "vae_revision": None,
                        "variant": "fp16"}
    for how_it_runs in ({"seed": 5}, {"dtype": "bfloat16"}, {"image_size": 256}, {"latent_batch_size": 2},
                        {"compile": True}):  # the seed builds nothing for a downloaded model
        assert braid.config.model_identity({**ssd1b, **how_it_runs}) == identity, how_it_runs
    for other in ({"revision": "def"}, {"variant": None}, {"vae": "madebyollin/sdxl-vae-fp16-fix"}):
        assert braid.config.model_identity({**ssd1b, **other}) != identity, other
    assert braid.config.model_identity({"source": "tiny", "seed": 3})["seed"] == 3  # built here: the seed matters


def test_code_inputs_are_every_braid_module_a_script_can_run(tmp_path):
    pkg = tmp_path / "braid"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('__version__ = "1"\n')
    (pkg / "a.py").write_text("from .b import f\n\ndef g():\n    from . import c\n    return c\n")
    (pkg / "b.py").write_text("from . import __version__\nimport numpy\n")
    (pkg / "c.py").write_text("import braid.d\n")
    (pkg / "d.py").write_text("")
    (pkg / "unused.py").write_text("from .a import g\n")
    script = tmp_path / "run.py"
    script.write_text("import json\nfrom braid.a import g\nfrom braid import b\n")
    assert braid.config.braid_imports(script, pkg) == ["a", "b"]
    assert braid.config.code_modules(["a"], pkg) == ["__init__", "a", "b", "c", "d"]  # inside functions too
    with pytest.raises(BraidError, match="nope.py: no such module"):
        braid.config.code_modules(["nope"], pkg)
    # the real library: the ROI-only fetch runs the HDF5 reader; reconstruction runs the model's decoder
    roi = braid.config.code_modules(braid.config.braid_imports(REPO / "scripts" / "nsd_fetch_betas_roi.py"))
    assert {"nsd", "hdf5_ranges", "common"} <= set(roi) and "evaluate" not in roi
    assert "models" in braid.config.code_modules(["reconstruct"])


def test_every_rule_that_runs_library_code_lists_it_as_input():
    """Each rule's code input names its own script (``script_code("<its script>")``); only the whole-object
    downloads, whose bytes are the source's and verified, rerun on their identity alone."""
    downloads = {"nsd_fetch", "model_fetch", "metrics_fetch"}
    seen = set()
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        for block in re.split(r"(?m)^(?=[ \t]*(?:use )?rule \w+)", smk.read_text())[1:]:
            name = re.match(r"\s*(?:use rule \w+ as )?(?:rule )?(\w+)", block).group(1)
            script = re.search(r"scripts/(\w+)\.py", block)
            if not script:
                continue
            seen.add(name)
            codes = re.findall(r'code=script_code\("(\w+)"\)', block)
            assert codes == ([] if name in downloads else [script.group(1)]), (name, codes)
    assert len(seen) >= 20 and downloads <= seen


def test_conda_env_pins_each_package_dependency_at_the_locked_version():
    """envs/braid.yaml (--sdm conda): every dependency of pyproject.toml but snakemake, each at
    the version of envs/requirements.lock.txt, which lies in pyproject.toml's range."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    deps = {canonicalize_name(Requirement(d).name): Requirement(d)
            for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    env = yaml.safe_load((REPO / "envs" / "braid.yaml").read_text())
    pip = [Requirement(d) for d in next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))]
    lock = dict(line.split("==") for line in (REPO / "envs" / "requirements.lock.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    lock = {canonicalize_name(k): v for k, v in lock.items()}
    assert {canonicalize_name(r.name) for r in pip} == set(deps) - {"snakemake"}
    for req in pip:
        name = canonicalize_name(req.name)
        assert str(req.specifier) == f"=={lock[name]}", (str(req), lock[name])
        assert deps[name].specifier.contains(lock[name], prereleases=True), (str(deps[name]), lock[name])


def test_the_lock_file_pins_every_dependency_within_its_range():
    """envs/requirements.lock.txt (what the tests passed with) satisfies pyproject.toml's ranges."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lock = {}
    for line in (REPO / "envs" / "requirements.lock.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            lock[canonicalize_name(name)] = version
    for spec in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in lock, f"{req.name} is not pinned in envs/requirements.lock.txt"
        assert req.specifier.contains(lock[name], prereleases=True), (spec, lock[name])


def test_every_rule_logs_and_names_its_env():
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        for rule in re.split(r"\nrule ", text)[1:]:
            assert "\n    log:" in rule and "\n    conda:" in rule, f"{smk.name}: rule {rule.split(':')[0]}"


def test_snakemake_lint_is_clean():
    """What a catalogue reviewer runs first: no lints (env vars asserted, no hard-coded path params...)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--lint"],
                          capture_output=True, text=True, cwd=REPO)
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr, proc.stdout[-3000:]


def test_snakefmt_leaves_the_workflow_unchanged():
    """The catalogue's formatter (settings in pyproject.toml's [tool.snakefmt]); fix with `snakefmt Snakefile workflow/`."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow/"], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_sweep_expands_to_one_encoder_per_combination():
    config = {"encoders": {"lr": {"kind": "lowrank", "rank": 4}, "net": {"kind": "mlp", "hidden": [8]},
                           "rr": {"kind": "ridge"}},
              "sweep": {"lr": {"rank": [2, 16]}, "net": {"hidden": [[4, 8], []], "dropout": [0.0, 0.25]},
                        "rr": {"voxels": "reliability", "k": [10]}}}
    sweep = braid.config.sweep_encoders(config)
    assert sorted(sweep) == ["lr-rank16", "lr-rank2", "net-dropout0-hidden4x8", "net-dropout0-hiddennone",
                             "net-dropout0.25-hidden4x8", "net-dropout0.25-hiddennone", "rr-k10"]
    assert sweep["lr-rank2"] == {"kind": "lowrank", "rank": 2}
    assert sweep["net-dropout0.25-hidden4x8"] == {"kind": "mlp", "hidden": [4, 8], "dropout": 0.25}
    assert sweep["rr-k10"] == {"kind": "ridge", "voxels": "reliability", "k": 10}  # a scalar is a fixed override
    assert config["encoders"]["lr"] == {"kind": "lowrank", "rank": 4}  # the base is not modified
    schema = yaml.safe_load(Path(SCHEMA).read_text())
    braid.config.validate_sweep(config, schema)
    bad = copy.deepcopy(config) | {"sweep": {"lr": {"rank": [2, "8"]}, "net": {"dropout": [1.5]}}}
    with pytest.raises(BraidError) as err:
        braid.config.validate_sweep(bad, schema)
    assert "sweep encoder lr-rank8.rank: '8' is not of type" in str(err.value)
    assert "sweep encoder net-dropout1.5.dropout: 1.5 is greater than the maximum of 1" in str(err.value)
    config["sweep"]["student"] = {"rank": [2]}
    with pytest.raises(BraidError, match=r"sweep.student: no encoder 'student'"):
        braid.config.sweep_encoders(config)


def test_encoder_settings_are_checked_per_kind():
    config = load("config.yaml")
    config["encoders"] = {"r": {"kind": "ridge", "lr": 0.1}, "s": {"kind": "student", "rank": 2},
                          "t": {"kind": "student", "teacher": "nobody"}, "l": {"kind": "lowrank"},
                          "m": {"voxels": "reliability"}, "mlp": {}}
    config["sweep"] = {}
    with pytest.raises(BraidError) as err:
        braid.config.check(config)
    for expected in ("encoders.r: lr not used by kind 'ridge'", "encoders.s: a student encoder needs `teacher`",
                     "encoders.t: teacher 'nobody' is not an encoder", "encoders.l: a lowrank encoder needs `rank`",
                     "encoders.m: voxels: reliability needs k"):
        assert expected in str(err.value)
    # a kind's spec holds its own settings only: changing another kind's setting reruns nothing
    assert set(braid.encoder.spec({"kind": "ridge"})) == {"kind", "voxels", "k", "restandardise", "alphas"}
    assert braid.encoder.spec({})["hidden"] == [2048, 4096] and braid.encoder.spec({})["lr"] == 1e-4


def test_literature_preset_is_the_papers_protocol():
    config = load("nsd_literature.yaml")
    assert config["split"]["rule"] == "shared1000" and config["betas"]["trials"] == "average_test"
    assert config["subjects"] == [1, 2, 5, 7] and config["sessions"] == list(range(1, 41))
    assert config["evaluate"]["weights"] == "pretrained"
    assert sorted(config["evaluate"]["networks"]) == sorted(braid.metric_networks.NETWORKS)
    assert config["encoders"]["mlp"]["hidden"] == [2048, 4096]  # the real experiment's encoders, not the demo's
    assert (config["evaluate"]["retrieval_pool"], config["evaluate"]["retrieval_draws"]) == (300, 30)


def test_metric_weights_folders_and_reference_names():
    evaluate = {"weights": "pretrained", "seed": 3, "networks": ["swav", "alexnet"]}
    assert braid.config.metric_weights(evaluate) == {"alexnet": "resources/metric_weights/pretrained/alexnet",
                                                     "swav": "resources/metric_weights/pretrained/swav"}
    assert braid.config.metric_weights(evaluate | {"weights": "random"})["swav"] == "resources/metric_weights/random-seed3/swav"
    config = load("config.yaml")
    config["encoders"]["true-latent"] = {"kind": "ridge"}
    with pytest.raises(BraidError, match=r"encoders \['true-latent'\].*reference"):
        braid.config.check(config)


def test_the_cuda12_lock_is_the_lock_with_torch_built_for_cuda_12():
    """envs/requirements-cu12.lock.txt pins every package of the lock at the same version, torch and
    torchvision as their CUDA 12.8 builds from PyTorch's index, and no CUDA 13 library."""
    def pins(name):
        lines = (REPO / "envs" / name).read_text().splitlines()
        return dict(line.split("==") for line in lines if line and not line.startswith(("#", "--")))

    lock, cu12 = pins("requirements.lock.txt"), pins("requirements-cu12.lock.txt")
    cuda13 = {k for k in lock if k.startswith(("nvidia-", "cuda-")) or k == "triton"}
    assert cuda13 and not cuda13 & set(cu12)
    assert set(cu12) == set(lock) - cuda13
    for name, version in cu12.items():
        expected = f"{lock[name]}+cu128" if name in ("torch", "torchvision") else lock[name]
        assert version == expected, (name, version, expected)
    assert "--extra-index-url https://download.pytorch.org/whl/cu128" in (REPO / "envs" / "requirements-cu12.lock.txt").read_text()


def test_a_malformed_or_empty_config_file_is_named_with_its_line(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("subjects: [1]\nencoders:\n  ridge: {kind: ridge\nsessions: [1]\n")
    with pytest.raises(BraidError, match=rf"^{broken}:4:\d+: not valid YAML"):  # PyYAML reports where it gave up
        braid.config.read_layer(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(BraidError, match=rf"{empty}: the file is empty"):
        braid.config.read_layer(empty)
    listed = tmp_path / "list.yaml"
    listed.write_text("- subjects: [1]\n")
    with pytest.raises(BraidError, match="a list, not a mapping of settings"):
        braid.config.read_layer(listed)
    assert braid.config.main([str(empty), str(broken)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith(f"{empty}:") and err[1].startswith(f"{broken}:4:")


def test_every_problem_is_listed_with_its_source_value_and_what_is_allowed(tmp_path, capsys):
    schema = yaml.safe_load(Path(SCHEMA).read_text())
    base = load("config.yaml")
    text = "reconstruct:\n  dtype: flaot16\n  steps: ten\nnsd:\n  fetch: roi\n  resolutoin: func1mm\n"
    user = tmp_path / "user.yaml"
    user.write_text(text)
    layer, cli = yaml.safe_load(text), {"subjects": [0]}
    config = braid.config.layered(base, [layer, cli], schema)
    sources = [("config/config.yaml", str(REPO / "config" / "config.yaml"), base), (str(user), str(user), layer),
               ("--config", None, cli)]
    found = braid.config.problems(config, schema, sources)
    assert f"{user}:2: reconstruct.dtype: 'flaot16' is not allowed; allowed: 'float32', 'bfloat16', 'float16'; " \
           "did you mean 'float16'?" in found
    assert f"{user}:3: reconstruct.steps: 'ten' is not of type integer" in found
    assert any(p.startswith(f"{user}:6: nsd.resolutoin: not a setting of nsd; did you mean 'resolution'?")
               for p in found), found
    assert "--config: subjects[0]: 0 is below the minimum 1" in found
    assert len(found) == 4, found
    assert braid.config.main([str(user)]) == 1
    assert len(capsys.readouterr().err.splitlines()) == 3  # the file alone: its own three
    assert braid.config.main([str(REPO / "config" / "nsd_ssd1b.yaml")]) == 0


def test_a_local_nsd_source_must_be_a_folder(tmp_path):
    config = load("config.yaml")
    config["nsd"]["source"] = str(tmp_path / "mirror")
    with pytest.raises(BraidError, match=rf"nsd.source: '{tmp_path / 'mirror'}' is not a folder"):
        braid.config.check(config)
    (tmp_path / "mirror").mkdir()
    assert not any(p.startswith("nsd.source") for p in braid.config.combination_problems(config))


def test_semantic_encoders_are_checked_like_encoders_with_their_target():
    config = load("config.yaml")
    assert braid.config.all_encoders(config, "semantic_")["lowrank-rank8"] == {"kind": "lowrank", "rank": 8}
    config["semantic_encoders"]["student"]["teacher"] = "ridge-tokens"  # a pooled student of a tokens teacher
    config["semantic_encoders"]["ridge"]["lr"] = 0.1  # not a ridge setting
    config["encoders"]["semantic"] = {"kind": "ridge"}  # the route's folder
    problems = braid.config.combination_problems(config)
    assert "semantic_encoders.student: target 'pooled' differs from its teacher 'ridge-tokens''s; a student learns " \
           "its teacher's outputs" in problems
    assert "semantic_encoders.ridge: lr not used by kind 'ridge'; remove them" in problems
    assert any(p.startswith("encoders.semantic: the name is the semantic route's folder") for p in problems)
    config = load("config.yaml")
    config["semantic_sweep"] = {"mlp": {"rank": ["8"]}}
    problems = braid.config.sweep_problems(config, yaml.safe_load(Path(SCHEMA).read_text()))
    assert problems and all(p.startswith("semantic_sweep encoder mlp-rank8") for p in problems), problems
    config["semantic_sweep"] = {"cnn": {"rank": [8]}}
    assert braid.config.sweep_problems(config, yaml.safe_load(Path(SCHEMA).read_text())) == [
        "semantic_sweep.cnn: no encoder 'cnn' under semantic_encoders (['lowrank', 'mlp', 'ridge', 'ridge-tokens', "
        "'student'])"]


def test_the_semantic_conditionings_name_what_the_config_has():
    config = load("config.yaml")
    assert not braid.config.combination_problems(config)
    config["reconstruct"]["conditioning"] = {"modes": ["retrieved"], "latent": ["ridge", "cnn"], "semantic": ["gru"]}
    problems = braid.config.combination_problems(config)
    assert any(p.startswith("reconstruct.conditioning.latent ['cnn'] are neither reconstructed encoders") for p in problems)
    assert any(p.startswith("reconstruct.conditioning.semantic ['gru'] are not defined under semantic_encoders")
               for p in problems)
    config["reconstruct"]["conditioning"] = {"modes": ["predicted"], "latent": [], "semantic": []}
    problems = braid.config.combination_problems(config)
    assert any(p.startswith("reconstruct.conditioning.latent is empty") for p in problems)
    assert any(p.startswith("reconstruct.conditioning.semantic is empty") for p in problems)
    config["reconstruct"]["conditioning"] = {"modes": ["true-caption"], "latent": ["true-latent"], "semantic": []}
    assert not braid.config.combination_problems(config)  # the true caption needs no semantic encoder
    config["semantic_encoders"] = {}
    assert any(p.startswith("reconstruct.conditioning.modes ['true-caption'] condition img2img on captions")
               for p in braid.config.combination_problems(config))


def test_nsd_with_the_synthetic_captions_is_refused():
    config = load("config.yaml")
    config["nsd"]["source"] = "s3://natural-scenes-dataset"
    problems = braid.config.combination_problems(config)
    assert any(p.startswith("captions.source 'synthetic' holds the synthetic NSD's captions") for p in problems)
    config["semantic_encoders"] = {}
    assert not any(p.startswith("captions.source") for p in braid.config.combination_problems(config))


def test_roi_only_fetching_covers_both_routes_rois():
    config = {"roi": {"nsdgeneral": [1], "streams": [1]}, "semantic_roi": {"streams": [5, 1], "floc-faces": [2]}}
    assert braid.config.fetch_rois(config) == {"floc-faces": [2], "nsdgeneral": [1], "streams": [1, 5]}
