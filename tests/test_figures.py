"""braid.figures: the one stamp on numbers that are not results, and saving a figure whole."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from braid.figures import not_a_result, save_figure, stamped  # noqa: E402


def test_pretrained_weights_need_no_stamp():
    assert not_a_result(["pretrained"], ["pretrained", "none (no networks)"]) == []
    assert stamped("title", ["pretrained"], ["pretrained"]) == "title"


def test_every_built_model_and_random_metric_networks_are_named_once():
    reasons = not_a_result(["synthetic-trained (not a result)", "random (not a result)", "synthetic-trained (not a result)"],
                           ["pretrained", "random (not comparable)"])
    assert reasons == [
        "the diffusion model's weights are random / synthetic-trained, not pretrained: NOT A RESULT",
        "the metric networks' weights are random: AlexNet, Inception, CLIP, EffNet and SwAV scores are NOT COMPARABLE",
    ]
    assert stamped("a title", ["random (not a result)"]).splitlines() == [
        "the diffusion model's weights are random, not pretrained: NOT A RESULT", "a title"]


def test_a_figure_is_saved_as_png_and_closed(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure(fig, tmp_path / "f.png", dpi=50)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fig.number not in plt.get_fignums()
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]


def test_a_figure_that_fails_to_save_leaves_no_file_and_is_closed(tmp_path):
    fig, ax = plt.subplots()
    ax.text(0, 0, r"$\notacommand$")  # mathtext fails when the figure is drawn
    with pytest.raises(ValueError):
        save_figure(fig, tmp_path / "f.png")
    assert fig.number not in plt.get_fignums()
    assert list(tmp_path.iterdir()) == []
