"""What BRAID's figures and tables share: a figure saved whole, labels that do not overlap, and
one stamp on numbers that are not results.

Numbers from a diffusion model whose weights are not the published ones (random, or trained
here on the synthetic stimuli) are not results; scores from metric networks with random
weights are not comparable with anything. Every figure title and page that shows such numbers
carries the same words, from :func:`not_a_result`.
"""

from __future__ import annotations

import os
from typing import Iterable

from .common import atomic_output


def not_a_result(model_weights: Iterable[str] = (), metric_weights: Iterable[str] = ()) -> list[str]:
    """Why the numbers are not results, one sentence per reason (empty when they are).

    ``model_weights``: the diffusion model's weights stamps (``pretrained``, ``random (not a
    result)``, ``synthetic-trained (not a result)``); ``metric_weights``: the metric networks'
    (``pretrained``, ``random (not comparable)``, or no networks).
    """
    reasons = []
    built = sorted({str(w).split()[0] for w in model_weights if str(w) != "pretrained"})
    if built:
        reasons.append(f"the diffusion model's weights are {' / '.join(built)}, not pretrained: NOT A RESULT")
    if any(str(w).startswith("random") for w in metric_weights):
        reasons.append("the metric networks' weights are random: AlexNet, Inception, CLIP, EffNet and SwAV scores "
                       "are NOT COMPARABLE")
    return reasons


def stamped(title: str, model_weights: Iterable[str] = (), metric_weights: Iterable[str] = ()) -> str:
    """``title`` under the reasons its numbers are not results, if any."""
    return "\n".join([*not_a_result(model_weights, metric_weights), title])


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> None:
    """Write ``fig`` to ``path`` as a PNG (whole or not at all) and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)


def label_apart(ax, labels, fontsize: float = 6, color: str = "k", offset: tuple = (3.0, -8.0),
                gap: float = -7.0) -> list:
    """Annotate points ``labels`` ((text, x, y) in data coordinates), each at ``offset`` points
    from its point where that overlaps no label placed before it and stays inside the axes; if
    not, the first of: the same height left of the point, then the other side of the point
    (above instead of below), then each of these ``gap`` points further on (negative: down).
    Labels are placed from the top when ``gap`` is negative, from the bottom when positive.
    Call it once the axes' limits and size are final. Returns the annotations."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    dx, dy0 = offset

    def candidates(k):
        dy = dy0 + k * gap
        mirrored = -dy0 - fontsize - k * gap  # the same distance on the other side of the point
        return [(dx, dy, "left"), (-dx, dy, "right"), (dx, mirrored, "left"), (-dx, mirrored, "right")]

    placed, out = [], []
    for text, x, y in sorted(labels, key=lambda t: t[2] if gap > 0 else -t[2]):
        ann = ax.annotate(text, (x, y), fontsize=fontsize, xytext=offset, textcoords="offset points", color=color)
        tries = [c for k in range(len(placed) + 1) for c in candidates(k)]
        # nowhere free: the first position, stacked past every label placed before it
        for cx, cy, ha in [*tries, (dx, dy0 + len(placed) * gap, "left")]:
            ann.xyann = (cx, cy)
            ann.set_horizontalalignment(ha)
            box = ann.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(other) for other in placed):
                break
        placed.append(box)
        out.append(ann)
    return out
