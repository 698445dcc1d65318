"""Latent cache: preprocessing (pinned to PIL's bicubic resize, as Brain-Diffuser's), scale, every
VAE dtype, and lookup by NSD id."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from braid import nsd
from braid.common import BraidError
from braid.latents import LatentCache, cache_latents, preprocess, read_stimuli
from braid.models import load_vae


def test_preprocess_range_and_size():
    img = np.zeros((2, 425, 425, 3), np.uint8)
    img[1] = 255
    x = preprocess(img, 64)
    assert x.shape == (2, 3, 64, 64)
    assert torch.allclose(x[0], torch.tensor(-1.0)) and torch.allclose(x[1], torch.tensor(1.0))


def test_preprocess_refuses_what_is_not_uint8_rgb():
    for bad in (np.zeros((1, 8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8), np.zeros((1, 8, 8, 4), np.uint8)):
        with pytest.raises(BraidError, match=r"stimuli must be uint8 \(n, H, W, 3\)"):
            preprocess(bad, 8)


def test_preprocess_is_brain_diffusers_pil_bicubic_without_crop():
    """Brain-Diffuser: PIL resize(BICUBIC) -> to_tensor -> 2x - 1, on noise (where filters differ most)
    and on an image whose right and bottom edges are marked (a crop or a flip would move them)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    marked = np.full((425, 425, 3), 128, np.uint8)
    marked[:, -60:, 0] = 255  # red band at the right edge
    marked[-60:, :, 2] = 0  # no blue at the bottom
    images = np.stack([rng.integers(0, 256, (425, 425, 3), dtype=np.uint8), marked])
    x = preprocess(images, 64).numpy()
    for img, got in zip(images, x):
        ref = np.asarray(Image.fromarray(img).resize((64, 64), Image.Resampling.BICUBIC), np.float32) / 255 * 2 - 1
        np.testing.assert_allclose(np.moveaxis(got, 0, -1), ref, atol=1e-6)
    assert (x[1, 0, :, -5:] > 0.9).all() and (x[1, 0, :, :40] < 0.1).all()
    assert (x[1, 2, -5:, :] < -0.9).all() and (x[1, 2, :40, :] > -0.1).all()
    same = preprocess(images[:, :64, :64], 64).numpy()  # already the model's size: no resampling
    np.testing.assert_array_equal(np.moveaxis(same, 1, -1), images[:, :64, :64] / np.float32(255) * 2 - 1)


def test_cache_is_scaled_posterior_mean_keyed_by_id(mirror, tiny_model, tmp_path):
    root, _ = mirror
    ids = np.array([5, 2, 9, 2])
    cache_latents(root / nsd.STIMULI, tiny_model, ids, tmp_path / "latents.zarr", image_size=64)
    cache = LatentCache(tmp_path / "latents.zarr")
    assert cache.ids.tolist() == [2, 5, 9] and cache.shape == (4, 8, 8)
    vae = load_vae(tiny_model)
    with torch.no_grad():
        x = preprocess(read_stimuli(root / nsd.STIMULI, np.array([9, 5])), 64)
        expected = (vae.encode(x).latent_dist.mean * 0.13025).numpy()
    assert vae.config.scaling_factor == 0.13025
    np.testing.assert_allclose(cache.get([9, 5]), expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(BraidError, match=r"no latents for NSD ids \[3\]"):
        cache.get([3])
    identity = cache.attrs["identity"]
    assert identity["scaling_factor"] == 0.13025 and identity["image_size"] == 64 and identity["dtype"] == "float32"
    assert identity["preprocessing"] == "pil-bicubic-uint8-nocrop"
    np.testing.assert_array_equal(cache.get([9, 2, 9]), cache.get([9, 2, 9])[[0, 1, 0]])
    np.testing.assert_array_equal(cache.get([9, 2, 9])[1], cache.get([2])[0])
    with pytest.raises(BraidError, match=r"no latents for NSD ids \[1000000\]"):
        cache.get([10**6])  # beyond the largest id
    with pytest.raises(BraidError, match="no Zarr store here.*--forcerun latents_encode"):
        LatentCache(tmp_path / "nothing.zarr")


def test_no_images_give_no_latents(tiny_model):
    from braid.latents import encode_images

    z = encode_images(np.zeros((0, 425, 425, 3), np.uint8), load_vae(tiny_model), 64)
    assert z.shape == (0, 4, 8, 8) and z.dtype == np.float32


def float16_vae_copy(model, dest):
    """The tiny model with its VAE declared fit for float16 (force_upcast false), as sdxl-vae-fp16-fix is."""
    import json
    import shutil

    shutil.copytree(model, dest)
    cfg = json.loads((dest / "vae" / "config.json").read_text())
    (dest / "vae" / "config.json").write_text(json.dumps({**cfg, "force_upcast": False}))
    return dest


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_vae_dtype_caches_finite_latents_close_to_float32(mirror, tiny_model, tmp_path, dtype):
    """bfloat16 runs in bfloat16; float16 only with a VAE made for it (the SDXL VAE's is refused)."""
    root, _ = mirror
    ids = np.array([1, 2, 3])
    model = tiny_model if dtype == "bfloat16" else float16_vae_copy(tiny_model, tmp_path / "fp16-vae")
    cache_latents(root / nsd.STIMULI, tiny_model, ids, tmp_path / "f32.zarr", image_size=64)
    cache_latents(root / nsd.STIMULI, model, ids, tmp_path / f"{dtype}.zarr", image_size=64, dtype=dtype)
    ref, got = LatentCache(tmp_path / "f32.zarr").get(ids), LatentCache(tmp_path / f"{dtype}.zarr").get(ids)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, atol=0.05 * np.abs(ref).max())
    assert not np.array_equal(got, ref)  # it really ran in the lower precision
    assert load_vae(model, dtype=dtype).dtype == getattr(torch, dtype)


def test_float16_is_refused_for_a_vae_that_overflows_in_it(mirror, tiny_model, tmp_path):
    root, _ = mirror
    with pytest.raises(BraidError, match="model.dtype float16: the VAE .* overflows in float16 .*bfloat16"):
        cache_latents(root / nsd.STIMULI, tiny_model, [1], tmp_path / "c.zarr", image_size=64, dtype="float16")
    assert not (tmp_path / "c.zarr").exists()


def test_only_ids_not_yet_cached_are_encoded(mirror, tiny_model, tmp_path):
    """Subject A's images, then subject B's (sharing two): B's job encodes only its new ids, and
    A's rows stay bit-identical; values equal the VAE called by hand on PIL-resized images."""
    import zarr

    root, _ = mirror
    store = tmp_path / "cache.zarr"
    first = cache_latents(root / nsd.STIMULI, tiny_model, [7, 3, 5, 3], store, image_size=64, batch_size=2)
    assert (first["requested"], first["encoded"], first["reused"], first["n_cached"]) == (3, 3, 0, 3)
    before = zarr.open_group(store, mode="r")["latents"][:3]
    second = cache_latents(root / nsd.STIMULI, tiny_model, [5, 3, 11, 12], store, image_size=64, batch_size=3)
    assert (second["requested"], second["encoded"], second["reused"], second["n_cached"]) == (4, 2, 2, 5)
    group = zarr.open_group(store, mode="r")
    assert group["nsd_id"][:].tolist() == [3, 5, 7, 11, 12]  # appended, in id order within a job
    np.testing.assert_array_equal(group["latents"][:3], before)
    again = cache_latents(root / nsd.STIMULI, tiny_model, [12, 7], store, image_size=64)
    assert again["encoded"] == 0 and again["n_cached"] == 5
    vae = load_vae(tiny_model)
    with torch.no_grad():
        x = preprocess(read_stimuli(root / nsd.STIMULI, np.array([12, 3])), 64)
        expected = (vae.encode(x).latent_dist.mean * 0.13025).numpy()
    np.testing.assert_allclose(LatentCache(store).get([12, 3]), expected, rtol=1e-4, atol=1e-6)


def test_a_store_never_mixes_settings(mirror, tiny_model, tmp_path):
    root, _ = mirror
    store = tmp_path / "cache.zarr"
    cache_latents(root / nsd.STIMULI, tiny_model, [1, 2], store, image_size=64, identity={"model": "tiny"})
    with pytest.raises(BraidError, match="cache.zarr: holds latents of .*never mixed"):
        cache_latents(root / nsd.STIMULI, tiny_model, [3], store, image_size=32, identity={"model": "tiny"})
    with pytest.raises(BraidError, match="never mixed"):
        cache_latents(root / nsd.STIMULI, tiny_model, [3], store, image_size=64, identity={"model": "other"})
    assert LatentCache(store).ids.tolist() == [1, 2]


def test_a_subjects_manifest_reads_the_shared_store(mirror, tiny_model, tmp_path):
    from braid.latents import write_manifest

    root, _ = mirror
    result = cache_latents(root / nsd.STIMULI, tiny_model, [4, 6], tmp_path / "cache.zarr", image_size=64)
    write_manifest(tmp_path / "subj01.json", result, [6, 4])
    via_manifest = LatentCache(tmp_path / "subj01.json")
    np.testing.assert_array_equal(via_manifest.get([6]), LatentCache(tmp_path / "cache.zarr").get([6]))
    assert via_manifest.wanted.tolist() == [4, 6]
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(BraidError, match="broken.json: not a BRAID latent manifest"):
        LatentCache(tmp_path / "broken.json")


KILLED_ENCODE = """
import sys, time
import braid.latents as L
L.CHUNK = 2
slow = L.encode_batches
def encode_batches(*a, **k):
    for item in slow(*a, **k):
        time.sleep(0.4)
        yield item
L.encode_batches = encode_batches
L.cache_latents(sys.argv[1], sys.argv[2], list(range(20)), sys.argv[3], image_size=64, batch_size=2)
"""


def test_an_interrupted_encode_resumes(mirror, tiny_model, tmp_path):
    """kill -9 mid-encode: the committed ids survive, the rerun encodes only the rest, and the
    result equals an uninterrupted cache."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import zarr

    root, _ = mirror
    store = tmp_path / "cache.zarr"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_ENCODE, str(root / nsd.STIMULI), str(tiny_model), str(store)],
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    committed = 0
    while committed < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
        try:
            committed = zarr.open_group(store, mode="r").attrs["n_committed"]
        except Exception:
            pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = zarr.open_group(store, mode="r").attrs["n_committed"]
    assert 4 <= kept < 20, kept
    resumed = cache_latents(root / nsd.STIMULI, tiny_model, list(range(20)), store, image_size=64)
    assert resumed["encoded"] == 20 - kept and resumed["n_cached"] == 20
    clean = tmp_path / "clean.zarr"
    cache_latents(root / nsd.STIMULI, tiny_model, list(range(20)), clean, image_size=64)
    np.testing.assert_allclose(LatentCache(store).get(range(20)), LatentCache(clean).get(range(20)), rtol=1e-4, atol=1e-5)


def test_read_stimuli_any_order(mirror, tmp_path):
    root, _ = mirror
    a = read_stimuli(root / nsd.STIMULI, np.array([4, 1]))
    b = read_stimuli(root / nsd.STIMULI, np.array([1, 4]))
    np.testing.assert_array_equal(a[::-1], b)
    with pytest.raises(BraidError, match="imgBrick has"):
        read_stimuli(root / nsd.STIMULI, np.array([10_000]))
    with pytest.raises(BraidError, match="imgBrick has"):
        read_stimuli(root / nsd.STIMULI, np.array([-1]))
    import h5py

    with h5py.File(root / nsd.STIMULI, "r") as f:
        n, first, last = f["imgBrick"].shape[0], f["imgBrick"][0], f["imgBrick"][-1]
    np.testing.assert_array_equal(read_stimuli(root / nsd.STIMULI, np.array([n - 1, 0])), np.stack([last, first]))
    with pytest.raises(BraidError, match="imgBrick has"):
        read_stimuli(root / nsd.STIMULI, np.array([n]))
    assert read_stimuli(root / nsd.STIMULI, np.array([], np.int64)).shape == (0, 425, 425, 3)
    bad = tmp_path / "corrupt.hdf5"
    bad.write_bytes((root / nsd.STIMULI).read_bytes()[:3000])
    with pytest.raises(BraidError, match="corrupt.hdf5: cannot read imgBrick"):
        read_stimuli(bad, np.array([1]))


def test_latent_statistics_are_over_distinct_training_images_only(mirror, tiny_model, tmp_path):
    import pandas as pd
    import zarr

    from braid.latents import latent_statistics

    root, _ = mirror
    store = tmp_path / "cache.zarr"
    cache_latents(root / nsd.STIMULI, tiny_model, range(12), store, image_size=64)
    trials = pd.DataFrame({"nsd_id": [0, 0, 0, 3, 5, 7, 9, 11],
                           "split": ["train", "train", "train", "train", "train", "val", "test", "test"]})
    trials.to_parquet(tmp_path / "trials.parquet")
    latent_statistics(store, tmp_path / "trials.parquet", tmp_path / "stats.zarr", tmp_path / "stats.png")
    raw = zarr.open_group(store, mode="r")
    rows = {int(i): k for k, i in enumerate(raw["nsd_id"][:])}
    train = raw["latents"][:][[rows[0], rows[3], rows[5]]].astype(np.float64)  # image 0 once, not three times
    stats = zarr.open_group(tmp_path / "stats.zarr", mode="r")
    np.testing.assert_allclose(stats["mean"][:], train.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats["std"][:], train.std(0), rtol=1e-5, atol=1e-7)
    per_channel = train.transpose(1, 0, 2, 3).reshape(4, -1)
    np.testing.assert_allclose(stats["channel_mean"][:], per_channel.mean(1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats["channel_std"][:], per_channel.std(1), rtol=1e-5)
    assert stats.attrs["n_images"] == 3 and stats.attrs["identity"]["image_size"] == 64
    assert (tmp_path / "stats.png").read_bytes()[:4] == b"\x89PNG"
    trials.assign(split="test").to_parquet(tmp_path / "none.parquet")
    with pytest.raises(BraidError, match="none.parquet: no training trials"):
        latent_statistics(store, tmp_path / "none.parquet", tmp_path / "s2.zarr")


def test_sdxl_vae_architecture_has_the_published_parameter_count():
    from diffusers import AutoencoderKL

    from braid.models import SDXL_VAE_CONFIG

    with torch.device("meta"):
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # the 335 MB fp32 file of SDXL's VAE
    assert sum(p.numel() for m in (vae.encoder, vae.quant_conv) for p in m.parameters()) == 34_163_664


# ---- the GPU paths, proven on the CPU: compilation, prefetched preprocessing ----------------


def test_a_failing_compiler_leaves_the_cache_job_running_eagerly(mirror, tiny_model, tmp_path, failing_compiler,
                                                                   caplog):
    """model.compile with no working C compiler (inductor's $CXX fails, as in an image without gcc):
    one warning, and the latents equal the eager job's."""
    root, _ = mirror
    ids = [2, 5, 9]
    with caplog.at_level("WARNING", logger="braid.device"):
        cache_latents(root / nsd.STIMULI, tiny_model, ids, tmp_path / "compiled.zarr", image_size=64, batch_size=2,
                      compile=True)
    assert caplog.text.count("torch.compile failed") == 1
    cache_latents(root / nsd.STIMULI, tiny_model, ids, tmp_path / "eager.zarr", image_size=64, batch_size=2)
    np.testing.assert_array_equal(LatentCache(tmp_path / "compiled.zarr").get(ids), LatentCache(tmp_path / "eager.zarr").get(ids))


def test_a_compiled_job_compiles_once_padding_its_last_batch(mirror, tiny_model, tmp_path):
    """5 images in batches of 2: the last batch (1 image) is padded to 2, so torch.compile builds one
    graph, not a second for the odd shape; the padded copies are dropped and the latents equal eager."""
    from torch._dynamo.utils import counters

    root, _ = mirror
    torch._dynamo.reset()
    counters.clear()
    ids = [1, 3, 4, 6, 8]
    cache_latents(root / nsd.STIMULI, tiny_model, ids, tmp_path / "compiled.zarr", image_size=64, batch_size=2,
                  compile=True)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    cache_latents(root / nsd.STIMULI, tiny_model, ids, tmp_path / "eager.zarr", image_size=64, batch_size=2)
    z = LatentCache(tmp_path / "compiled.zarr")
    assert z.ids.tolist() == ids
    np.testing.assert_allclose(z.get(ids), LatentCache(tmp_path / "eager.zarr").get(ids), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_stimuli_are_read_and_resized_in_the_prefetch_thread(mirror, tiny_model, tmp_path, monkeypatch):
    """The GPU must not wait for PIL: every resize of a cache job runs in the background thread."""
    import threading

    import braid.latents as L

    root, _ = mirror
    threads = []
    real = L.preprocess

    def recording(images, size):
        threads.append(threading.current_thread().name)
        return real(images, size)

    monkeypatch.setattr(L, "preprocess", recording)
    monkeypatch.setattr(L, "CHUNK", 2)
    cache_latents(root / nsd.STIMULI, tiny_model, [1, 2, 3, 4, 5], tmp_path / "c.zarr", image_size=64, batch_size=2)
    assert len(threads) == 3 and all(name.startswith("braid-stimuli") for name in threads), threads


def test_every_loader_runs_the_vae_in_the_same_dtype_when_its_config_omits_force_upcast(tiny_model, tmp_path):
    """A VAE config without force_upcast: diffusers takes it as True, so float16 must run the VAE in
    float32 in latent caching, decode-only and img2img alike."""
    import json
    import shutil

    from braid.models import load_img2img

    model = tmp_path / "no-flag"
    shutil.copytree(tiny_model, model)
    cfg = json.loads((model / "vae" / "config.json").read_text())
    cfg.pop("force_upcast")
    (model / "vae" / "config.json").write_text(json.dumps(cfg))
    assert load_vae(model, dtype="float16").dtype == torch.float32
    assert load_img2img(model, dtype="float16").vae.dtype == torch.float32
    assert load_vae(model, dtype="bfloat16").dtype == torch.bfloat16
