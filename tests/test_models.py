"""Model acquisition and loading: what is fetched, completeness checks, loading with the hub offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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
    monkeypatch.setenv("BRAID_RULE", "")  # restored afterwards: a job sets it
    job = SimpleNamespace(log=[str(tmp_path / "a.log")], rule="model_fetch", wildcards={}, attempt=1,
                          scriptdir=str(Path(__file__).resolve().parents[1] / "scripts"))
    with snakemake_job(job, offline=False):
        assert "HF_HUB_OFFLINE" not in os.environ
    job.rule = "latents_encode"
    with snakemake_job(job):
        assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_ssd1b_architecture_has_the_published_parameter_counts():
    """SSD-1B's exact architecture (built on the meta device: shapes, no memory)."""
    import torch

    from braid.models import CLIP_BIGG_CONFIG, CLIP_L_CONFIG, SDXL_VAE_CONFIG, SSD1B_UNET_CONFIG, sdxl_components

    with torch.device("meta"):
        parts = sdxl_components(SSD1B_UNET_CONFIG, SDXL_VAE_CONFIG, CLIP_L_CONFIG, CLIP_BIGG_CONFIG)
    count = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
    # SSD-1B's 5.33 GB fp32 UNet file, SDXL's VAE (335 MB), CLIP ViT-L and OpenCLIP bigG
    assert count == {"unet": 1_331_334_404, "vae": 83_653_863, "text_encoder": 123_060_480,
                     "text_encoder_2": 694_659_840}
    unet = parts["unet"]
    depth = [[len(a.transformer_blocks) for a in getattr(b, "attentions", [])] for b in unet.down_blocks]
    assert depth == [[], [2, 2], [4, 4]]  # SSD-1B's down depths (SDXL: [[], [2, 2], [10, 10]])
    assert [[len(a.transformer_blocks) for a in getattr(b, "attentions", [])] for b in unet.up_blocks] == [
        [4, 4, 10], [2, 1, 1], []]


def test_fp16_variant_files_are_written_and_load(tmp_path):
    """The builder's fp32 + fp16-variant save (as for ssd1b-architecture), at the tiny model's size:
    a folder whose loaders must pass variant="fp16"."""
    import torch

    from braid.models import TINY_TE_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG, _build_sdxl, sdxl_components

    torch.manual_seed(0)
    parts = sdxl_components(TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TE_CONFIG, TINY_TE_CONFIG)
    folder = _build_sdxl(tmp_path / "m", parts, {"source": "ssd1b-architecture", "seed": 0}, variants=(None, "fp16"))
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    check_model(folder)
    pipe = load_img2img(folder, dtype="float16", variant="fp16")
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float32  # force_upcast
    fp16 = (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").stat().st_size
    fp32 = (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert 0.45 < fp16 / fp32 < 0.55


def test_results_of_random_weights_are_stamped(tiny_model, tmp_path):
    """The stamp comes from the model folder's manifest: built here with random weights, or not."""
    from braid.latents import RANDOM, model_weights

    assert model_weights(tiny_model) == RANDOM == "random (not a result)"
    local = tmp_path / "local"  # a user's folder (no BRAID manifest) holds pretrained weights
    shutil.copytree(tiny_model, local, ignore=shutil.ignore_patterns(MANIFEST))
    assert model_weights(local) == "pretrained"
