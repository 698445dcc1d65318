"""The five feature networks of the field's eight image metrics: weights on disk, loading, features.

Follows the MindEye reference code ("ME" preset: ``src/Reconstruction_Metrics.py`` of
github.com/MedARC-AI/fMRI-reconstruction-NSD, the same in MindEyeV2's
``src/final_evaluations.ipynb``), which ran
torchvision 0.15/0.16:

- AlexNet(2)/(5): ``alexnet``, ``AlexNet_Weights.IMAGENET1K_V1``; ``features.4`` / ``features.11``
  (ReLU after conv2 / conv5); 256 px, ImageNet normalisation;
- InceptionV3: ``inception_v3``, ``IMAGENET1K_V1`` (= ``DEFAULT``, with ``transform_input``);
  ``avgpool`` (2048); 342 px, ImageNet;
- CLIP: OpenAI's ViT-L/14 vision tower with its projection (``openai/clip-vit-large-patch14``);
  ``image_embeds`` (768, not normalised; = ``encode_image``); 224 px, CLIP normalisation;
- EffNet-B: ``efficientnet_b1``, ``EfficientNet_B1_Weights.DEFAULT`` = ``IMAGENET1K_V2`` (MindEye's;
  Brain-Diffuser's ``weights=True`` took the legacy path to ``IMAGENET1K_V1``, another network);
  ``avgpool`` (1280); 255 px, ImageNet;
- SwAV: torchvision ``resnet50`` with ``swav_800ep_pretrain.pth.tar`` (swav:hubconf.py);
  ``avgpool`` (2048); 224 px, ImageNet.

Every network takes the ME images (float, (n, 3, 256, 256), in [0, 1]; :func:`to_256` brings
other sizes there the ME way), resized to its size with a tensor bilinear resize *without*
antialiasing (torchvision 0.15's tensor ``Resize`` did not antialias; the default changed in
0.17), then normalised. No crop anywhere.

Weights live in a folder per network, written whole or not at all (:func:`fetch` where the
network is, :func:`build_random` for plumbing checks) with a manifest ``braid_metric_weights.json``
(its files and sizes) written last; :func:`load` checks the folder (:func:`check`) and loads from
local files only. Numbers computed with random weights are stamped :data:`RANDOM`: they test the
plumbing and are not comparable with anything.

Known deviations from the reference, all small: CLIP runs in float32 here through transformers'
``CLIPVisionModelWithProjection`` (MindEye's ``clip.load`` on a GPU ran the OpenAI model in
float16); the features are otherwise OpenAI's ``encode_image``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import warnings
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from .common import BraidError, atomic_output
from .integrity import file_sha256

log = logging.getLogger(__name__)

NETWORKS = ("alexnet", "inception", "clip", "efficientnet", "swav")
# metric name -> (network, layer/output, score kind); "two_way": 2-way identification (higher is
# better); "distance": mean correlation distance between matching rows (lower is better)
METRICS = {
    "alexnet2": ("alexnet", "features.4", "two_way"),
    "alexnet5": ("alexnet", "features.11", "two_way"),
    "inception": ("inception", "avgpool", "two_way"),
    "clip": ("clip", "image_embeds", "two_way"),
    "efficientnet": ("efficientnet", "avgpool", "distance"),
    "swav": ("swav", "avgpool", "distance"),
}
FETCH_RULE = "metrics_fetch"
RANDOM = "random (not comparable)"  # the stamp for numbers computed with random weights
PRETRAINED = "pretrained"
MANIFEST = "braid_metric_weights.json"  # written last into a weights folder: its files and their sizes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# network -> (square size the 256² ME image is resized to, mean, std); metrics.md §2
PREPROCESS = {
    "alexnet": (256, IMAGENET_MEAN, IMAGENET_STD),
    "inception": (342, IMAGENET_MEAN, IMAGENET_STD),
    "clip": (224, CLIP_MEAN, CLIP_STD),
    "efficientnet": (255, IMAGENET_MEAN, IMAGENET_STD),
    "swav": (224, IMAGENET_MEAN, IMAGENET_STD),
}

SWAV_URL = "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar"
CLIP_REPO = "openai/clip-vit-large-patch14"
# The hub commit of openai/clip-vit-large-patch14 that is widely pinned (and its snapshot folder
# holds model.safetensors); recorded from public code, not re-resolved here (no network).
CLIP_REVISION = "32bd64288804d66eefd0ccbe215aa642df71cc41"
CLIP_FILES = ["config.json", "preprocessor_config.json", "model.safetensors"]
# The vision tower of OpenAI's CLIP ViT-L/14 with its 768-d projection: 303,966,208 parameters.
CLIP_VIT_L14 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
    image_size=224, num_channels=3, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
# the hub repository's preprocessor_config.json (BRAID preprocesses itself; kept for an identical layout)
_CLIP_PREPROCESSOR = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
    "resample": 3, "size": 224,
}
_SWAV_HEAD = ("fc.weight", "fc.bias")  # SwAV's checkpoint has no classifier; these stay random
_HASH = re.compile(r"-([0-9a-f]{8,})\.")  # torchvision file names carry their sha256 prefix


def _check_network(network: str) -> None:
    if network not in NETWORKS:
        raise BraidError(f"unknown metric network {network!r}; one of {', '.join(NETWORKS)}")


def metrics_of(network: str) -> dict[str, str]:
    """The metrics a network gives: metric name -> its layer/output."""
    _check_network(network)
    return {name: layer for name, (net, layer, _) in METRICS.items() if net == network}


def _official_url(network: str) -> str:
    from torchvision.models import AlexNet_Weights, EfficientNet_B1_Weights, Inception_V3_Weights

    return {
        "alexnet": AlexNet_Weights.IMAGENET1K_V1.url,
        "inception": Inception_V3_Weights.IMAGENET1K_V1.url,
        # MindEye's EfficientNet_B1_Weights.DEFAULT (V2 since torchvision 0.13); Brain-Diffuser's
        # `weights=True` took the legacy path to IMAGENET1K_V1, a different network (metrics.md §3b)
        "efficientnet": EfficientNet_B1_Weights.IMAGENET1K_V2.url,
        "swav": SWAV_URL,
    }[network]


def _architecture(network: str, clip_config: dict | None = None):
    """The network as BRAID builds it, with fresh (random) weights, on torch's current device."""
    import torchvision.models as tvm

    _check_network(network)
    if network == "alexnet":
        return tvm.alexnet()
    if network == "inception":
        # what inception_v3(weights=Inception_V3_Weights.DEFAULT) builds before loading the weights
        # (the builder forces transform_input=True with weights): the input is re-normalised from
        # ImageNet's statistics to Inception's [-1, 1] inside the forward pass
        return tvm.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    if network == "efficientnet":
        return tvm.efficientnet_b1()
    if network == "swav":
        return tvm.resnet50()  # swav:hubconf.py's resnet50 is torchvision's
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(**(clip_config or CLIP_VIT_L14)))


def n_parameters(network: str) -> int:
    """Parameters of the architecture as the workflow builds it (on the meta device: no memory)."""
    import torch

    with torch.device("meta"):
        model = _architecture(network)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# folders and manifests


def _folder_files(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name != MANIFEST and ".cache" not in f.relative_to(folder).parts}


def _write_manifest(folder: Path, **info) -> dict:
    manifest = {**info, "files": _folder_files(folder)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def _fix() -> str:
    return (f"run the rule {FETCH_RULE} where the network is (e.g. `snakemake --until {FETCH_RULE}` on the login "
            "node), or set evaluate.weights: random for a plumbing check")


def _manifest(folder: Path, network: str | None = None) -> dict:
    if not (folder / MANIFEST).is_file():
        what = f"for {network}" if network else "for a metric network"
        raise BraidError(f"{folder}: no weights {what} here ({MANIFEST} is missing); {_fix()}")
    try:
        return json.loads((folder / MANIFEST).read_text())
    except json.JSONDecodeError as err:
        raise BraidError(f"{folder / MANIFEST}: unreadable manifest ({err}); {_fix()}") from None


def check(folder, network: str) -> None:
    """The folder holds complete weights for ``network``: its manifest's files all there, at their sizes.

    Raises a :class:`BraidError` naming the folder, what is missing or partial, and the rule
    :data:`FETCH_RULE`.
    """
    _check_network(network)
    folder = Path(folder)
    manifest = _manifest(folder, network)
    if manifest.get("network") != network:
        raise BraidError(f"{folder}: holds weights for {manifest.get('network')!r}, not {network!r}; {_fix()}")
    files = manifest.get("files") or {}
    have = _folder_files(folder)
    # every file must be there; weights at their recorded size (configs may be edited by hand)
    bad = [f"{name} ({'missing' if name not in have else f'{have[name]} of {size} bytes'})"
           for name, size in files.items()
           if name not in have or (not name.endswith(".json") and have[name] != size)]
    if not files:
        bad.append("no files")
    if bad:
        raise BraidError(f"{folder}: the {network} weights are incomplete: {', '.join(bad[:5])}; {_fix()}")


def weights_of(folder) -> str:
    """``"pretrained"`` or :data:`RANDOM`, as the folder's manifest records."""
    weights = _manifest(Path(folder)).get("weights")
    if weights not in (PRETRAINED, RANDOM):
        raise BraidError(f"{Path(folder) / MANIFEST}: weights {weights!r} is neither {PRETRAINED!r} nor {RANDOM!r}")
    return weights


# ---------------------------------------------------------------------------------------------
# weights into architectures


def _torch_load(path: Path):
    import torch

    try:
        # SwAV's .pth.tar is a plain dict of tensors too, which weights_only loads
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling raises many kinds
        raise BraidError(f"{path}: cannot read these weights ({type(err).__name__}: {err}); {_fix()}") from None


def _load_weights(network: str, model, path: Path) -> None:
    """Load the weights file of a torchvision-format folder into ``model`` (built by :func:`_architecture`)."""
    state = _torch_load(path)
    if not isinstance(state, dict):
        raise BraidError(f"{path}: expected a dict of weights, found a {type(state).__name__}")
    if network == "swav":
        state = state.get("state_dict", state)  # the training script's checkpoints nest it
        state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=network != "swav")
    except RuntimeError as err:
        raise BraidError(f"{path}: these are not {network} weights: {err}") from None
    if network == "swav":
        # strict=False as in swav:hubconf.py, which lets any checkpoint through: demand the backbone
        bad = [k for k in missing if k not in _SWAV_HEAD]
        if bad:
            raise BraidError(f"{path}: not a SwAV ResNet-50 checkpoint: {len(bad)} weights are missing "
                             f"({', '.join(bad[:5])}); {_fix()}")
        if unexpected:
            log.info("SwAV checkpoint: %d weights outside the backbone ignored (%s, ...)", len(unexpected),
                     unexpected[0])


def load(network: str, folder, device: str = "cpu"):
    """The network from a checked local folder, in eval mode, without gradients, on ``device``.

    Torchvision networks come as feature extractors (``create_feature_extractor``, as MindEye
    builds them) returning ``{layer: tensor}``; CLIP as ``CLIPVisionModelWithProjection``.
    Nothing is ever downloaded here.
    """
    folder = Path(folder)
    check(folder, network)
    if network == "clip":
        model = _load_clip(folder)
    else:
        import torch
        from torchvision.models.feature_extraction import create_feature_extractor

        name = _manifest(folder, network).get("weights_file")
        if not name:
            raise BraidError(f"{folder / MANIFEST}: names no weights_file; {_fix()}")
        base = _architecture(network)
        _load_weights(network, base, folder / name)
        base.eval()
        with torch.no_grad(), warnings.catch_warnings():
            # inception: tracing in train mode also sees the auxiliary classifier; the layers asked for are in both
            warnings.filterwarnings("ignore", message="NOTE: The nodes obtained by tracing", category=UserWarning)
            model = create_feature_extractor(base, return_nodes=list(metrics_of(network).values()))
    return model.to(device).eval().requires_grad_(False)


def _load_clip(folder: Path):
    """The vision tower with projection from a saved ``CLIPVisionModelWithProjection`` or a whole ``CLIPModel``.

    The hub repository holds the whole CLIP (config ``model_type: clip``): its ``visual_projection``
    is sized by the *top-level* ``projection_dim``, which the vision sub-config may lack or
    misstate (transformers writes its default, 512), so the loader is given that value. Every
    weight of the tower must come from the file: a missing one fails instead of staying random.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BraidError(f"{folder / 'config.json'}: unreadable ({err}); {_fix()}") from None
    kwargs = {}
    if config.get("model_type") == "clip":
        vision = CLIPVisionConfig.from_pretrained(folder, local_files_only=True)  # its vision_config
        vision.projection_dim = config.get("projection_dim", vision.projection_dim)
        kwargs["config"] = vision
    try:
        model, info = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True,
                                                                    output_loading_info=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        raise BraidError(f"{folder}: cannot load the CLIP vision tower: {err}") from None
    if info.get("missing_keys") or info.get("mismatched_keys"):
        bad = sorted(info.get("missing_keys") or []) + [str(k) for k in info.get("mismatched_keys") or []]
        raise BraidError(f"{folder}: not a CLIP vision tower with projection: {len(bad)} weights are missing or "
                         f"mis-shaped ({', '.join(bad[:5])}); {_fix()}")
    return model


# ---------------------------------------------------------------------------------------------
# writing weights folders


def fetch(network: str, out_dir, url: str | None = None) -> dict:
    """Download the pretrained weights of ``network`` into ``out_dir`` (run where the network is).

    Torchvision networks and SwAV: the weights file from ``url`` (default: the official one; an
    override is for tests and mirrors), under its own file name; a torchvision file name carries
    the sha256 prefix of its bytes (``alexnet-owt-7be5be79.pth``), which the download checks.
    SwAV's has none; its sha256 is recorded. The file must load into the architecture.
    CLIP: ``config.json``, ``preprocessor_config.json`` and ``model.safetensors`` of
    ``openai/clip-vit-large-patch14`` at :data:`CLIP_REVISION`.
    ``out_dir`` appears whole, with its manifest, or not at all. Returns the manifest.
    """
    _check_network(network)
    out_dir = Path(out_dir)
    if network == "clip":
        if url is not None:
            raise BraidError("fetch(url=...) applies to the torchvision networks; CLIP comes from the Hugging Face hub")
        return _fetch_clip(out_dir)
    import torch

    url = url or _official_url(network)
    name = Path(urlparse(url).path).name
    found = _HASH.search(name)
    prefix = found.group(1) if found else None
    if prefix is None and network != "swav":
        raise BraidError(f"{url}: the file name carries no sha256 prefix (name-<hex>.pth) to check the download against")
    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        dest = tmp / name
        try:
            torch.hub.download_url_to_file(url, str(dest), hash_prefix=prefix, progress=True)
        except Exception as err:  # noqa: BLE001 - HTTP, socket and hash errors alike
            hashed = prefix and isinstance(err, RuntimeError) and "hash" in str(err)  # torch.hub's check
            promise = f"; its sha256 must start with {prefix}, as its file name says" if hashed else ""
            raise BraidError(f"downloading the {network} weights from {url} failed: {err}{promise}") from None
        _load_weights(network, _architecture(network), dest)  # a wrong file fails here, not on a GPU node
        manifest = _write_manifest(tmp, network=network, source=url, weights=PRETRAINED, weights_file=name,
                                   sha256=file_sha256(dest))
    log.info("fetched the %s weights from %s to %s", network, url, out_dir)
    return manifest


def _fetch_clip(out_dir: Path) -> dict:
    from huggingface_hub import snapshot_download

    with atomic_output(out_dir) as tmp:
        try:
            snapshot_download(CLIP_REPO, revision=CLIP_REVISION, local_dir=tmp, allow_patterns=CLIP_FILES)
        except Exception as err:  # noqa: BLE001
            raise BraidError(f"downloading {CLIP_REPO}@{CLIP_REVISION} failed: {err}") from None
        for cache in Path(tmp).rglob(".cache"):  # snapshot_download's bookkeeping in local_dir
            shutil.rmtree(cache, ignore_errors=True)
        missing = [f for f in CLIP_FILES if not (Path(tmp) / f).is_file()]
        if missing:
            raise BraidError(f"{CLIP_REPO}@{CLIP_REVISION} lacks {', '.join(missing)}")
        _load_clip(Path(tmp))  # the vision tower loads whole, here rather than on a GPU node
        manifest = _write_manifest(Path(tmp), network="clip", source=CLIP_REPO, revision=CLIP_REVISION,
                                   weights=PRETRAINED)
    log.info("fetched %s@%s to %s", CLIP_REPO, CLIP_REVISION, out_dir)
    return manifest


def build_random(network: str, out_dir, seed: int = 0, clip_config: dict | None = None) -> dict:
    """The same architecture with random weights (``torch.manual_seed(seed)``), in :func:`fetch`'s layout.

    The manifest says ``weights: RANDOM``; everything computed from it is a plumbing check.
    Deep random networks in eval mode (batch norm with untrained running statistics) shrink their
    activations: Inception's ``avgpool`` features come out ~1e-8, EfficientNet-B1's ~1e-14. The
    metrics are scale-free (correlations), so they still compute; compare such features relatively.
    ``clip_config`` overrides :data:`CLIP_VIT_L14` (tests use a tiny one; the workflow never does).
    Returns the manifest.
    """
    import torch

    _check_network(network)
    if clip_config is not None and network != "clip":
        raise BraidError("clip_config applies to the clip network only")
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = _architecture(network, clip_config)
    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        info = dict(network=network, weights=RANDOM, seed=seed)
        if network == "clip":
            model.save_pretrained(tmp)
            (tmp / "preprocessor_config.json").write_text(json.dumps(_CLIP_PREPROCESSOR, indent=2))
            info.update(source="architecture: CLIPVisionModelWithProjection",
                        config=clip_config or CLIP_VIT_L14)
        else:
            url = _official_url(network)
            name = Path(urlparse(url).path).name
            state = model.state_dict()
            if network == "swav":  # as SwAV's checkpoint: DataParallel names, no classifier
                state = {f"module.{k}": v for k, v in state.items() if k not in _SWAV_HEAD}
            torch.save(state, tmp / name)
            info.update(source=f"architecture of {url}", weights_file=name)
        manifest = _write_manifest(tmp, **info)
    log.info("wrote %s with random weights (seed %d) to %s", network, seed, out_dir)
    return manifest


# ---------------------------------------------------------------------------------------------
# features


def to_256(images):
    """Float (n, 3, H, W) in [0, 1] -> (n, 3, 256, 256): MindEye's first resize (bilinear, no antialiasing)."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    x = torch.as_tensor(images, dtype=torch.float32)
    return resize(x, [256, 256], interpolation=InterpolationMode.BILINEAR, antialias=False)


def preprocess(network: str, x):
    """The network's ME preprocessing of ME images (n, 3, 256, 256): resize (bilinear, no antialiasing), normalise."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import normalize, resize

    size, mean, std = PREPROCESS[network]
    x = resize(x, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=False)
    return normalize(x, list(mean), list(std))


def features(network: str, model, images, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Flattened float32 features ``{metric: (n, d)}`` of the ME images for each metric of ``network``.

    ``images``: float (n, 3, 256, 256) in [0, 1] (:func:`to_256` brings other sizes there);
    ``model``: from :func:`load`. Runs in batches under ``torch.inference_mode`` on the model's device.
    """
    import torch

    layers = metrics_of(network)
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.ndim != 4 or tuple(x.shape[1:]) != (3, 256, 256):
        raise BraidError(f"{network} features need ME images of shape (n, 3, 256, 256), got {tuple(x.shape)}; "
                         "resize them with metric_networks.to_256")
    if len(x) == 0:
        raise BraidError(f"{network} features: no images")
    param = next(model.parameters())
    out: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            batch = preprocess(network, x[start:start + batch_size].to(param.device)).to(param.dtype)
            if network == "clip":
                result = model(pixel_values=batch)
                got = {layer: getattr(result, layer) for layer in layers.values()}
            else:
                got = model(batch)
            for name, layer in layers.items():
                out[name].append(got[layer].float().flatten(1).cpu().numpy())
    return {name: np.concatenate(parts).astype(np.float32, copy=False) for name, parts in out.items()}


def correlation_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row ``scipy.spatial.distance.correlation(a[i], b[i])`` (1 - Pearson r, clipped to [0, 2]), float64."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    if a.shape != b.shape:
        raise BraidError(f"correlation distance of rows needs equal shapes, got {a.shape} and {b.shape}")
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        dist = 1.0 - (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))
    return np.clip(dist, 0.0, 2.0)
