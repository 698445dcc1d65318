"""img2img from latents: the empty-output guard, averaging repeats, what is reproducible, every dtype,
and the images pinned against diffusers and the VAE called by hand."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline
from PIL import Image

from braid.common import BraidError
from braid.models import decode_latents, load_img2img
from braid.reconstruct import average_by_image, check_strength, decode, reconstruct

PARAMS = {"steps": 4, "prompt": "", "negative_prompt": "", "dtype": "float32"}


def test_strength_guard_names_the_fix():
    check_strength(0.5, 2)
    with pytest.raises(BraidError, match=r"int\(2\*0.4\) = 0.*at least 3"):
        check_strength(0.4, 2)
    with pytest.raises(BraidError, match="outside"):
        check_strength(1.5, 10)
    check_strength(1.0, 10)  # the whole schedule: allowed
    with pytest.raises(BraidError, match="outside"):
        check_strength(0.0, 10)


def test_average_by_image():
    pred = np.arange(12, dtype=np.float32).reshape(4, 3)
    ids, mean = average_by_image(pred, np.array([7, 3, 7, 3]))
    assert ids.tolist() == [3, 7]
    np.testing.assert_allclose(mean, [[6, 7, 8], [3, 4, 5]])


def write_predictions(path, pred, ids):
    root = zarr.open_group(path, mode="w")
    root.create_array("pred", data=pred)
    root.create_array("nsd_id", data=ids)
    root.create_array("global_trial", data=np.arange(len(ids)))
    root.create_array("z_mean", data=np.zeros(pred.shape[1:], np.float32))
    root.create_array("z_std", data=np.ones(pred.shape[1:], np.float32))
    root.attrs["n_parameters"] = 1


@pytest.fixture(scope="module")
def predictions(tmp_path_factory):
    """Three test trials of two images (11 twice), latents at the scale of real scaled SDXL latents."""
    path = tmp_path_factory.mktemp("pred") / "p.zarr"
    pred = np.random.default_rng(1).standard_normal((3, 4, 8, 8)).astype(np.float32)
    write_predictions(path, pred, np.array([11, 4, 11]))
    return path, pred


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def test_one_png_per_image_and_bit_identical_for_the_same_settings(tiny_model, predictions, tmp_path):
    path, _ = predictions
    params = PARAMS
    reconstruct(path, tiny_model, tmp_path / "a", 0.5, 0, params, batch_size=2)
    reconstruct(path, tiny_model, tmp_path / "b", 0.5, 0, params, batch_size=2)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["11.png", "4.png", "manifest.json"]  # the manifest, written last: names, sizes, hashes
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())["files"]
    assert manifest["4.png"]["sha256"] == hashlib.sha256((tmp_path / "a" / "4.png").read_bytes()).hexdigest()
    names = names[:2]
    for n in names:
        assert png(tmp_path / "a" / n).shape == (64, 64, 3)
        np.testing.assert_array_equal(png(tmp_path / "a" / n), png(tmp_path / "b" / n))
    reconstruct(path, tiny_model, tmp_path / "c", 1.0, 0, params, batch_size=2)
    assert not np.array_equal(png(tmp_path / "a/4.png"), png(tmp_path / "c/4.png"))
    with pytest.raises(BraidError, match="denoising steps"):
        reconstruct(path, tiny_model, tmp_path / "d", 0.1, 0, params)
    assert not (tmp_path / "d").exists()


def test_batch_size_changes_an_image_by_at_most_2_of_255(tiny_model, predictions, tmp_path):
    """Reduction order differs between batch sizes: the promise is a tolerance, not bit equality."""
    path, _ = predictions
    reconstruct(path, tiny_model, tmp_path / "one", 0.5, 0, PARAMS, batch_size=1)
    reconstruct(path, tiny_model, tmp_path / "two", 0.5, 0, PARAMS, batch_size=2)
    for n in ("4.png", "11.png"):
        diff = np.abs(png(tmp_path / "one" / n) - png(tmp_path / "two" / n))
        assert diff.max() <= 2 and diff.mean() < 0.1


@pytest.mark.parametrize("prompt, negative, guidance", [("", "", 1.0), ("a red bus", "blurry", 5.0)])
def test_equals_the_diffusers_pipeline_called_by_hand(tiny_model, predictions, tmp_path, prompt, negative, guidance):
    """BRAID's PNG for image 11 is diffusers' img2img on the mean of its two predicted latents, with
    the configured prompt, negative prompt and guidance (classifier-free guidance above 1)."""
    path, pred = predictions
    params = PARAMS | {"prompt": prompt, "negative_prompt": negative}
    reconstruct(path, tiny_model, tmp_path / "r", 0.5, 0, params, batch_size=1, guidance_scale=guidance)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_model, local_files_only=True)
    z = torch.from_numpy((pred[0] + pred[2])[None] / 2)
    with torch.inference_mode():
        ref = pipe(prompt=prompt, negative_prompt=negative or None, image=z, strength=0.5, num_inference_steps=4,
                   guidance_scale=guidance, output_type="np", generator=[torch.Generator().manual_seed(0 + 11)]).images[0]
    ref = (ref * 255).round().astype(np.int16)
    assert np.abs(png(tmp_path / "r" / "11.png") - ref).max() <= 1
    # another seed k: image 11's generator is seeded with k + 11
    reconstruct(path, tiny_model, tmp_path / "seed3", 0.5, 3, params, batch_size=1, guidance_scale=guidance)
    with torch.inference_mode():
        ref3 = pipe(prompt=prompt, negative_prompt=negative or None, image=z, strength=0.5, num_inference_steps=4,
                    guidance_scale=guidance, output_type="np", generator=[torch.Generator().manual_seed(3 + 11)]).images[0]
    assert np.abs(png(tmp_path / "seed3" / "11.png") - (ref3 * 255).round().astype(np.int16)).max() <= 1
    assert np.abs(png(tmp_path / "seed3" / "11.png") - ref).max() > 1
    if guidance > 1:  # the prompt matters
        reconstruct(path, tiny_model, tmp_path / "other", 0.5, 0, params | {"prompt": "a green tree"},
                    guidance_scale=guidance)
        assert np.abs(png(tmp_path / "other" / "11.png") - ref).max() > 1


def vae_decode_by_hand(model_dir, z: np.ndarray) -> np.ndarray:
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", local_files_only=True)
    with torch.no_grad():
        x = vae.decode(torch.from_numpy(z[None]) / 0.13025).sample[0]
    return (x / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()


def test_lowest_strength_is_the_vae_decoding_of_the_predicted_latent(tiny_model, predictions, tmp_path):
    """One denoising step at t=1 barely moves the latent: the image is the decoded prediction,
    which pins the latent's content and its scale (× 0.13025) as img2img receives it."""
    path, pred = predictions
    reconstruct(path, tiny_model, tmp_path / "r", 0.02, 0, PARAMS | {"steps": 50})
    got = png(tmp_path / "r" / "4.png") / 255.0
    z = pred[1]  # image 4 has one trial, the second
    err = {name: np.abs(got - vae_decode_by_hand(tiny_model, v)).mean()
           for name, v in {"z": z, "zeros": 0 * z, "unscaled": z / 0.13025, "doubled": 2 * z, "other": pred[0]}.items()}
    assert err["z"] < 0.02, err
    assert all(err["z"] < err[k] / 3 for k in err if k != "z"), err


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_decode_only_is_the_vae_decoding_of_each_images_mean_prediction(tiny_model, predictions, tmp_path, dtype):
    """No diffusion: image 11 is the VAE's decoding of the mean of its two predicted latents (float16
    runs the tiny VAE, whose config sets force_upcast as the SDXL VAE's does, in float32)."""
    path, pred = predictions
    decode(path, tiny_model, tmp_path / "d", {"dtype": dtype, "variant": None}, batch_size=1)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["11.png", "4.png", "manifest.json"]
    for name, z in (("11.png", (pred[0] + pred[2]) / 2), ("4.png", pred[1])):
        ref = (vae_decode_by_hand(tiny_model, z) * 255).round()
        assert np.abs(png(tmp_path / "d" / name) - ref).max() <= 1, name
    bad = tmp_path / "nan.zarr"
    write_predictions(bad, np.full((1, 4, 8, 8), np.nan, np.float32), np.array([5]))
    with pytest.raises(BraidError, match="NaN"):
        decode(bad, tiny_model, tmp_path / "nan", {"dtype": "float32"})
    assert not (tmp_path / "nan").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_every_dtype_runs_end_to_end(tiny_model, predictions, tmp_path, dtype):
    """Each reconstruct.dtype the schema allows writes images close to the float32 ones."""
    path, _ = predictions
    reconstruct(path, tiny_model, tmp_path / "ref", 0.5, 0, PARAMS)
    reconstruct(path, tiny_model, tmp_path / dtype, 0.5, 0, PARAMS | {"dtype": dtype})
    for n in ("4.png", "11.png"):
        diff = np.abs(png(tmp_path / dtype / n) - png(tmp_path / "ref" / n))
        assert diff.mean() < 2 and diff.max() <= 16, (dtype, diff.mean(), diff.max())
        assert dtype == "float32" or diff.max() > 0  # the model really ran in the lower precision


def overflowing_copy(model_dir, dest, force_upcast: bool):
    """The tiny model with a VAE decoder whose activations exceed float16's range (like the SDXL VAE's)."""
    shutil.copytree(model_dir, dest)
    vae = AutoencoderKL.from_pretrained(dest, subfolder="vae", local_files_only=True)
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)
    vae.register_to_config(force_upcast=force_upcast)
    vae.save_pretrained(dest / "vae")
    assert json.loads((dest / "vae" / "config.json").read_text())["force_upcast"] is force_upcast
    return dest


def test_float16_decodes_in_float32_when_the_vae_overflows(tiny_model, tmp_path):
    z = torch.from_numpy(np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32))
    upcast = load_img2img(overflowing_copy(tiny_model, tmp_path / "upcast", True), dtype="float16")
    assert upcast.unet.dtype == torch.float16 and upcast.vae.dtype == torch.float32
    image = decode_latents(upcast.vae, z.half())
    assert image.dtype == torch.float32 and torch.isfinite(image).all() and image.shape == (1, 3, 64, 64)
    # a VAE that claims to be safe in float16 is kept in float16; here it is not, and that is reported
    fp16 = load_img2img(overflowing_copy(tiny_model, tmp_path / "fp16", False), dtype="float16")
    assert fp16.vae.dtype == torch.float16
    with pytest.raises(BraidError, match="non-finite pixels in torch.float16.*bfloat16 or float32"):
        decode_latents(fp16.vae, z.half())
    # bfloat16 keeps the VAE in bfloat16, whatever force_upcast says
    assert load_img2img(tiny_model, dtype="bfloat16").vae.dtype == torch.bfloat16


def test_img2img_loads_each_module_in_its_dtype_without_casting_afterwards(tiny_model):
    """diffusers warns "set `torch_dtype` in `from_pretrained()`" when a loaded model is cast with
    .to(dtype); every module is loaded in the dtype it runs in instead."""
    from diffusers.utils import logging as dlogging

    records = []
    handler = __import__("logging").Handler()
    handler.emit = records.append
    dlogging.get_logger("diffusers").addHandler(handler)
    try:
        pipe = load_img2img(tiny_model, dtype="float16")
    finally:
        dlogging.get_logger("diffusers").removeHandler(handler)
    assert not [r for r in records if "torch_dtype" in r.getMessage()], [r.getMessage() for r in records]
    assert pipe.unet.dtype == torch.float16 and pipe.text_encoder.dtype == torch.float16
    assert pipe.vae.dtype == torch.float32  # the tiny VAE, like SDXL's, has force_upcast


def test_a_nan_from_the_unet_is_named_as_the_unets_before_the_vae(tiny_model, predictions, tmp_path):
    """A UNet that outputs NaN (as an fp16 overflow in attention does): the error names the UNet, its
    dtype and the step settings, and says the VAE was not reached; no image folder is left."""
    from diffusers import UNet2DConditionModel

    broken = tmp_path / "nan-unet"
    shutil.copytree(tiny_model, broken)
    unet = UNet2DConditionModel.from_pretrained(broken, subfolder="unet", local_files_only=True)
    with torch.no_grad():
        unet.conv_out.bias.fill_(float("nan"))
    unet.save_pretrained(broken / "unet")
    path, _ = predictions
    with pytest.raises(BraidError) as err:
        reconstruct(path, broken, tmp_path / "out", 0.5, 0, PARAMS | {"steps": 6})
    text = str(err.value)
    assert "the UNet (torch.float32) produced NaN/inf latents" in text and "NSD ids [4, 11]" in text
    assert "strength 0.5, 6 steps (3 run), guidance_scale 1.0" in text and "VAE was not reached" in text
    assert not (tmp_path / "out").exists()


def write_conditioning_store(path, ids, tokens, pooled):
    from braid.integrity import new_array, new_group

    root = new_group(path)
    new_array(root, "nsd_id", data=np.asarray(ids, np.int64))
    new_array(root, "tokens", data=tokens.astype(np.float16))
    new_array(root, "pooled", data=pooled.astype(np.float32))
    root.attrs.update({"conditioning": "predicted-test", "n_parameters_semantic": 7})


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_each_image_gets_its_own_conditioning_with_guidance(tiny_model, predictions, tmp_path, guidance):
    """A conditioning store's embeddings reach the UNet: each image's PNG is diffusers' img2img called by
    hand with that image's prompt_embeds and pooled embedding (and, above guidance 1, the empty negative
    prompt's zero embeddings); dropping them (the fixed prompt), swapping images' embeddings or turning
    guidance off gives other images."""
    path, pred = predictions
    rng = np.random.default_rng(3)
    tokens = rng.standard_normal((2, 77, 64)).astype(np.float16).astype(np.float32) * 2
    pooled = rng.standard_normal((2, 32)).astype(np.float32) * 2
    write_conditioning_store(tmp_path / "c.zarr", [4, 11], tokens, pooled)
    reconstruct(path, tiny_model, tmp_path / "r", 0.5, 0, PARAMS, batch_size=2, guidance_scale=guidance,
                conditioning_path=tmp_path / "c.zarr")
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_model, local_files_only=True)

    def by_hand(image, k, g=guidance):
        z = torch.from_numpy(pred[1][None]) if image == 4 else torch.from_numpy((pred[0] + pred[2])[None] / 2)
        kwargs = {}
        if g > 1:
            kwargs = {"negative_prompt_embeds": torch.zeros(1, 77, 64), "negative_pooled_prompt_embeds": torch.zeros(1, 32)}
        with torch.inference_mode():
            out = pipe(prompt_embeds=torch.from_numpy(tokens[k][None]), pooled_prompt_embeds=torch.from_numpy(pooled[k][None]),
                       image=z, strength=0.5, num_inference_steps=4, guidance_scale=g, output_type="np",
                       generator=[torch.Generator().manual_seed(image)], **kwargs).images[0]
        return (out * 255).round().astype(np.int16)

    # both images in one batch of 2, diffusers one at a time: another batch size moves a pixel by
    # at most 2 of 255 (test_batch_size_changes_an_image_by_at_most_2_of_255); a wrong conditioning by far more
    for k, image in enumerate([4, 11]):
        assert np.abs(png(tmp_path / "r" / f"{image}.png") - by_hand(image, k)).max() <= 2
    assert np.abs(png(tmp_path / "r" / "11.png") - by_hand(11, 0)).max() > 6  # image 4's embeddings: another image
    reconstruct(path, tiny_model, tmp_path / "fixed", 0.5, 0, PARAMS, batch_size=2, guidance_scale=guidance)
    assert np.abs(png(tmp_path / "fixed" / "11.png") - png(tmp_path / "r" / "11.png")).max() > 6
    if guidance > 1:
        assert np.abs(png(tmp_path / "r" / "11.png") - by_hand(11, 1, g=1.0)).max() > 6
    with pytest.raises(BraidError, match=r"no conditioning for NSD ids \[11\]"):
        write_conditioning_store(tmp_path / "only4.zarr", [4], tokens[:1], pooled[:1])
        reconstruct(path, tiny_model, tmp_path / "x", 0.5, 0, PARAMS, conditioning_path=tmp_path / "only4.zarr")
    assert not (tmp_path / "x").exists()
