"""Metric definitions, pinned against independent computations: the published 2-way loop, a numpy
bilinear resize with torchvision 0.15's tensor semantics, the SSIM formula of Wang et al. (2004) with
scipy's Gaussian filter, and numpy's Pearson r."""

from __future__ import annotations

import numpy as np
import pytest

from braid.common import BraidError
from braid.evaluate import image_metrics, latent_metrics, rowwise_pearson, two_way_identification


def test_two_way_identical_is_perfect_shuffled_is_chance():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((200, 50))
    assert two_way_identification(real, real) == 1.0
    shuffled = real[rng.permutation(200)]
    assert abs(two_way_identification(real, shuffled) - 0.5) < 0.05


def test_two_way_matches_reference_formula():
    rng = np.random.default_rng(1)
    # rows with their own offsets and scales: a correlation must centre and normalise each row
    real = rng.standard_normal((30, 20)) * rng.uniform(0.5, 3, (30, 1)) + rng.normal(0, 5, (30, 1))
    pred = real + 2 * rng.standard_normal((30, 20)) + rng.normal(0, 5, (30, 1))
    n = len(real)
    r = np.corrcoef(real, pred)[:n, n:]
    ref = np.mean([(r[:, j] < r[j, j]).sum() / (n - 1) for j in range(n)])  # MindEye's loop
    assert two_way_identification(real, pred) == pytest.approx(ref)


def test_two_way_with_uneven_repeats_matches_a_reference_loop():
    """Each prediction is compared with the targets of other images only; images have 1 to 3 rows."""
    rng = np.random.default_rng(9)
    groups = np.array([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 5, 6])
    real = rng.standard_normal((7, 15))[groups] + 0.5 * rng.standard_normal((12, 15))
    pred = real + 1.5 * rng.standard_normal((12, 15))
    r = np.corrcoef(real, pred)[:12, 12:]
    ref = np.mean([np.mean([r[i, j] < r[j, j] for i in range(12) if groups[i] != groups[j]]) for j in range(12)])
    assert two_way_identification(real, pred, groups) == pytest.approx(ref)


def test_two_way_with_two_samples():
    real = np.array([[0.0, 1, 2, 3], [3, 1, 0, 2]])
    assert two_way_identification(real, real) == 1.0
    assert two_way_identification(real, real[::-1]) == 0.0
    with pytest.raises(BraidError, match="at least two"):
        two_way_identification(real[:1], real[:1])


def test_two_way_skips_repeats_of_the_same_image():
    rng = np.random.default_rng(2)
    real = np.repeat(rng.standard_normal((10, 20)), 3, axis=0)  # three trials per image
    groups = np.repeat(np.arange(10), 3)
    assert two_way_identification(real, real, groups) == 1.0
    assert two_way_identification(real, real) < 1.0  # ties with repeats count as losses without groups
    with pytest.raises(BraidError):
        two_way_identification(real[:3], real[:3], groups[:3])


def test_rowwise_pearson():
    a = np.array([[1.0, 2, 3], [1, 2, 3], [1, 1, 1]])
    b = np.array([[2.0, 4, 6], [3, 2, 1], [1, 2, 3]])
    np.testing.assert_allclose(rowwise_pearson(a, b), [1, -1, 0])


def test_image_metrics_identity_and_degradation():
    rng = np.random.default_rng(3)
    stim = (rng.random((3, 425, 425, 3)) * 255).astype(np.uint8)
    same = np.moveaxis(stim, -1, 1).astype(np.float32) / 255
    perfect = image_metrics(same, stim)
    np.testing.assert_allclose(perfect["pixcorr"], 1, atol=1e-6)
    np.testing.assert_allclose(perfect["ssim"], 1, atol=1e-6)
    noisy = np.clip(same + 0.3 * rng.standard_normal(same.shape), 0, 1).astype(np.float32)
    worse = image_metrics(noisy, stim)
    assert (worse["pixcorr"] < 0.95).all() and (worse["ssim"] < perfect["ssim"]).all()


def test_exact_ties_are_not_wins():
    rng = np.random.default_rng(4)
    real = rng.standard_normal((10, 30))
    real[7] = real[3]  # two different images with the same target
    # columns 3 and 7 tie with each other, every other comparison is a win
    assert two_way_identification(real, real) == pytest.approx((8 * 9 + 2 * 8) / (10 * 9))
    # the same target, scaled and shifted: the same correlations in exact arithmetic, not in floating
    # point; rounding must not turn these ties into wins
    real[7] = real[3] * 1.37 + 0.29
    assert two_way_identification(real, real) == pytest.approx((8 * 9 + 2 * 8) / (10 * 9))
    # a constant prediction correlates equally (0) with every target: all ties, no wins
    assert two_way_identification(real, np.ones_like(real)) == 0.0


def test_standardiser_is_the_population_mean_and_std_with_constant_columns_left_unscaled():
    from braid.evaluate import standardiser

    x = np.array([[1.0, 5, 2], [3, 5, 4], [8, 5, 9]])
    mean, std = standardiser(x)
    np.testing.assert_allclose(mean, [4, 5, 5])
    np.testing.assert_allclose(std, [np.std([1, 3, 8]), 1.0, np.std([2, 4, 9])], rtol=1e-6)
    assert mean.dtype == std.dtype == np.float32


def test_latent_r_standardises_with_the_training_statistics():
    """Predicting the training mean scores r 0; r is computed on (x - mean) / std, per element."""
    rng = np.random.default_rng(5)
    mean, std = rng.normal(3, 1, 12), rng.uniform(0.5, 2, 12)
    true = mean + std * rng.standard_normal((20, 12))
    pred = true + std * rng.standard_normal((20, 12))
    got = latent_metrics(pred, true, mean, std, np.arange(20))
    ts, ps = (true - mean) / std, (pred - mean) / std
    assert got["latent_r"] == pytest.approx(np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(ps, ts)]))
    assert got["latent_mse"] == pytest.approx(np.mean((pred - true) ** 2))
    assert latent_metrics(np.tile(mean, (20, 1)), true, mean, std, np.arange(20))["latent_r"] == 0.0


# --- image metrics against independent computations ---------------------------------------------


def bilinear_no_antialias(img: np.ndarray, size: int) -> np.ndarray:
    """(C, H, W) -> (C, size, size): bilinear with half-pixel centres and edge clamping, no antialias
    (torch.nn.functional.interpolate(align_corners=False), which torchvision 0.15's tensor Resize calls)."""

    def axis(n_in):
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    y0, y1, wy = axis(img.shape[1])
    x0, x1, wx = axis(img.shape[2])
    rows = img[:, y0] * (1 - wy)[None, :, None] + img[:, y1] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx


def ssim_formula(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004): Gaussian window σ 1.5 truncated at 3.5σ (11 px), population
    variances, K1 0.01, K2 0.03, data range 1, mean over the map without a 5-px border."""
    from scipy.ndimage import gaussian_filter

    f = lambda x: gaussian_filter(x, 1.5, truncate=3.5)  # noqa: E731
    ua, ub = f(a), f(b)
    va, vb, cov = f(a * a) - ua**2, f(b * b) - ub**2, f(a * b) - ua * ub
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * ua * ub + c1) * (2 * cov + c2) / ((ua**2 + ub**2 + c1) * (va + vb + c2))
    return float(s[5:-5, 5:-5].mean())


def gray(img_chw: np.ndarray) -> np.ndarray:
    return 0.2125 * img_chw[0] + 0.7154 * img_chw[1] + 0.0721 * img_chw[2]  # ITU-R 709 luma


def photo_pairs(rng):
    """Stimuli (uint8, 425²) and reconstructions (float, 64² as the demo's, 512² as SSD-1B's)."""
    import skimage.data
    from PIL import Image

    photo = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((425, 425)))
    noise = (rng.random((425, 425, 3)) * 255).astype(np.uint8)
    stim = np.stack([photo, noise])
    rec64 = rng.random((2, 3, 64, 64)).astype(np.float32)
    blurred = np.asarray(Image.fromarray(photo).resize((512, 512)).resize((64, 64)).resize((512, 512)))
    rec512 = np.stack([np.moveaxis(blurred, -1, 0), rng.integers(0, 256, (3, 512, 512))]).astype(np.float32) / 255
    return stim, rec64, rec512


@pytest.mark.parametrize("size", [64, 512])
def test_image_metrics_equal_the_reference_formulas(size):
    stim, rec64, rec512 = photo_pairs(np.random.default_rng(6))
    rec = rec64 if size == 64 else rec512
    got = image_metrics(rec, stim)
    for k in range(len(stim)):
        r = bilinear_no_antialias(bilinear_no_antialias(rec[k].astype(np.float64), 256), 425)
        g = bilinear_no_antialias(bilinear_no_antialias(np.moveaxis(stim[k], -1, 0) / 255.0, 256), 425)
        assert got["pixcorr"][k] == pytest.approx(np.corrcoef(r.ravel(), g.ravel())[0, 1], abs=1e-5)
        assert got["ssim"][k] == pytest.approx(ssim_formula(gray(r), gray(g)), abs=1e-4)


def test_image_metrics_see_every_channel():
    """A reconstruction that is right in red only is not a perfect PixCorr."""
    stim, _, _ = photo_pairs(np.random.default_rng(7))
    rec = np.moveaxis(stim, -1, 1).astype(np.float32) / 255
    rec[:, 1:] = rec[:, 1:, ::-1]  # green and blue flipped upside down
    assert (image_metrics(rec, stim)["pixcorr"] < 0.9).all()


def test_image_metrics_need_one_reconstruction_per_stimulus():
    with pytest.raises(BraidError, match="2 reconstructions for 3 stimuli"):
        image_metrics(np.zeros((2, 3, 8, 8), np.float32), np.zeros((3, 425, 425, 3), np.uint8))


# --- one run's metrics file, and the summary ----------------------------------------------------


def write_run(tmp_path, pred, true_ids, n_parameters=123):
    import zarr

    root = zarr.open_group(tmp_path / "predictions.zarr", mode="w")
    root.create_array("pred", data=pred.astype(np.float32))
    root.create_array("nsd_id", data=np.asarray(true_ids, np.int64))
    root.create_array("global_trial", data=np.arange(len(true_ids)))
    root.create_array("z_mean", data=np.zeros(pred.shape[1:], np.float32))
    root.create_array("z_std", data=np.ones(pred.shape[1:], np.float32))
    root.attrs["n_parameters"] = n_parameters
    return tmp_path / "predictions.zarr"


def test_evaluate_run_scores_the_right_files(mirror, tiny_model, tmp_path):
    """A perfect encoder (predictions = the cached latents) and reconstructions = the stimuli score 1;
    a wrong pairing of reconstructions and images does not."""
    import pandas as pd
    from PIL import Image

    from braid import nsd
    from braid.evaluate import evaluate_run
    from braid.latents import LatentCache, cache_latents, read_stimuli

    root, _ = mirror
    ids = np.array([3, 8, 3, 12, 8, 5])  # trials; images 3, 5, 8, 12
    cache_latents(root / nsd.STIMULI, tiny_model, ids, tmp_path / "latents.zarr", image_size=64)
    true = LatentCache(tmp_path / "latents.zarr").get(ids)
    preds = write_run(tmp_path, true, ids)
    images = tmp_path / "images"
    images.mkdir()
    stimuli = read_stimuli(root / nsd.STIMULI, np.unique(ids))
    for i, img in zip(np.unique(ids), stimuli):
        Image.fromarray(img).save(images / f"{i}.png")
    table = evaluate_run(preds, tmp_path / "latents.zarr", root / nsd.STIMULI, images, tmp_path / "m.csv",
                         tmp_path / "grid.png", "subj01", "lin", 0.5)
    row = pd.read_csv(tmp_path / "m.csv").iloc[0]
    assert row.to_dict() == pytest.approx(table.iloc[0].to_dict())
    assert (row["subject"], row["encoder"], row["strength"], row["n_parameters"]) == ("subj01", "lin", 0.5, 123)
    assert (row["n_test_trials"], row["n_test_images"]) == (6, 4)
    assert row["weights"] == "random (not a result)"  # the tiny model's latents: stamped
    assert row["latent_mse"] == 0 and row["latent_r"] == pytest.approx(1) and row["latent_two_way"] == 1
    assert row["pixcorr"] == pytest.approx(1, abs=1e-6) and row["ssim"] == pytest.approx(1, abs=1e-6)
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    # reconstructions of the wrong images
    for a, b in ((3, 5), (8, 12)):
        pa, pb = images / f"{a}.png", images / f"{b}.png"
        pa.rename(tmp_path / "swap.png")
        pb.rename(pa)
        (tmp_path / "swap.png").rename(pb)
    evaluate_run(preds, tmp_path / "latents.zarr", root / nsd.STIMULI, images, tmp_path / "m2.csv",
                 tmp_path / "grid2.png", "subj01", "lin", 0.5)
    assert pd.read_csv(tmp_path / "m2.csv").iloc[0]["ssim"] < 0.9
    (images / "12.png").unlink()
    with pytest.raises(BraidError, match="12.png: reconstruction missing"):
        evaluate_run(preds, tmp_path / "latents.zarr", root / nsd.STIMULI, images, tmp_path / "m3.csv",
                     tmp_path / "grid3.png", "subj01", "lin", 0.5)


def test_load_images_are_the_pngs_in_0_1():
    from PIL import Image

    from braid.evaluate import load_images

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        img = np.random.default_rng(8).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(img).save(Path(d) / "7.png")
        got = load_images(d, [7])
    assert got.shape == (1, 3, 16, 16) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0], np.moveaxis(img, -1, 0) / np.float32(255))


def test_summary_joins_runs_and_the_oracle_by_subject(tmp_path):
    import pandas as pd

    from braid.evaluate import summarise

    runs = []
    for k, (subject, encoder, strength, r) in enumerate([("subj02", "mlp", 0.7, 0.4), ("subj01", "mlp", 0.7, 0.5),
                                                         ("subj01", "linear", 0.3, 0.6), ("subj01", "mlp", 0.3, 0.55)]):
        path = tmp_path / f"run{k}.csv"
        pd.DataFrame([{"subject": subject, "encoder": encoder, "strength": strength, "latent_r": r, "latent_mse": 1 - r,
                       "latent_two_way": 0.9, "pixcorr": 0.1, "ssim": 0.2}]).to_csv(path, index=False)
        runs.append(str(path))
    oracle = []
    for subject, r in (("subj01", 0.8), ("subj02", 0.7)):
        path = tmp_path / f"oracle-{subject}.csv"
        pd.DataFrame([{"subject": subject, "latent_r": r, "latent_mse": 1 - r, "latent_two_way": 1.0,
                       "n_test_trials": 9}]).to_csv(path, index=False)
        oracle.append(str(path))
    table = summarise(runs, tmp_path / "s.csv", tmp_path / "s.png", oracle)
    saved = pd.read_csv(tmp_path / "s.csv")
    pd.testing.assert_frame_equal(saved, table)
    assert list(zip(saved["subject"], saved["encoder"], saved["strength"])) == [
        ("subj01", "linear", 0.3), ("subj01", "mlp", 0.3), ("subj01", "mlp", 0.7), ("subj02", "mlp", 0.7)]
    assert saved["latent_r"].tolist() == [0.6, 0.55, 0.5, 0.4]
    assert saved["oracle_latent_r"].tolist() == [0.8, 0.8, 0.8, 0.7]
    assert saved["oracle_latent_mse"].tolist() == pytest.approx([0.2, 0.2, 0.2, 0.3])
    assert "n_test_trials" not in saved or saved["n_test_trials"].isna().all()
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert list(saved.columns) == ["subject", "encoder", "strength", "latent_r", "latent_mse", "latent_two_way",
                                   "pixcorr", "ssim", "oracle_latent_r", "oracle_latent_two_way", "oracle_latent_mse"]
    partial = summarise(runs, tmp_path / "p.csv", tmp_path / "p.png", oracle[:1])  # no oracle for subj02
    assert len(partial) == 4 and partial["oracle_latent_r"].isna().tolist() == [False, False, False, True]
    no_oracle = summarise(runs, tmp_path / "t.csv", tmp_path / "t.png")
    assert not any(c.startswith("oracle_") for c in no_oracle.columns)
