"""Metric definitions: identities, chance levels and the repeat-aware 2-way identification."""

from __future__ import annotations

import numpy as np
import pytest

from braid.common import BraidError
from braid.evaluate import image_metrics, rowwise_pearson, two_way_identification


def test_two_way_identical_is_perfect_shuffled_is_chance():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((200, 50))
    assert two_way_identification(real, real) == 1.0
    shuffled = real[rng.permutation(200)]
    assert abs(two_way_identification(real, shuffled) - 0.5) < 0.05


def test_two_way_matches_reference_formula():
    rng = np.random.default_rng(1)
    real = rng.standard_normal((30, 20))
    pred = real + 2 * rng.standard_normal((30, 20))
    n = len(real)
    r = np.corrcoef(real, pred)[:n, n:]
    ref = np.mean([(r[:, j] < r[j, j]).sum() / (n - 1) for j in range(n)])  # MindEye's loop
    assert two_way_identification(real, pred) == pytest.approx(ref)


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
