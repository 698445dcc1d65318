"""img2img from latents: the empty-output guard, averaging repeats, deterministic images."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from PIL import Image

from braid.common import BraidError
from braid.reconstruct import average_by_image, check_strength, reconstruct


def test_strength_guard_names_the_fix():
    check_strength(0.5, 2)
    with pytest.raises(BraidError, match=r"int\(2\*0.4\) = 0.*at least 3"):
        check_strength(0.4, 2)
    with pytest.raises(BraidError, match="outside"):
        check_strength(1.5, 10)


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


def test_reconstruct_writes_one_deterministic_png_per_image(tiny_model, tmp_path):
    rng = np.random.default_rng(0)
    pred = (0.1 * rng.standard_normal((3, 4, 8, 8))).astype(np.float32)
    write_predictions(tmp_path / "p.zarr", pred, np.array([11, 4, 11]))
    params = {"steps": 4, "guidance_scale": 1.0, "prompt": "", "negative_prompt": "", "dtype": "float32",
              "batch_size": 1, "seed": 0}
    reconstruct(tmp_path / "p.zarr", tiny_model, tmp_path / "a", 0.5, params)
    params["batch_size"] = 2  # batching must not change an image
    reconstruct(tmp_path / "p.zarr", tiny_model, tmp_path / "b", 0.5, params)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["11.png", "4.png"]
    for n in names:
        a = np.asarray(Image.open(tmp_path / "a" / n))
        assert a.shape == (64, 64, 3)
        np.testing.assert_array_equal(a, np.asarray(Image.open(tmp_path / "b" / n)))
    reconstruct(tmp_path / "p.zarr", tiny_model, tmp_path / "c", 1.0, params)
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "a/4.png")), np.asarray(Image.open(tmp_path / "c/4.png")))
    with pytest.raises(BraidError, match="denoising steps"):
        reconstruct(tmp_path / "p.zarr", tiny_model, tmp_path / "d", 0.1, params)
    assert not (tmp_path / "d").exists()
