"""The frontier: Pareto front, scores recomputed from the stored arrays, the mean-predictor row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from braid import encoder, frontier
from test_encoder import noisy_problem, outputs, write_stores


def test_pareto_front_keeps_what_nothing_smaller_beats():
    params = [0, 10, 10, 100, 1000, 1000, 5000]
    quality = [0.0, 0.3, 0.2, 0.25, 0.6, 0.6, 0.5]
    # 10/0.2 loses to 10/0.3; 100/0.25 to 10/0.3; 5000/0.5 to 1000/0.6; the equal pair both stay
    assert frontier.pareto_front(params, quality).tolist() == [True, True, False, False, True, True, False]
    assert not frontier.pareto_front([1, 2], [np.nan, 0.1])[0]
    assert frontier.pareto_front([10, 20], [0.3, 0.3]).tolist() == [True, False]  # as good, but bigger


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("frontier")
    x, z, split = noisy_problem(n=240, d=30, q=16, noise=1.0, rank=2)
    paths = write_stores(root, x, z, split)
    specs = {"ridge": {"kind": "ridge"}, "rank1": {"kind": "lowrank", "rank": 1},
             "rank4": {"kind": "lowrank", "rank": 4}, "mlp": {"hidden": [64], "dropout": 0.0, "lr": 3e-3,
                                                               "batch_size": 16, "epochs": 10}}
    for name, sp in specs.items():
        encoder.train(*paths, sp, *outputs(root / name))
    return root, z, split, list(specs)


def test_the_table_scores_every_encoder_and_the_mean_predictor(trained, tmp_path, caplog):
    root, z, split, names = trained
    caplog.set_level("INFO")
    t = frontier.write("subj01", {n: root / n / "p.zarr" for n in names}, root / "latents.zarr", "mlp",
                       tmp_path / "f.csv", tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "f.csv"), t, check_dtype=False)
    assert t["n_parameters"].is_monotonic_increasing and t.index.tolist() == list(range(len(t)))
    assert "index" not in t.columns
    front_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("front:")]
    assert front_lines and not any("mean latent" in line for line in front_lines)
    assert t["encoder"].tolist() == ["mean latent (baseline)", "rank1", "rank4", "ridge", "mlp"]
    assert t.set_index("encoder")["n_parameters"].to_dict() == {
        "mean latent (baseline)": 0, "rank1": 30 + 16 + 16, "rank4": 30 * 4 + 4 * 16 + 16, "ridge": 30 * 16 + 16,
        "mlp": 30 * 64 + 64 + 2 * 64 + 64 * 16 + 16}
    tr, te = split == "train", split == "test"
    mean, sd = z[tr].mean(0), z[tr].std(0)
    for row in t.itertuples():
        if row.kind == "baseline":
            assert row.test_mse_z == pytest.approx(np.mean(((mean - z[te]) / sd) ** 2), rel=1e-5)
            assert row.test_latent_mse == pytest.approx(np.mean((mean - z[te]) ** 2), rel=1e-5)
            assert (row.n_voxels, row.test_latent_r, row.val_latent_r, row.test_latent_two_way) == (0, 0.0, 0.0, 0.5)
            continue
        pred = encoder.load_predictions(root / row.encoder / "p.zarr")["pred"].reshape(te.sum(), -1)
        r = [np.corrcoef((p - mean) / sd, (q - mean) / sd)[0, 1] for p, q in zip(pred, z[te])]
        assert row.test_latent_r == pytest.approx(np.mean(r), rel=1e-5)
        assert row.test_mse_z == pytest.approx(np.mean(((pred - z[te]) / sd) ** 2), rel=1e-5)
        # on this linear, noisy problem every encoder beats the mean predictor by a wide margin
        assert row.test_mse_z < 0.7 * t["test_mse_z"].iloc[0] and row.test_latent_r > 0.3
    ref = t.set_index("encoder").loc["mlp"]
    assert ref["is_reference"] and ref["fraction_of_reference"] == 1
    assert t.set_index("encoder").loc["ridge", "fraction_of_reference"] == pytest.approx((30 * 16 + 16) / ref["n_parameters"])
    expected = frontier.pareto_front(t["n_parameters"], t["test_latent_r"])
    assert t["pareto"].tolist() == expected.tolist() and t["pareto"].iloc[0]


def _runs(rows):
    cols = ["subject", "encoder", "mode", "conditioning", "strength", "guidance", "pixcorr", "category",
            "n_parameters_semantic"]
    return pd.DataFrame(rows, columns=cols)


def test_image_points_look_where_the_conditionings_ran_and_the_paragraph_reads_them():
    """The fixed prompt runs at 0.3 and 0.8, the conditionings at 0.5 only: the frontier's points and
    the report's paragraph compare them at 0.5 and the lowest guidance (listed second here); without
    conditionings, at the highest strength, and the paragraph is empty."""
    from braid.frontier import image_points
    from braid.published import semantic_paragraph

    rows = [["subj01", "ridge", "decode", "", None, None, 0.5, 0.4, 0]]
    for g in (5.0, 3.5):
        for s in (0.3, 0.5, 0.8):
            rows.append(["subj01", "ridge", "img2img", "none", s, g, 0.2 + s / 10 + g / 100, 0.1, 0])
        rows.append(["subj01", "ridge", "img2img", "predicted-sem", 0.5, g, 0.31, 0.35, 1234])
    points, strength, guidance = image_points(_runs(rows))
    assert (strength, guidance) == (0.5, 3.5)
    assert sorted(points["conditioning"]) == ["none", "predicted-sem"]
    text = semantic_paragraph(_runs(rows))
    base = 0.2 + 0.5 / 10 + 3.5 / 100
    assert "strength 0.5 and guidance 3.5" in text and f"PixCorr {base:.3f} → 0.310" in text, text
    assert "category readout 10.0 % → 35.0 %" in text and "(+1,234 parameters)" in text, text
    plain = [r for r in rows if r[3] != "predicted-sem"]
    assert image_points(_runs(plain))[1:] == (0.8, 3.5)
    assert semantic_paragraph(_runs(plain)) == ""
