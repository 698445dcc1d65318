"""Metric definitions, pinned against independent computations: the published 2-way loop, a numpy
bilinear resize with torchvision 0.15's tensor semantics, the SSIM formula of Wang et al. (2004) with
scipy's Gaussian filter, and numpy's Pearson r."""

from __future__ import annotations

import numpy as np
import pytest

from braid.common import BraidError
from braid.evaluate import image_metrics, latent_metrics, rowwise_pearson, two_way_identification, two_way_scores
from braid.integrity import write_folder_manifest


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


# --- per-image 2-way, retrieval, one run's table, the summary --------------------------------------


def test_two_way_scores_are_the_reference_loop_per_prediction():
    rng = np.random.default_rng(10)
    real = rng.standard_normal((12, 30))
    pred = real + 1.2 * rng.standard_normal((12, 30))
    r = np.corrcoef(real, pred)[:12, 12:]
    ref = [(r[:, j] < r[j, j]).sum() / 11 for j in range(12)]  # MindEye's count, per reconstruction j
    np.testing.assert_allclose(two_way_scores(real, pred), ref)
    assert 0 < min(ref) and max(ref) <= 1


def reference_top1(pred, true):
    """Top-1 by cosine similarity (scikit-learn), image (rows pick a true row) and brain (true rows pick a prediction)."""
    from sklearn.metrics.pairwise import cosine_similarity

    sim = cosine_similarity(pred.reshape(len(pred), -1), true.reshape(len(true), -1))
    n = len(sim)
    return (sim.argmax(1) == np.arange(n)).astype(float), (sim.argmax(0) == np.arange(n)).astype(float)


def test_retrieval_matches_cosine_top1_and_chance():
    from braid.evaluate import retrieval

    rng = np.random.default_rng(11)
    true = rng.standard_normal((40, 3, 4, 4))
    same = retrieval(true, true, pool=300)
    assert same["image"] == same["brain"] == 1.0 and same["pool"] == 40 and (same["per_image"] == 1).all()
    pred = true + 2.5 * rng.standard_normal(true.shape)
    got = retrieval(pred, true, pool=300)
    image, brain = reference_top1(pred, true)
    np.testing.assert_array_equal(got["per_image"], image)
    np.testing.assert_array_equal(got["per_brain"], brain)
    assert got["image"] == pytest.approx(image.mean()) and got["brain"] == pytest.approx(brain.mean())
    assert 0.1 < got["image"] < 1  # noisy but informative
    # unrelated predictions: chance is 1/pool, estimated over many random pools of 10
    noise = rng.standard_normal((200, 48))
    chance = retrieval(noise, rng.standard_normal((200, 48)), pool=10, draws=400)
    assert chance["pool"] == 10 and chance["image"] == pytest.approx(0.1, abs=0.03)
    assert np.isfinite(chance["per_image"]).all()  # 400 pools of 10 hold every one of 200 images


def test_retrieval_counts_ties_as_misses():
    from braid.evaluate import retrieval

    true = np.random.default_rng(12).standard_normal((5, 8))
    pred = true.copy()
    pred[3] = true[1]  # image 3's prediction is image 1's: image 3 missed; image 1's true row ties between 1 and 3
    got = retrieval(pred, true, pool=300)
    assert got["per_image"].tolist() == [1, 1, 1, 0, 1]
    assert got["per_brain"].tolist() == [1, 0, 1, 0, 1]


def test_aggregate_averages_seeds_per_image_then_images():
    import pandas as pd

    from braid.evaluate import aggregate

    rng = np.random.default_rng(13)
    rows = []
    values = rng.random((2, 4))  # seed x image
    for s in (0, 1):
        for k, i in enumerate([5, 9, 2, 7]):
            for conditioning, shift in (("none", 0.0), ("predicted-sem", 0.25)):
                rows.append({"subject": "subj01", "encoder": "ridge", "kind": "ridge", "mode": "img2img",
                             "conditioning": conditioning, "semantic_encoder": conditioning[10:], "guidance": 3.0,
                             "strength": 0.5, "seed": s, "nsd_id": i, "n_parameters": 10 + 5 * (shift > 0),
                             "pixcorr": values[s, k] + shift, "ssim": 0.5, "latent_r": 0.3, "weights": "pretrained",
                             "metric_weights": "none"})
    for k, i in enumerate([5, 9, 2, 7]):  # decode-only: one "seed"
        rows.append({"subject": "subj01", "encoder": "ridge", "kind": "ridge", "mode": "decode", "conditioning": "",
                     "semantic_encoder": "", "guidance": np.nan, "strength": np.nan, "seed": -1, "nsd_id": i,
                     "n_parameters": 10, "pixcorr": 0.1 * k, "ssim": 0.4, "latent_r": 0.3, "weights": "pretrained",
                     "metric_weights": "none"})
    out = aggregate(pd.DataFrame(rows))
    assert out["mode"].tolist() == ["decode", "img2img", "img2img"]
    assert out["conditioning"].tolist() == ["", "none", "predicted-sem"]  # each conditioning its own row
    dec, img, sem = out.iloc[0], out.iloc[1], out.iloc[2]
    assert sem["pixcorr"] == pytest.approx(values.mean() + 0.25) and sem["n_parameters"] == 15
    per_image = values.mean(0)
    assert img["pixcorr"] == pytest.approx(values.mean())
    assert img["pixcorr_sem"] == pytest.approx(np.std(per_image, ddof=1) / 2)
    assert img["pixcorr_seed_sd"] == pytest.approx(np.std(values.mean(1), ddof=1))
    assert (img["n_seeds"], img["n_test_images"], img["latent_r"], img["n_parameters"]) == (2, 4, 0.3, 10)
    assert dec["pixcorr"] == pytest.approx(0.15) and np.isnan(dec["pixcorr_seed_sd"]) and dec["n_seeds"] == 1


def write_run(tmp_path, pred, true_ids, n_parameters=123, z_mean=None, z_std=None):
    import zarr

    root = zarr.open_group(tmp_path / "predictions.zarr", mode="w")
    root.create_array("pred", data=pred.astype(np.float32))
    root.create_array("nsd_id", data=np.asarray(true_ids, np.int64))
    root.create_array("global_trial", data=np.arange(len(true_ids)))
    root.create_array("z_mean", data=np.zeros(pred.shape[1:], np.float32) if z_mean is None else z_mean.astype(np.float32))
    root.create_array("z_std", data=np.ones(pred.shape[1:], np.float32) if z_std is None else z_std.astype(np.float32))
    root.attrs["n_parameters"] = n_parameters
    root.attrs["spec"] = {"kind": "ridge"}
    return tmp_path / "predictions.zarr"


@pytest.fixture(scope="module")
def alexnet_random(tmp_path_factory):
    from braid.metric_networks import build_random

    folder = tmp_path_factory.mktemp("weights") / "alexnet"
    build_random("alexnet", folder, seed=0)
    return folder


def test_evaluate_images_scores_the_right_files(mirror, tiny_model, alexnet_random, tmp_path):
    """A perfect encoder (predictions = the cached latents) and reconstructions = the stimuli score
    PixCorr/SSIM 1, AlexNet 2-way 1 and retrieval 1; a wrong pairing of reconstructions and images does not."""
    import pandas as pd
    from PIL import Image

    from braid import nsd
    from braid.evaluate import evaluate_images, stimulus_features
    from braid.latents import LatentCache, cache_latents, read_stimuli

    root, _ = mirror
    ids = np.array([3, 8, 3, 12, 8, 5])  # test trials; images 3, 5, 8, 12
    cache_latents(root / nsd.STIMULI, tiny_model, ids, tmp_path / "latents.zarr", image_size=64)
    true = LatentCache(tmp_path / "latents.zarr").get(ids)
    preds = write_run(tmp_path, true, ids)
    trials = tmp_path / "trials.parquet"
    pd.DataFrame({"nsd_id": ids, "split": "test"}).to_parquet(trials)
    weights = {"alexnet": alexnet_random}
    stimulus_features(root / nsd.STIMULI, trials, weights, tmp_path / "features.zarr")
    images = tmp_path / "images"
    images.mkdir()
    stimuli = read_stimuli(root / nsd.STIMULI, np.unique(ids))
    for i, img in zip(np.unique(ids), stimuli):
        Image.fromarray(img).save(images / f"{i}.png")
    write_folder_manifest(images)
    args = (preds, tmp_path / "latents.zarr", root / nsd.STIMULI, tmp_path / "features.zarr", weights)
    table = evaluate_images(images, *args, tmp_path / "m.parquet", "subj01", "lin", "none/guidance-3/strength-0.5/seed-1")
    saved = pd.read_parquet(tmp_path / "m.parquet")
    pd.testing.assert_frame_equal(saved, table)
    assert saved["nsd_id"].tolist() == [3, 5, 8, 12]
    first = saved.iloc[0]
    assert (first["subject"], first["encoder"], first["kind"], first["mode"], first["conditioning"], first["guidance"],
            first["strength"], first["seed"]) == ("subj01", "lin", "ridge", "img2img", "none", 3.0, 0.5, 1)
    assert (first["n_parameters"], first["n_test_trials"]) == (123, 6)
    assert first["weights"] == "random (not a result)" and first["metric_weights"] == "random (not comparable)"
    assert first["latent_mse"] == 0 and first["latent_r"] == pytest.approx(1) and first["latent_two_way"] == 1
    np.testing.assert_allclose(saved[["pixcorr", "ssim"]], 1, atol=1e-6)
    assert (saved[["alexnet2", "alexnet5", "retrieval_image", "retrieval_brain"]] == 1).all().all()
    # reconstructions of the wrong images
    for a, b in ((3, 5), (8, 12)):
        pa, pb = images / f"{a}.png", images / f"{b}.png"
        pa.rename(tmp_path / "swap.png")
        pb.rename(pa)
        (tmp_path / "swap.png").rename(pb)
    write_folder_manifest(images)  # as a writer that paired them wrongly would
    wrong = evaluate_images(images, *args, tmp_path / "m2.parquet", "subj01", "lin", "decode")
    assert (wrong["ssim"] < 0.9).all() and (wrong["alexnet2"] < 1).all() and wrong["mode"].iloc[0] == "decode"
    # a semantic conditioning's encoder adds its parameters to the latent encoder's (brain-side total)
    from braid.integrity import new_group

    new_group(tmp_path / "cond.zarr").attrs.update({"n_parameters_semantic": 40})
    conditioned = evaluate_images(images, *args, tmp_path / "m5.parquet", "subj01", "lin",
                                  "predicted-sem/guidance-3/strength-0.5/seed-1", conditioning_path=tmp_path / "cond.zarr")
    first = conditioned.iloc[0]
    assert (first["n_parameters"], first["n_parameters_latent"], first["n_parameters_semantic"]) == (163, 123, 40)
    assert (first["conditioning"], first["semantic_encoder"]) == ("predicted-sem", "sem")
    # the synthetic data's category readout: against the training stimuli, stored once per subject
    from sklearn.neighbors import KNeighborsClassifier

    from braid.evaluate import category_descriptor, read_category_pool
    from braid.metric_networks import to_256

    assert read_category_pool(tmp_path / "features.zarr") is None  # no training images: no readout
    train_ids = np.array([0, 1, 2, 4, 6, 7, 9, 10, 11, 13, 14])
    pd.DataFrame({"nsd_id": np.r_[ids, train_ids], "split": ["test"] * len(ids) + ["train"] * len(train_ids)}
                 ).to_parquet(trials)
    stimulus_features(root / nsd.STIMULI, trials, weights, tmp_path / "features2.zarr", stim_info_path=root / nsd.STIM_INFO)
    pool = read_category_pool(tmp_path / "features2.zarr")
    scored = evaluate_images(images, preds, tmp_path / "latents.zarr", root / nsd.STIMULI, tmp_path / "features2.zarr",
                             weights, tmp_path / "m4.parquet", "subj01", "lin", "decode", categories=pool)
    info = nsd.load_stim_info(root / nsd.STIM_INFO)
    describe = lambda i: category_descriptor(to_256(np.moveaxis(read_stimuli(root / nsd.STIMULI, i), -1, 1) / 255.0))  # noqa: E731
    knn = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(describe(train_ids), info["category"].loc[train_ids])
    recon = np.stack([np.moveaxis(np.asarray(Image.open(images / f"{i}.png")), -1, 0) / 255.0 for i in [3, 5, 8, 12]])
    expected = knn.predict(category_descriptor(to_256(recon))) == info["category"].loc[[3, 5, 8, 12]].to_numpy()
    np.testing.assert_array_equal(scored["category"].to_numpy(), expected.astype(float))
    (images / "12.png").unlink()
    with pytest.raises(BraidError, match="12.png is missing.*rebuild it with `snakemake --forcerun .*images`"):
        evaluate_images(images, *args, tmp_path / "m3.parquet", "subj01", "lin", "decode")
    assert not (tmp_path / "m3.parquet").exists()
    write_folder_manifest(images)  # a complete folder without image 12
    with pytest.raises(BraidError, match="12.png: reconstruction missing"):
        evaluate_images(images, *args, tmp_path / "m3.parquet", "subj01", "lin", "decode")
    # features of another test split are refused, naming the rule that makes them
    Image.fromarray(stimuli[-1]).save(images / "12.png")
    write_folder_manifest(images)
    pd.DataFrame({"nsd_id": [3, 5], "split": "test"}).to_parquet(trials)
    stimulus_features(root / nsd.STIMULI, trials, weights, tmp_path / "features.zarr")
    with pytest.raises(BraidError, match="evaluate_stimuli"):
        evaluate_images(images, *args, tmp_path / "m4.parquet", "subj01", "lin", "decode")


def test_load_images_are_the_pngs_in_0_1():
    from PIL import Image

    from braid.evaluate import load_images

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        img = np.random.default_rng(8).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(img).save(Path(d) / "7.png")
        write_folder_manifest(d)
        got = load_images(d, [7])
    assert got.shape == (1, 3, 16, 16) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0], np.moveaxis(img, -1, 0) / np.float32(255))


def per_image_file(tmp_path, name, subject, encoder, mode, strength, seed, pixcorr, ssim=0.3, alexnet2=0.8,
                   conditioning="none", semantic_parameters=0):
    import pandas as pd

    path = tmp_path / f"{name}.parquet"
    n = len(pixcorr)
    conditioning = "" if mode == "decode" else conditioning
    pd.DataFrame({"subject": subject, "encoder": encoder, "kind": "x", "mode": mode, "conditioning": conditioning,
                  "semantic_encoder": conditioning.partition("-")[2] if conditioning.startswith(("pred", "retr")) else "",
                  "guidance": np.nan if mode == "decode" else 3.0, "strength": strength,
                  "seed": seed, "n_parameters": 7 + semantic_parameters, "n_parameters_latent": 7,
                  "n_parameters_semantic": semantic_parameters, "nsd_id": np.arange(n), "retrieval_image": 0.5,
                  "retrieval_brain": 0.25, "pixcorr": pixcorr, "ssim": ssim, "alexnet2": alexnet2, "latent_mse": 0.1,
                  "latent_r": 0.4, "latent_two_way": 0.9, "n_test_trials": 3 * n, "retrieval_pool": n,
                  "weights": "pretrained", "metric_weights": "random (not comparable)"}).to_parquet(path)
    return str(path)


def test_summary_aggregates_runs_joins_the_oracle_and_the_frontier(tmp_path):
    import pandas as pd

    from braid.evaluate import summarise

    files = [
        per_image_file(tmp_path, "a", "subj02", "mlp", "img2img", 0.7, 0, [0.1, 0.3]),
        per_image_file(tmp_path, "b", "subj01", "mlp", "img2img", 0.7, 0, [0.2, 0.4]),
        per_image_file(tmp_path, "c", "subj01", "mlp", "img2img", 0.7, 1, [0.4, 0.6]),
        per_image_file(tmp_path, "d", "subj01", "mlp", "decode", np.nan, -1, [0.5, 0.5]),
        per_image_file(tmp_path, "e", "subj01", "true-latent", "decode", np.nan, -1, [0.9, 0.95]),
        per_image_file(tmp_path, "f", "subj01", "mlp", "img2img", 0.7, 0, [0.5, 0.7], conditioning="predicted-sem",
                       semantic_parameters=30),
    ]
    oracle = []
    for subject, r in (("subj01", 0.8), ("subj02", 0.7)):
        path = tmp_path / f"oracle-{subject}.csv"
        pd.DataFrame([{"subject": subject, "latent_r": r, "latent_mse": 1 - r, "latent_two_way": 1.0,
                       "n_test_trials": 9}]).to_csv(path, index=False)
        oracle.append(str(path))
    frontier = tmp_path / "frontier.csv"
    pd.DataFrame([{"subject": "subj01", "encoder": "mlp", "n_parameters": 7, "test_latent_r": 0.4},
                  {"subject": "subj01", "encoder": "mlp-small", "n_parameters": 3, "test_latent_r": 0.2}]).to_csv(frontier, index=False)
    out = {k: tmp_path / f"s.{k}" for k in ("csv", "parquet", "png", "html")}
    table = summarise(files, out["csv"], out["parquet"], out["png"], out["html"], oracle, [str(frontier)],
                      tmp_path / "fm.csv", out_frontier_images=tmp_path / "fi.png", reference="mlp")
    saved = pd.read_csv(out["csv"], keep_default_na=False, na_values=[""])
    pd.testing.assert_frame_equal(saved.drop(columns=["conditioning", "semantic_encoder"]),
                                  table.drop(columns=["conditioning", "semantic_encoder"]), check_dtype=False)
    assert list(zip(saved["subject"], saved["encoder"], saved["mode"], saved["conditioning"].fillna(""))) == [
        ("subj01", "mlp", "decode", ""), ("subj01", "mlp", "img2img", "none"), ("subj01", "mlp", "img2img", "predicted-sem"),
        ("subj01", "true-latent", "decode", ""), ("subj02", "mlp", "img2img", "none")]
    assert saved["n_parameters"].tolist()[:3] == [7, 7, 37]  # the semantic encoder's parameters add
    mlp = saved.iloc[1]
    assert mlp["pixcorr"] == pytest.approx(0.4) and mlp["n_seeds"] == 2 and mlp["n_test_images"] == 2
    assert mlp["pixcorr_sem"] == pytest.approx(np.std([0.3, 0.5], ddof=1) / np.sqrt(2))
    assert mlp["pixcorr_seed_sd"] == pytest.approx(np.std([0.3, 0.5], ddof=1))
    assert saved["oracle_latent_r"].tolist() == [0.8, 0.8, 0.8, 0.8, 0.7]
    assert len(pd.read_parquet(out["parquet"])) == 12
    joined = pd.read_csv(tmp_path / "fm.csv")
    assert joined["encoder"].tolist() == ["mlp-small", "mlp", "mlp", "mlp"]  # by parameters; mlp's three runs
    assert joined["pixcorr"].isna().tolist() == [True, False, False, False]  # the sweep's encoder is not reconstructed
    assert (tmp_path / "fi.png").read_bytes()[:4] == b"\x89PNG"
    page = out["html"].read_text()
    assert "What the semantic route adds" in page and "PixCorr 0.400 → 0.600" in page and "+30 parameters" in page
    page = out["html"].read_text()
    assert "Published (not computed here)" in page and "MindEye2, 40 sessions" in page
    assert "NOT COMPARABLE" in page  # random metric networks are stamped
    assert "80.0" in page  # 2-way printed in percent, as the papers do
    assert out["png"].read_bytes()[:4] == b"\x89PNG"


def test_network_scores_are_per_reconstruction_two_way_and_correlation_distance():
    """2-way per reconstruction j: the stimuli i != j whose features correlate less with recon j than
    stimulus j's do (MindEye's loop, np.corrcoef); EffNet/SwAV: scipy's correlation distance per image."""
    from scipy.spatial.distance import correlation

    from braid.evaluate import network_scores

    rng = np.random.default_rng(14)
    gt = {m: rng.standard_normal((9, 40)) for m in ("alexnet2", "swav")}
    rec = {m: v + rng.standard_normal(v.shape) * np.linspace(0.2, 3, 9)[:, None] for m, v in gt.items()}
    got = network_scores(rec, gt)
    r = np.corrcoef(gt["alexnet2"], rec["alexnet2"])[:9, 9:]  # rows: stimuli, columns: reconstructions
    np.testing.assert_allclose(got["alexnet2"], [(r[:, j] < r[j, j]).sum() / 8 for j in range(9)])
    assert not np.allclose(got["alexnet2"], [(r[j, :] < r[j, j]).sum() / 8 for j in range(9)])  # not the transpose
    np.testing.assert_allclose(got["swav"], [correlation(a, b) for a, b in zip(gt["swav"], rec["swav"])])


def test_retrieval_of_a_run_uses_latents_z_scored_with_the_training_statistics(mirror, tiny_model, tmp_path):
    """Predictions right in every latent element but one, in which the training std is tiny: raw
    latents retrieve every image, the z-scored ones (what latent_r also uses) are dominated by that
    element and do not. The run's per-image retrieval is that of the image-averaged, z-scored latents."""
    from braid import nsd
    from braid.evaluate import latent_scores, retrieval
    from braid.latents import LatentCache, cache_latents

    root, _ = mirror
    ids = np.array([3, 8, 3, 12, 8, 5, 20, 20])
    cache_latents(root / nsd.STIMULI, tiny_model, ids, tmp_path / "latents.zarr", image_size=64)
    true = LatentCache(tmp_path / "latents.zarr").get(ids).astype(np.float64)
    rng = np.random.default_rng(15)
    pred = true.copy()
    pred[:, 0, 0, 0] += rng.normal(0, 0.5, len(ids))
    z_mean, z_std = true.mean(0), np.ones(true.shape[1:])
    z_std[0, 0, 0] = 1e-4
    store = write_run(tmp_path, pred, ids, z_mean=z_mean, z_std=z_std)
    row, per_image, _ = latent_scores(store, tmp_path / "latents.zarr", pool=300, draws=30)
    uniq = np.unique(ids)
    mean_pred = np.stack([pred[ids == i].mean(0) for i in uniq])
    truth = np.stack([true[ids == i][0] for i in uniq])
    assert retrieval(mean_pred, truth)["image"] == 1.0  # raw latents: every image retrieved
    f32 = lambda a: a.astype(np.float32)  # noqa: E731  (the store holds float32)
    ref = retrieval((f32(mean_pred) - f32(z_mean)) / f32(z_std), (f32(truth) - f32(z_mean)) / f32(z_std))
    np.testing.assert_array_equal(per_image["nsd_id"], uniq)
    np.testing.assert_allclose(per_image["retrieval_image"], ref["per_image"])
    np.testing.assert_allclose(per_image["retrieval_brain"], ref["per_brain"])
    assert per_image["retrieval_image"].mean() < 1 and row["retrieval_pool"] == uniq.size


def test_category_descriptor_ignores_colour_casts_and_reads_the_synthetic_stimuli():
    """The descriptor is each channel's 8 x 8 block means, standardised per channel, centred and of
    unit length (numpy by hand as the reference), so unchanged by a gain and offset per channel but
    not by a flip; the nearest-neighbour readout equals scikit-learn's 1-NN on it; on the synthetic
    stimuli it reads a held-out stimulus's category far above chance (14 categories)."""
    from sklearn.neighbors import KNeighborsClassifier

    from braid.evaluate import CATEGORY_SIZE, category_descriptor, nearest_category, stimuli_as_float
    from braid.metric_networks import to_256
    from braid.synthetic import make_stimuli

    rng = np.random.default_rng(4)
    x = rng.random((2, 3, 256, 256))
    base = category_descriptor(x)
    assert base.shape == (2, 3 * CATEGORY_SIZE * CATEGORY_SIZE)
    blocks = x[1].reshape(3, 8, 32, 8, 32).mean((2, 4))
    blocks = (blocks - blocks.mean((1, 2), keepdims=True)) / (blocks.std((1, 2), keepdims=True) + 1e-6)
    v = blocks.ravel() - blocks.mean()
    np.testing.assert_allclose(base[1], v / np.linalg.norm(v), atol=1e-9)
    cast = x * np.array([0.6, 1.3, 0.9])[:, None, None] + np.array([0.1, -0.05, 0.02])[:, None, None]
    np.testing.assert_allclose(category_descriptor(cast), base, atol=2e-5)  # (std + 1e-6)
    assert np.abs(category_descriptor(x[..., ::-1]) - base).max() > 0.01  # where things are counts

    images, made = make_stimuli(120, np.random.default_rng(0), attributes=True)
    cats = np.array([m["category"] for m in made])
    d = category_descriptor(to_256(stimuli_as_float(images)))
    pool, query = np.arange(90), np.arange(90, 120)
    ours = nearest_category(d[query], d[pool], cats[pool])
    knn = KNeighborsClassifier(n_neighbors=1, metric="cosine").fit(d[pool], cats[pool]).predict(d[query])
    np.testing.assert_array_equal(ours, knn)
    assert (ours == cats[query]).mean() > 3 / 14, (ours == cats[query]).mean()  # measured 0.3 (9 of 30); chance 1/14


def test_grid_rows_with_captions_draw_their_images_as_large_as_the_others(tmp_path):
    """Each row's images in one flat colour: counted in the saved PNG with PIL, a row with captions
    under its images covers as many pixels per image as a row without (its extra height goes to
    the captions)."""
    from PIL import Image

    from braid.evaluate import save_grid

    n = 4
    colours = {"seen": (255, 0, 0), "plain": (0, 0, 255), "captioned": (0, 160, 0), "last": (200, 0, 200)}
    flat = {k: np.broadcast_to(np.array(c, float).reshape(3, 1, 1) / 255, (n, 3, 32, 32)) for k, c in colours.items()}
    stimuli = (np.moveaxis(flat["seen"], 1, -1) * 255).astype(np.uint8)
    rows = [("plain", flat["plain"]), ("captioned", flat["captioned"]), ("last", flat["last"])]
    notes = [None, ["a long caption of the kind retrieval prints under an image"] * n, None]
    save_grid(stimuli, rows, list(range(n)), tmp_path / "grid.png", "title", n=n, notes=notes)
    pixels = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB")).astype(int)
    area = {k: int((np.abs(pixels - np.array(c)).sum(-1) <= 6).sum()) for k, c in colours.items()}
    assert min(area.values()) > 1000, area
    for k in ("plain", "captioned", "last"):
        assert abs(area[k] - area["seen"]) <= 0.03 * area["seen"], area
