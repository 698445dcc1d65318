"""Model acquisition and loading: what is fetched, completeness checks, loading with the hub offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from braid.common import BraidError
from braid.models import MANIFEST, allow_patterns, check_model, load_img2img, load_vae

# The layout of a diffusers SDXL repository with an fp16 variant (as segmind/SSD-1B publishes),
# plus what such repositories carry besides: fp32 duplicates, .bin, single-file checkpoints, images.
REPO_FILES = [
    ".gitattributes", "README.md", "SSD-1B.safetensors", "SSD-1B-A1111.safetensors", "images/sample.png",
    "model_index.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "text_encoder_2/config.json", "text_encoder_2/model.safetensors", "text_encoder_2/model.fp16.safetensors",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "tokenizer_2/merges.txt", "tokenizer_2/special_tokens_map.json", "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
]
CONFIGS = {"model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
           "text_encoder_2/config.json", "unet/config.json", "vae/config.json",
           *(f"{t}/{f}" for t in ("tokenizer", "tokenizer_2")
             for f in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"))}


def selected(variant, ignore=None):
    from huggingface_hub.utils import filter_repo_objects

    return set(filter_repo_objects(REPO_FILES, allow_patterns=allow_patterns(variant), ignore_patterns=ignore))


def test_only_what_braid_loads_is_fetched():
    fp16 = {"text_encoder/model.fp16.safetensors", "text_encoder_2/model.fp16.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"}
    assert selected("fp16") == CONFIGS | fp16
    fp32 = {"text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
            "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"}
    assert selected(None) == CONFIGS | fp32
    assert not {f for f in selected("fp16", ignore=["vae/*"]) if f.startswith("vae/")}  # a VAE override replaces it


def test_sharded_weights_and_their_index_are_fetched():
    from huggingface_hub.utils import filter_repo_objects

    files = ["unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
             "unet/diffusion_pytorch_model.fp16-00002-of-00002.safetensors",
             "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
             "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
             "unet/diffusion_pytorch_model.safetensors.index.json"]
    assert set(filter_repo_objects(files, allow_patterns=allow_patterns("fp16"))) == set(files[:3])


def test_a_missing_or_partial_model_names_the_rule_that_fetches_it(tiny_model, tmp_path):
    check_model(tiny_model)  # complete: every file of its manifest at its size
    partial = tmp_path / "partial"
    shutil.copytree(tiny_model, partial)
    weights = next((partial / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])  # an interrupted copy
    with pytest.raises(BraidError, match=r"the model is incomplete: unet/.*safetensors \(1000 of \d+ bytes\).*model_fetch"):
        load_img2img(partial)
    (partial / "vae" / "config.json").unlink()
    with pytest.raises(BraidError, match=r"vae/config.json \(missing\)"):
        load_vae(partial)
    with pytest.raises(BraidError, match=r"nothing: no model here \(model_index.json is missing\).*model_fetch"):
        load_img2img(tmp_path / "nothing")
    local = tmp_path / "local"  # a user's own folder, without BRAID's manifest, is accepted
    shutil.copytree(tiny_model, local, ignore=shutil.ignore_patterns(MANIFEST))
    check_model(local)


OFFLINE_LOAD = """
import socket, sys
def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")
socket.socket.connect = refuse
socket.create_connection = refuse
import huggingface_hub.constants as c
assert c.HF_HUB_OFFLINE, "HF_HUB_OFFLINE is not in effect"
from braid.models import load_img2img, load_vae
load_img2img(sys.argv[1])
load_vae(sys.argv[1])
print("loaded offline")
"""


def test_compute_jobs_load_with_the_hub_offline_and_no_network(tiny_model):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    proc = subprocess.run([sys.executable, "-c", OFFLINE_LOAD, str(tiny_model)], capture_output=True, text=True,
                          env=env | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0 and "loaded offline" in proc.stdout, proc.stderr[-3000:]


def test_snakemake_jobs_switch_the_hub_off_except_the_download(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from braid.common import snakemake_job

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    job = SimpleNamespace(log=[str(tmp_path / "a.log")], rule="model_fetch", wildcards={}, attempt=1)
    with snakemake_job(job, offline=False):
        assert "HF_HUB_OFFLINE" not in os.environ
    job.rule = "latents_encode"
    with snakemake_job(job):
        assert os.environ["HF_HUB_OFFLINE"] == "1"
