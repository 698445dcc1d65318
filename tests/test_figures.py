"""braid.figures: the one stamp on numbers that are not results, and saving a figure whole."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from braid.figures import label_apart, not_a_result, save_figure, stamped  # noqa: E402


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


def _crowded_axes():
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.set_xscale("log")
    ax.set_xlim(1e2, 1e10)
    ax.set_ylim(-0.1, 0.4)
    # three points closer than a label's size (the published methods on PixCorr), one far away
    return fig, ax, [("MindEye2, 40 h", 7.3e8, 0.32), ("MindTuner", 7.0e8, 0.321), ("MindEye1 (est.)", 9e8, 0.31),
                     ("alone", 1e3, 0.0)]


@pytest.mark.parametrize("offset, gap", [((3, -8), -7), ((3, 3), 7)])
def test_labels_of_crowded_points_do_not_overlap_and_stay_inside_at_their_points(offset, gap):
    fig, ax, points = _crowded_axes()
    renderer = fig.canvas.get_renderer()
    start = [ax.annotate(text, (x, y), fontsize=6, xytext=offset, textcoords="offset points") for text, x, y in points]
    start_boxes = [a.get_window_extent(renderer) for a in start]
    assert start_boxes[0].overlaps(start_boxes[1])  # at one offset, these labels would overlap
    for a in start:
        a.remove()
    annotations = {a.get_text(): a for a in label_apart(ax, points, fontsize=6, offset=offset, gap=gap)}
    assert sorted(annotations) == sorted(t for t, _, _ in points)
    boxes = [a.get_window_extent(renderer) for a in annotations.values()]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    frame = ax.get_window_extent(renderer)
    for box in boxes:  # MindEye1's label does not fit right of its point at 9e8 of 1e10
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, box
    for text, x, y in points:  # each label names its own point, next to it
        ann = annotations[text]
        point = ax.transData.transform((x, y))
        box = ann.get_window_extent(renderer)
        assert ann.xy == (x, y) and abs(ann.xyann[0]) == offset[0]
        gap_px = min(abs(box.x0 - point[0]), abs(box.x1 - point[0]))
        assert gap_px < 10 and min(abs(box.y0 - point[1]), abs(box.y1 - point[1])) < 60, (text, box, point)
    assert annotations["alone"].xyann == offset  # nothing in its way: where it was asked to be
    plt.close(fig)
