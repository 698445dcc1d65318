"""The metric networks: architectures, weights folders, the ME preprocessing and features.

Every expected value is computed here independently of ``braid.metric_networks``: networks built
from torchvision/transformers with the same seed, the ME preprocessing written out with its
literal numbers (metrics.md §2), the forward passes taken through the networks' own submodules.
Weights are random (no network access); the real checkpoints' formats are imitated where they
differ from what ``build_random`` writes (SwAV's, the hub's whole CLIP).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from braid import metric_networks as mn
from braid.common import BraidError

SEED = 7
IMAGENET = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
CLIP_NORM = dict(mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711])
TINY_CLIP = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, patch_size=14,
                 image_size=224, projection_dim=16)
TOL = dict(rtol=1e-4, atol=1e-5)
MANIFEST = "braid_metric_weights.json"


def me_preprocess(size: int, norm: dict):
    """MindEye's preprocessing for one network (torchvision 0.15 tensors: no antialiasing)."""
    return transforms.Compose([
        transforms.Resize((size, size), interpolation=InterpolationMode.BILINEAR, antialias=False),
        transforms.Normalize(**norm),
    ])


def me_images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth random scenes (coarse colours, upsampled) with fine noise on top, in [0, 1], 256²."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=(256, 256), mode="bicubic",
                                             align_corners=False)
    return (coarse + 0.15 * torch.rand(n, 3, 256, 256, generator=g)).clamp(0, 1)


def assert_features_close(got: np.ndarray, want: np.ndarray, name: str = ""):
    """rtol 1e-4, atol 1e-5 on the features in units of their RMS.

    Random networks in eval mode (batch norm with untrained running statistics) shrink their
    activations layer after layer: Inception's avgpool features are ~1e-8, EfficientNet's ~1e-14,
    where a plain atol of 1e-5 would accept anything. Every metric is scale-free.
    """
    scale = float(np.sqrt(np.mean(np.asarray(want, np.float64) ** 2)))
    assert scale > 0, name
    # the comparison means something: the images' features differ far beyond the tolerance
    assert np.abs(want[0] - want[1]).max() / scale > 1e-2, name
    np.testing.assert_allclose(got / scale, want / scale, **TOL, err_msg=name)


def write_manifest(folder: Path, network: str, weights_file: str | None = None, weights: str = "pretrained"):
    """A manifest as a fetched folder has it, written by hand."""
    files = {f.name: f.stat().st_size for f in folder.iterdir() if f.name != MANIFEST}
    info = {"network": network, "source": "test", "weights": weights, "files": files}
    if weights_file:
        info["weights_file"] = weights_file
    (folder / MANIFEST).write_text(json.dumps(info))


@pytest.fixture(scope="module")
def random_folders(tmp_path_factory):
    """build_random folders, made once per network on first use."""
    root = tmp_path_factory.mktemp("metric_weights")
    made = {}

    def get(network: str) -> Path:
        if network not in made:
            kw = {"clip_config": TINY_CLIP} if network == "clip" else {}
            mn.build_random(network, root / network, seed=SEED, **kw)
            made[network] = root / network
        return made[network]

    return get


# ---------------------------------------------------------------------------------------------
# the public constants


def test_metric_table():
    assert mn.NETWORKS == ("alexnet", "inception", "clip", "efficientnet", "swav")
    assert mn.METRICS == {
        "alexnet2": ("alexnet", "features.4", "two_way"), "alexnet5": ("alexnet", "features.11", "two_way"),
        "inception": ("inception", "avgpool", "two_way"), "clip": ("clip", "image_embeds", "two_way"),
        "efficientnet": ("efficientnet", "avgpool", "distance"), "swav": ("swav", "avgpool", "distance"),
    }
    assert mn.FETCH_RULE == "metrics_fetch"
    assert mn.RANDOM == "random (not comparable)"


# ---------------------------------------------------------------------------------------------
# 1, 2: features of the random networks against direct computations


def _reference(network: str, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The ME features of ``network`` built from the seed, computed by hand through its submodules."""
    tvm = torchvision.models
    torch.manual_seed(SEED)
    with torch.no_grad():
        if network == "alexnet":
            net = tvm.alexnet().eval()
            x = me_preprocess(256, IMAGENET)(x)
            return {"alexnet2": net.features[:5](x).flatten(1).numpy(),
                    "alexnet5": net.features[:12](x).flatten(1).numpy()}
        if network == "inception":
            net = tvm.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False).eval()
            got = []
            hook = net.avgpool.register_forward_hook(lambda mod, args, out: got.append(out))
            net(me_preprocess(342, IMAGENET)(x))
            hook.remove()
            return {"inception": got[0].flatten(1).numpy()}
        if network == "efficientnet":
            net = tvm.efficientnet_b1().eval()
            x = me_preprocess(255, IMAGENET)(x)
            return {"efficientnet": net.avgpool(net.features(x)).flatten(1).numpy()}
        if network == "swav":
            net = tvm.resnet50().eval()
            x = me_preprocess(224, IMAGENET)(x)
            x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
            return {"swav": net.avgpool(x).flatten(1).numpy()}
    raise AssertionError(network)


@pytest.mark.parametrize("network, n", [("alexnet", 3), ("inception", 2), ("efficientnet", 3), ("swav", 3)])
def test_features_match_direct_computation(random_folders, network, n):
    folder = random_folders(network)
    x = me_images(n, seed=1)
    model = mn.load(network, folder)
    assert not model.training
    got = mn.features(network, model, x.numpy(), batch_size=2)  # numpy in, batches of 2
    want = _reference(network, x)
    assert set(got) == set(want)
    assert {name: f.shape[1] for name, f in got.items()} == {
        "alexnet": {"alexnet2": 192 * 31 * 31, "alexnet5": 256 * 15 * 15}, "inception": {"inception": 2048},
        "efficientnet": {"efficientnet": 1280}, "swav": {"swav": 2048}}[network]
    for name in want:
        assert got[name].dtype == np.float32 and got[name].shape == want[name].shape
        assert_features_close(got[name], want[name], name)
    assert mn.weights_of(folder) == mn.RANDOM


def test_features_refuse_other_sizes():
    with pytest.raises(BraidError, match="to_256"):  # checked before the model is used
        mn.features("efficientnet", torch.nn.Linear(1, 1), torch.rand(1, 3, 224, 224))


def test_clip_features_match_transformers(random_folders):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = random_folders("clip")
    assert {"config.json", "model.safetensors", MANIFEST} <= {f.name for f in folder.iterdir()}
    x = me_images(3, seed=3)
    got = mn.features("clip", mn.load("clip", folder), x, batch_size=2)
    pixels = me_preprocess(224, CLIP_NORM)(x)
    with torch.no_grad():
        saved = CLIPVisionModelWithProjection.from_pretrained(folder).eval()
        want = saved(pixel_values=pixels).image_embeds.numpy()
        torch.manual_seed(SEED)  # the weights are the seed's
        fresh = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP)).eval()
        from_seed = fresh(pixel_values=pixels).image_embeds.numpy()
    assert got["clip"].shape == (3, 16)
    assert_features_close(got["clip"], want)
    assert_features_close(got["clip"], from_seed)
    assert mn.weights_of(folder) == mn.RANDOM


def test_clip_from_the_hub_layout(tmp_path):
    """The hub repository holds the whole CLIP; its vision tower and top-level projection are loaded."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, vocab_size=99,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = {k: v for k, v in TINY_CLIP.items() if k != "projection_dim"}
    torch.manual_seed(SEED)
    full = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    folder = tmp_path / "clip"
    full.save_pretrained(folder)
    write_manifest(folder, "clip")
    x = me_images(2, seed=4)
    got = mn.features("clip", mn.load("clip", folder), x)["clip"]
    with torch.no_grad():
        pooled = full.vision_model(pixel_values=me_preprocess(224, CLIP_NORM)(x)).pooler_output
        want = full.visual_projection(pooled).numpy()
    assert got.shape == (2, 16)
    assert_features_close(got, want)


@pytest.mark.parametrize("network, count", [("alexnet", 61_100_840), ("inception", 27_161_264),
                                            ("clip", 303_966_208), ("efficientnet", 7_794_184),
                                            ("swav", 25_557_032)])
def test_n_parameters(network, count):
    tvm = torchvision.models
    with torch.device("meta"):
        if network == "clip":
            from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

            net = CLIPVisionModelWithProjection(CLIPVisionConfig(
                hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, patch_size=14,
                image_size=224, projection_dim=768, hidden_act="quick_gelu"))
        else:
            net = {"alexnet": tvm.alexnet, "efficientnet": tvm.efficientnet_b1, "swav": tvm.resnet50,
                   "inception": functools.partial(tvm.inception_v3, aux_logits=True, init_weights=False)}[network]()
    assert sum(p.numel() for p in net.parameters()) == count
    assert mn.n_parameters(network) == count


def test_clip_config_is_vit_l14():
    cfg = mn.CLIP_VIT_L14
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["intermediate_size"],
            cfg["patch_size"], cfg["image_size"], cfg["projection_dim"], cfg["hidden_act"]) == (
        1024, 24, 16, 4096, 14, 224, 768, "quick_gelu")


# ---------------------------------------------------------------------------------------------
# 3: SwAV's checkpoint format


def _resnet50_state(seed: int) -> dict:
    torch.manual_seed(seed)
    return torchvision.models.resnet50().state_dict()


def test_swav_checkpoint(tmp_path):
    state = _resnet50_state(11)
    ckpt = {f"module.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    ckpt["module.projection_head.0.weight"] = torch.randn(16, 2048)
    ckpt["module.prototypes.weight"] = torch.randn(30, 16)
    name = "swav_800ep_pretrain.pth.tar"
    folder = tmp_path / "swav"
    folder.mkdir()
    torch.save({"state_dict": ckpt, "epoch": 800}, folder / name)
    write_manifest(folder, "swav", name)

    model = mn.load("swav", folder)
    loaded = model.state_dict()
    backbone = [k for k in state if not k.startswith("fc.")]
    assert backbone and all(torch.equal(loaded[k], state[k]) for k in backbone)

    del ckpt["module.layer1.0.conv1.weight"]
    torch.save({"state_dict": ckpt}, folder / name)
    write_manifest(folder, "swav", name)
    with pytest.raises(BraidError, match=r"layer1\.0\.conv1\.weight"):
        mn.load("swav", folder)


# ---------------------------------------------------------------------------------------------
# 4: completeness checks


def test_check_empty_and_missing(tmp_path):
    for folder in (tmp_path, tmp_path / "absent"):
        with pytest.raises(BraidError, match="metrics_fetch") as err:
            mn.check(folder, "alexnet")
        assert str(folder) in str(err.value) and "alexnet" in str(err.value)
        with pytest.raises(BraidError, match="metrics_fetch"):
            mn.load("alexnet", folder)
        with pytest.raises(BraidError, match="metrics_fetch"):
            mn.weights_of(folder)


def test_check_truncated_and_wrong_network(tmp_path):
    folder = tmp_path / "eff"
    manifest = mn.build_random("efficientnet", folder, seed=1)
    assert manifest["weights"] == mn.RANDOM and manifest["seed"] == 1
    assert json.loads((folder / MANIFEST).read_text())["weights"] == mn.RANDOM
    mn.check(folder, "efficientnet")
    assert mn.weights_of(folder) == mn.RANDOM
    with pytest.raises(BraidError, match="swav"):
        mn.check(folder, "swav")
    (weights,) = [f for f in folder.iterdir() if f.name != MANIFEST]
    assert weights.name == Path(torchvision.models.EfficientNet_B1_Weights.IMAGENET1K_V2.url).name
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    for call in (lambda: mn.check(folder, "efficientnet"), lambda: mn.load("efficientnet", folder)):
        with pytest.raises(BraidError, match="metrics_fetch") as err:
            call()
        assert weights.name in str(err.value) and str(folder) in str(err.value)
    weights.unlink()
    with pytest.raises(BraidError, match="missing"):
        mn.check(folder, "efficientnet")


def test_build_random_is_seeded(tmp_path):
    mn.build_random("efficientnet", tmp_path / "a", seed=4)
    mn.build_random("efficientnet", tmp_path / "b", seed=4)
    name = Path(torchvision.models.EfficientNet_B1_Weights.IMAGENET1K_V2.url).name
    a = torch.load(tmp_path / "a" / name, weights_only=True)
    b = torch.load(tmp_path / "b" / name, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.glob(".tmp-*"))


# ---------------------------------------------------------------------------------------------
# 5: fetch over HTTP (a real server on loopback)


@pytest.fixture()
def web(tmp_path):
    """A folder served by http.server on 127.0.0.1; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_over_http(web, tmp_path):
    root, base = web
    torch.manual_seed(SEED)
    state = torchvision.models.alexnet().state_dict()
    torch.save(state, root / "upload")
    digest = hashlib.sha256((root / "upload").read_bytes()).hexdigest()
    name = f"alexnet-owt-{digest[:8]}.pth"
    (root / "upload").rename(root / name)

    out = tmp_path / "weights" / "alexnet"
    manifest = mn.fetch("alexnet", out, url=f"{base}/{name}")
    assert manifest["weights"] == "pretrained" and manifest["sha256"] == digest
    assert manifest["files"] == {name: (root / name).stat().st_size}
    assert mn.weights_of(out) == "pretrained"
    model = mn.load("alexnet", out)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    assert len(loaded) == 10  # the five convolutions of features[:12]

    # bytes whose sha256 does not start with the name's prefix are refused: corrupt ones, and
    # even loadable weights (so it is the hash check that refuses them, not the loading)
    assert not digest.startswith("deadbeef")
    out2 = tmp_path / "weights" / "alexnet2"
    bad = b"not the weights" * 1000
    assert not hashlib.sha256(bad).hexdigest().startswith("0badc0de")
    (root / "alexnet-owt-0badc0de.pth").write_bytes(bad)
    os.link(root / name, root / "alexnet-owt-deadbeef.pth")
    for prefix in ("0badc0de", "deadbeef"):
        with pytest.raises(BraidError, match=f"sha256 must start with {prefix}"):
            mn.fetch("alexnet", out2, url=f"{base}/alexnet-owt-{prefix}.pth")
        assert not out2.exists()
    with pytest.raises(BraidError):  # not there at all (404)
        mn.fetch("alexnet", out2, url=f"{base}/alexnet-owt-0123abcd.pth")
    assert not out2.exists()
    assert not list((tmp_path / "weights").glob(".tmp-*"))


# ---------------------------------------------------------------------------------------------
# 6: helpers


def test_correlation_distance_matches_scipy():
    from scipy.spatial.distance import correlation

    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 300))
    b = rng.normal(size=(6, 300)) + 0.5 * a
    b[4] = 2 * a[4] + 1  # distance 0
    b[5] = -3 * a[5]  # distance 2
    got = mn.correlation_distance(a, b)
    assert got.dtype == np.float64 and got.shape == (6,)
    want = np.array([correlation(a[i], b[i]) for i in range(len(a))])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[4:], [0.0, 2.0], atol=1e-12)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    want32 = np.array([correlation(a32[i].astype(np.float64), b32[i].astype(np.float64)) for i in range(len(a))])
    np.testing.assert_allclose(mn.correlation_distance(a32, b32), want32, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [425, 224, 256])
def test_to_256(size):
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    want = torch.nn.functional.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False, antialias=False)
    got = mn.to_256(x.numpy())
    assert got.shape == (2, 3, 256, 256) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
