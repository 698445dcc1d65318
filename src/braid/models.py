"""The diffusion model: SSD-1B from the Hugging Face hub, or a tiny SSD-1B-shaped stand-in.

Every stage loads the model with :func:`load_img2img` (``from_pretrained`` on a local folder),
so the tiny pipeline exercises exactly the code path that loads ``segmind/SSD-1B``. Download
(:func:`download`) happens in a local rule; compute jobs load with ``local_files_only``.

The tiny pipeline keeps SSD-1B's distinctive structure (resnet-only mid block,
``reverse_transformer_layers_per_block``, VAE ``scaling_factor`` 0.13025, two CLIP text
encoders, ``text_time`` conditioning without aesthetic score, 8x VAE downsampling) at widths
that run on a CPU in seconds. Built here its weights are random (``tiny``): its images are not
meant to look like anything, only to flow through the same code; :mod:`braid.model_training`
trains the same pipeline on the synthetic stimuli (``tiny-trained``, the demo's).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from .common import BraidError, atomic_output

log = logging.getLogger(__name__)

SDXL_VAE_SCALING = 0.13025
RANDOM_WEIGHTS = "random (not a result)"  # the manifest's stamp of a model built with random weights

# The SDXL VAE (stable-diffusion-xl-base-1.0/vae/config.json, which SSD-1B ships): 83,653,863
# parameters, 8x downsampling (512 px -> 4x64x64). Used to build the real architecture with
# random weights where no weights can be downloaded (benchmarks, rehearsals).
SDXL_VAE_CONFIG = dict(
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=SDXL_VAE_SCALING,
    force_upcast=True,
)


def _byte_vocab() -> dict[str, int]:
    """A CLIP BPE vocab with no merges: start/end tokens and the 256 byte symbols, plain and word-final."""
    # GPT-2/CLIP byte-to-unicode table: printable bytes map to themselves, the rest to 256+n
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(extra))]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    return {t: i for i, t in enumerate(tokens)}


# SSD-1B's UNet (the unet/config.json of huggingface.co/segmind/SSD-1B): SDXL's with fewer transformer blocks
# and a resnet-only mid block; 1,331,334,404 parameters.
SSD1B_UNET_CONFIG = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], in_channels=4, out_channels=4,
    layers_per_block=2, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
    projection_class_embeddings_input_dim=2816, sample_size=128, use_linear_projection=True,
    mid_block_type="UNetMidBlock2D", transformer_layers_per_block=[1, 2, 4],
    reverse_transformer_layers_per_block=[[4, 4, 10], [2, 1, 1], 1],
)
# SDXL's text encoders: CLIP ViT-L (123,060,480) and OpenCLIP bigG with projection (694,659,840).
_TOKENS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, max_position_embeddings=77)  # the byte vocab's ids
CLIP_L_CONFIG = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                     hidden_act="quick_gelu", projection_dim=768, vocab_size=49408, **_TOKENS)
CLIP_BIGG_CONFIG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                        hidden_act="gelu", projection_dim=1280, vocab_size=49408, **_TOKENS)
# the tiny stand-in: the same structure, widths that run on a CPU in seconds
TINY_UNET_CONFIG = dict(
    block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids + pooled TE2 projection
    cross_attention_dim=64,  # TE1 hidden (32) + TE2 hidden (32)
    mid_block_type="UNetMidBlock2D",  # SSD-1B: resnet-only mid block
    transformer_layers_per_block=[1, 2], reverse_transformer_layers_per_block=[[2, 1, 1], 1], norm_num_groups=32,
)
TINY_VAE_CONFIG = {**SDXL_VAE_CONFIG, "block_out_channels": [16, 32, 32, 32], "layers_per_block": 1,
                   "norm_num_groups": 8, "sample_size": 64}
TINY_TE_CONFIG = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=5,
                      vocab_size=1000, hidden_act="gelu", projection_dim=32, **_TOKENS)


def sdxl_components(unet_cfg: dict, vae_cfg: dict, te1_cfg: dict, te2_cfg: dict) -> dict:
    """The modules of an SDXL img2img pipeline built from configs (random weights, on torch's current device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    return {"unet": UNet2DConditionModel(**unet_cfg), "vae": AutoencoderKL(**vae_cfg),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**te1_cfg)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**te2_cfg))}


def assemble_sdxl(components: dict):
    """An SDXL img2img pipeline (SDXL base's scheduler, a byte-level CLIP tokenizer) around ``components``."""
    import tempfile

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
    from transformers import CLIPTokenizer

    scheduler = EulerDiscreteScheduler(  # SDXL base's
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
    )
    with tempfile.TemporaryDirectory() as tok_dir:
        Path(tok_dir, "vocab.json").write_text(json.dumps(_byte_vocab()))
        Path(tok_dir, "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    return StableDiffusionXLImg2ImgPipeline(
        **components, tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler,
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def save_sdxl(pipe, out_dir, info: dict, weights: str = RANDOM_WEIGHTS, variants=(None,)) -> Path:
    """Save ``pipe`` in the Hugging Face layout with a manifest stamping its ``weights``; atomically."""
    import torch

    with atomic_output(out_dir) as tmp:
        for variant in variants:  # fp32 files first, then e.g. the fp16 variant's
            if variant == "fp16":
                pipe.to(torch.float16)
            pipe.save_pretrained(tmp, variant=variant)
        write_model_manifest(tmp, **info, weights=weights)
    log.info("wrote %s pipeline to %s", info["source"], out_dir)
    return Path(out_dir)


def _build_sdxl(out_dir, components: dict, info: dict, variants=(None,)) -> Path:
    return save_sdxl(assemble_sdxl(components), out_dir, info, variants=variants)


def build_tiny_sdxl(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny SSD-1B-shaped ``StableDiffusionXLImg2ImgPipeline`` to ``out_dir`` (HF layout)."""
    import torch

    torch.manual_seed(seed)
    components = sdxl_components(TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TE_CONFIG, TINY_TE_CONFIG)
    return _build_sdxl(out_dir, components, {"source": "tiny", "seed": seed})


def build_ssd1b_architecture(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """SSD-1B's exact architecture with random weights, saved as fp32 and as the ``fp16`` variant.

    For proving shapes, memory and dtypes of the real configuration, and for benchmarking
    compute, where the weights cannot be downloaded; every output is stamped as not a result.
    About 9 GB of memory while building and 13.4 GB on disk (8.9 fp32 + 4.5 fp16).
    """
    import torch

    torch.manual_seed(seed)
    components = sdxl_components(SSD1B_UNET_CONFIG, SDXL_VAE_CONFIG, CLIP_L_CONFIG, CLIP_BIGG_CONFIG)
    return _build_sdxl(out_dir, components, {"source": "ssd1b-architecture", "seed": seed}, variants=(None, "fp16"))


MANIFEST = "braid_model.json"  # written last into a fetched or built model folder: its files and their sizes
FETCH_RULE = "model_fetch"


def allow_patterns(variant: str | None) -> list[str]:
    """What BRAID loads from a diffusers repository: configs, tokenizers, scheduler, and the
    safetensors weights of ``variant`` only (not the fp32 duplicates, ``.bin`` files, single-file
    checkpoints or images). Sharded weights and their index files included."""
    tag = f".{variant}" if variant else ""
    weights = [
        f"*/diffusion_pytorch_model{tag}.safetensors", f"*/model{tag}.safetensors",
        f"*/diffusion_pytorch_model{tag}-*-of-*.safetensors", f"*/model{tag}-*-of-*.safetensors",
        f"*/diffusion_pytorch_model.safetensors.index{tag}.json", f"*/model.safetensors.index{tag}.json",
    ]
    return ["model_index.json", "*/config.json", "scheduler/scheduler_config.json", "tokenizer*/*", *weights]


def _folder_files(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name != MANIFEST and ".cache" not in f.relative_to(folder).parts}


def write_model_manifest(folder: str | os.PathLike, **info) -> dict:
    """Record the folder's files and sizes (and ``info``) in ``<folder>/braid_model.json``."""
    folder = Path(folder)
    manifest = {**info, "files": _folder_files(folder)}
    manifest["bytes"] = sum(manifest["files"].values())
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def check_model(folder: str | os.PathLike, required: str = "model_index.json") -> None:
    """A model folder is complete: its manifest's files are all there, the weights at their sizes.

    Folders without a manifest (a model the user points ``model.source`` at) need at least
    ``required``; loading then reports anything else that is missing.
    """
    folder = Path(folder)
    fix = (f"run the rule {FETCH_RULE} where the network is (e.g. `snakemake --until {FETCH_RULE}` on the login "
           "node; model_train for model.source tiny-trained), or point model.source at a complete local folder")
    if not (folder / MANIFEST).is_file():
        if not (folder / required).is_file():
            raise BraidError(f"{folder}: no model here ({required} is missing); {fix}")
        return
    manifest = json.loads((folder / MANIFEST).read_text())
    have = _folder_files(folder)
    # every file must be there; weights at their recorded size (configs may be edited by hand)
    bad = [f"{name} ({'missing' if name not in have else f'{have[name]} of {size} bytes'})"
           for name, size in manifest["files"].items()
           if name not in have or (name.endswith((".safetensors", ".bin")) and have[name] != size)]
    if bad:
        raise BraidError(f"{folder}: the model is incomplete: {', '.join(bad[:5])}; {fix}")


def download(repo_id: str, out_dir: str | os.PathLike, revision: str | None = None, variant: str | None = None,
             vae: str | None = None, vae_revision: str | None = None) -> dict:
    """Download what BRAID loads of a diffusers pipeline into ``out_dir`` (run where the network is).

    Only :func:`allow_patterns` of ``repo_id`` at ``revision``; with ``vae`` (e.g.
    ``madebyollin/sdxl-vae-fp16-fix``) the pipeline's own VAE is skipped and that repository's
    config and weights go to ``vae/`` (named for ``variant``, so that every loader finds them).
    Writes ``braid_model.json``: the resolved commits, the files, and the bytes fetched against
    the repositories' totals. The folder appears whole (atomic rename) or not at all.
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    api = HfApi()
    patterns = allow_patterns(variant)
    ignore = ["vae/*"] if vae else None
    info = api.model_info(repo_id, revision=revision, files_metadata=True)
    chosen = list(filter_repo_objects(info.siblings, allow_patterns=patterns, ignore_patterns=ignore,
                                      key=lambda f: f.rfilename))
    report = {"source": repo_id, "revision": revision, "commit": info.sha, "variant": variant,
              "bytes_fetched": sum(f.size or 0 for f in chosen),
              "bytes_repository": sum(f.size or 0 for f in info.siblings)}
    with atomic_output(out_dir) as tmp:
        snapshot_download(repo_id, revision=info.sha, local_dir=tmp, allow_patterns=patterns, ignore_patterns=ignore)
        if vae:
            vinfo = api.model_info(vae, revision=vae_revision, files_metadata=True)
            vpatterns = ["config.json", "diffusion_pytorch_model.safetensors"]
            snapshot_download(vae, revision=vinfo.sha, local_dir=Path(tmp) / "vae", allow_patterns=vpatterns)
            weights = Path(tmp) / "vae" / "diffusion_pytorch_model.safetensors"
            if variant:
                weights.rename(weights.with_name(f"diffusion_pytorch_model.{variant}.safetensors"))
            vchosen = list(filter_repo_objects(vinfo.siblings, allow_patterns=vpatterns, key=lambda f: f.rfilename))
            report["vae"] = {"source": vae, "revision": vae_revision, "commit": vinfo.sha}
            report["bytes_fetched"] += sum(f.size or 0 for f in vchosen)
            report["bytes_repository"] += sum(f.size or 0 for f in vinfo.siblings)
        for cache in Path(tmp).rglob(".cache"):  # snapshot_download's bookkeeping in local_dir
            shutil.rmtree(cache, ignore_errors=True)
        report = write_model_manifest(tmp, **report)
    log.info("fetched %s@%s: %.2f GB of the repositories' %.2f GB", repo_id, info.sha,
             report["bytes_fetched"] / 1e9, report["bytes_repository"] / 1e9)
    return report


def vae_force_upcast(vae_config) -> bool:
    """Whether the VAE overflows in float16, by its config's ``force_upcast``; where the config does
    not say, diffusers' own default for ``AutoencoderKL`` (True), as ``from_pretrained`` fills it in.
    The one rule for every loader, so that latent caching, decode-only and img2img agree."""
    import inspect

    from diffusers import AutoencoderKL

    default = inspect.signature(AutoencoderKL.__init__).parameters["force_upcast"].default
    return bool(vae_config.get("force_upcast", default))


def vae_dtype(vae_config, dtype: str) -> str:
    """The dtype the VAE must run in when the rest of the model runs in ``dtype``.

    The SDXL VAE overflows in float16 (NaN images); its config says so with ``force_upcast``
    (:func:`vae_force_upcast`), and diffusers' own pipelines then run it in float32. BRAID follows
    the same rule: float16 with ``force_upcast`` -> float32; a VAE fine-tuned for float16
    (``force_upcast: false``, e.g. madebyollin/sdxl-vae-fp16-fix) stays float16; float32 and
    bfloat16 are kept.
    """
    if dtype == "float16" and vae_force_upcast(vae_config):
        return "float32"
    return dtype


def load_img2img(path: str | os.PathLike, device: str = "cpu", dtype: str = "float32", variant: str | None = None):
    """Load an SDXL img2img pipeline from a local folder, offline, as compute nodes must.

    UNet and text encoders are loaded in ``dtype``, the VAE (by :func:`load_vae`) in
    :func:`vae_dtype`: each module is read in the precision it runs in, never cast afterwards.
    Decode with :func:`decode_latents`, not the pipeline's own decoder: the pipeline upcasts the
    VAE only while it is still float16, which this loader has already settled.
    """
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from .common import torch_dtype

    path = Path(path)
    check_model(path)
    vae = load_vae(path, device="cpu", dtype=dtype, variant=variant)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        path,
        vae=vae,
        torch_dtype=torch_dtype(dtype),
        variant=variant,
        local_files_only=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def decode_latents(vae, latents):
    """Scaled latents (as img2img returns them with ``output_type="latent"``) -> float (n, 3, H, W) in [0, 1].

    Divides by the VAE's ``scaling_factor`` and decodes in the VAE's own dtype, as diffusers'
    pipelines do; non-finite pixels (a float16 overflow) raise a :class:`BraidError`.
    """
    import torch

    dtype = next(vae.parameters()).dtype
    with torch.inference_mode():
        image = vae.decode(latents.to(dtype) / vae.config.scaling_factor, return_dict=False)[0]
    image = image.float()
    if not torch.isfinite(image).all():
        raise BraidError(
            f"the VAE decoded non-finite pixels in {dtype}; the SDXL VAE overflows in float16: use "
            "reconstruct.dtype bfloat16 or float32, or a VAE made for float16 (force_upcast false, e.g. "
            "madebyollin/sdxl-vae-fp16-fix)"
        )
    return (image / 2 + 0.5).clamp(0, 1)


def load_vae(path: str | os.PathLike, device: str = "cpu", dtype: str = "float32", variant: str | None = None):
    """The pipeline's VAE, from the same local folder, loaded in :func:`vae_dtype` (for caching latents,
    decode-only, and inside :func:`load_img2img`)."""
    from diffusers import AutoencoderKL

    from .common import torch_dtype

    path = Path(path)
    check_model(path, required="vae/config.json")
    run_vae = vae_dtype(AutoencoderKL.load_config(path, subfolder="vae", local_files_only=True), dtype)
    if run_vae != dtype:
        log.info("VAE runs in %s (force_upcast: the SDXL VAE overflows in %s)", run_vae, dtype)
    vae = AutoencoderKL.from_pretrained(
        path, subfolder="vae", torch_dtype=torch_dtype(run_vae), variant=variant, local_files_only=True
    )
    return vae.to(device).eval()


def vae_image_size(vae, requested: int | None = None) -> int:
    """The pixel size images are resized to before encoding: the config value, or the VAE's sample_size."""
    return int(requested or vae.config.sample_size)
