"""L2 against cosine on one image: where its LAVP sits among a reference population, which loss the
paper's claim expects to leak more, and which did.

LAVP values of different matching losses are not comparable in absolute terms (λ_max of the L2 Hessian is
in the hundreds where the cosine one is below one), so the expectation compares *ranks*: the percentile of
this image's ``l2_max`` among a reference study's ``l2_max`` against the percentile of its ``cos_max``
among the study's ``cos_max``. The paper claims a smaller LAVP means a better reconstruction, so the loss
whose own LAVP sits lower is the one the claim expects to leak more. What did leak more is the higher
SSIM. Every word of :attr:`LossComparison.sentence` is computed from the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

COMPARED_LOSSES: tuple[str, str] = ("l2", "cos")
LOSS_NAMES = {"l2": "L2", "cos": "cosine"}  # the app's one label per loss ("CS" only when quoting the paper)


def loss_name(loss: str) -> str:
    """The label the app uses for a matching loss (``"cos"`` → ``"cosine"``)."""
    return LOSS_NAMES.get(loss, loss)


def percentile_rank(value: float, population: Sequence[float]) -> float:
    """The percentage (0–100) of ``population`` below ``value``, ties counting half; NaN when the
    population has no finite value or ``value`` is not finite."""
    values = np.asarray([v for v in population if v is not None and math.isfinite(v)], dtype=float)
    if values.size == 0 or value is None or not math.isfinite(value):
        return math.nan
    below = float(np.sum(values < value)) + 0.5 * float(np.sum(values == value))
    return 100.0 * below / values.size


def reference_lavp(df: pd.DataFrame, *, dataset: str, arch: str, weights: str, seed: int | None = None,
                   flavour: str = "exact") -> dict[str, np.ndarray]:
    """Each loss's λ_max over the images of a study's results (:func:`lavp_core.study.load_results`) that
    used the same dataset, architecture and weights (and model ``seed`` for random weights, when given).

    Returns ``{"l2": values, "cos": values}`` (one value per distinct image, NaN dropped); empty arrays when
    no row matches.
    """
    empty = {loss: np.empty(0) for loss in COMPARED_LOSSES}
    if df is None or df.empty:
        return empty
    mask = (df.get("dataset") == dataset) & (df.get("arch") == arch) & (df.get("weights") == weights)
    if weights == "random" and seed is not None and "seed" in df:
        mask &= df["seed"] == seed
    rows = df[mask]
    if rows.empty:
        return empty
    keys = [k for k in ("dataset", "split", "image_index", "image", "arch", "weights", "seed") if k in rows]
    images = rows.drop_duplicates(keys)
    out = {}
    for loss in COMPARED_LOSSES:
        column = f"{flavour}_{loss}_max"
        values = pd.to_numeric(images[column], errors="coerce").to_numpy(float) if column in images else np.empty(0)
        out[loss] = values[np.isfinite(values)]
    return out


@dataclass(frozen=True)
class LossComparison:
    """The outcome of an L2-against-cosine comparison on one image.

    ``percentiles``: loss → percentile of this image's λ_max among the reference's (empty without one);
    ``expected``: the loss the paper's claim expects to leak more (``None``: no reference, or a tie);
    ``leaked``: the loss with the higher SSIM (``None`` on a tie); ``sentence``: the verdict in words.
    """

    percentiles: dict[str, float]
    reference_size: int
    expected: str | None
    leaked: str | None
    sentence: str


def _ordinal(value: float) -> str:
    n = int(round(value))
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def compare_losses(ssim: Mapping[str, float], lavp_max: Mapping[str, float],
                   reference: Mapping[str, Sequence[float]] | None, *, model: str) -> LossComparison:
    """Which loss the paper's claim expects to leak more on this image, and which did.

    Args:
        ssim: ``{"l2": SSIM of the L2 attack, "cos": SSIM of the cosine attack}`` (higher: leaked more).
        lavp_max: this image's λ_max of each loss's Hessian (``l2_max``, ``cos_max``).
        reference: each loss's λ_max over a reference population (:func:`reference_lavp`); ``None`` or
            empty when no reference matches the model.
        model: how to name the model in the sentence (e.g. ``"lenet, random weights"``).
    """
    l2, cos = COMPARED_LOSSES
    leaked: str | None = None
    if ssim[l2] > ssim[cos]:
        leaked = l2
    elif ssim[cos] > ssim[l2]:
        leaked = cos
    if leaked is None:
        outcome = f"both attacks reached the same SSIM ({ssim[l2]:.2f})"
    else:
        other = cos if leaked == l2 else l2
        outcome = (f"the {loss_name(leaked)} attack leaked more (SSIM {ssim[leaked]:.2f} against "
                   f"{ssim[other]:.2f} with {loss_name(other)})")

    sizes = [len(reference[loss]) for loss in COMPARED_LOSSES] if reference else [0, 0]
    if min(sizes) == 0:
        sentence = (f"No reference study matches {model}, so which loss the paper's claim (a smaller LAVP "
                    f"means a better reconstruction) expects to leak more cannot be stated for this model; "
                    f"{outcome}.")
        return LossComparison({}, 0, None, leaked, sentence[0].upper() + sentence[1:])

    percentiles = {loss: percentile_rank(lavp_max[loss], reference[loss]) for loss in COMPARED_LOSSES}
    n = min(sizes)
    where = (f"this image's l2_max sits at the {_ordinal(percentiles[l2])} percentile of the reference study's "
             f"{sizes[0]} images ({model}) and its cos_max at the {_ordinal(percentiles[cos])} percentile of "
             f"theirs")
    if math.isnan(percentiles[l2]) or math.isnan(percentiles[cos]):
        expected = None
        expectation = "this image's LAVP is missing, so the paper's claim gives no expectation"
    elif percentiles[l2] < percentiles[cos]:
        expected = l2
    elif percentiles[cos] < percentiles[l2]:
        expected = cos
    else:
        expected = None
    if not (math.isnan(percentiles[l2]) or math.isnan(percentiles[cos])):
        expectation = (f"so the paper's claim (a smaller LAVP means a better reconstruction) expects the "
                       f"{loss_name(expected)} attack to leak more" if expected is not None else
                       "so the paper's claim (a smaller LAVP means a better reconstruction) expects neither "
                       "loss to leak more")
    if expected is not None and leaked is not None:
        verdict = "as expected" if expected == leaked else "against that expectation"
        ending = f"{outcome}, {verdict}"
    else:
        ending = outcome
    sentence = f"{where}, {expectation}; {ending}."
    return LossComparison(percentiles, n, expected, leaked, sentence[0].upper() + sentence[1:])
