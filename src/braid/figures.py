"""What BRAID's figures and tables share: a figure saved whole, and one stamp on numbers that
are not results.

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
