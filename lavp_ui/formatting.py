"""How the pages show numbers, tables, images, charts and errors (no state, no computation)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import streamlit as st
import torch

from lavp_core.errors import LavpError
from lavp_core.metrics import to_uint8_image
from lavp_core.proxies import proxy_title


def show_error(exc: BaseException, what_to_do: str = "") -> None:
    """An error box for an exception: a :class:`LavpError`'s message already says what to do; anything
    else is a bug, shown as one line (never a traceback)."""
    if isinstance(exc, LavpError):
        st.error(f"{exc}" + (f" {what_to_do}" if what_to_do else ""), icon=":material/error:")
    else:
        st.error(f"Something went wrong inside the app ({type(exc).__name__}: {exc}). "
                 f"{what_to_do or 'Try other settings; if it persists, report it with these settings.'}",
                 icon=":material/error:")


def show_job_error(error) -> None:
    """An error box for a :class:`lavp_core.jobs.JobError` from a background job."""
    if error.user:
        st.error(error.message, icon=":material/error:")
    else:
        st.error(f"The computation failed inside the app ({error.message}). Try other settings; if it "
                 f"persists, report it with these settings.", icon=":material/error:")


def fmt(value, digits: int = 4) -> str:
    """A number for a table: NaN and None as 'n/a', inf as '∞', else ``digits`` significant digits."""
    if value is None:
        return "n/a"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return f"{value:.{digits}g}"


def metrics_frame(scores: dict) -> pd.DataFrame:
    """The similarity scores as a table: MSE, PSNR, SSIM and LPIPS (or 'unavailable' and why)."""
    rows = [("MSE", fmt(scores.get("mse")), "lower is better"),
            ("PSNR (dB)", fmt(scores.get("psnr")), "higher is better"),
            ("SSIM", fmt(scores.get("ssim")), "higher is better")]
    if scores.get("lpips") is None:
        rows.append(("LPIPS", "unavailable", scores.get("lpips_reason") or "not computed"))
    else:
        rows.append(("LPIPS", fmt(scores["lpips"]), "lower is better"))
    return pd.DataFrame(rows, columns=["score", "value", "note"])


def proxies_frame(result) -> pd.DataFrame:
    """A :class:`lavp_core.proxies.ProxyResult` as a table: proxy, meaning (the proxy table's title), value,
    converged."""
    rows = [(name, proxy_title(name), fmt(value, 5), "yes" if result.converged(name) else "no")
            for name, value in result.items()]
    return pd.DataFrame(rows, columns=["proxy", "meaning", "value", "converged"])


def upscale(image: np.ndarray | torch.Tensor, factor: int = 6) -> np.ndarray:
    """A uint8 (H, W, 3) image (or a [0, 1] tensor) enlarged by pixel repetition (no blur)."""
    if isinstance(image, torch.Tensor):
        image = to_uint8_image(image)
    return np.repeat(np.repeat(np.asarray(image), factor, axis=0), factor, axis=1)


def png_array(png: bytes, factor: int = 3) -> np.ndarray:
    """A stored PNG as a uint8 (H·factor, W·factor, 3) array, enlarged by pixel repetition."""
    from PIL import Image

    return upscale(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), factor)


def loss_curve(history: Sequence[tuple[int, float]], *, title: str = "Matching loss", height: int = 260):
    """A plotly line of (step, loss) on a log y axis (non-positive and NaN values are left out)."""
    import plotly.graph_objects as go

    points = [(s, v) for s, v in history if v is not None and math.isfinite(v) and v > 0]
    fig = go.Figure(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
                               marker={"size": 4}, name="best matching loss"))
    fig.update_layout(title=title, height=height, margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      xaxis_title="step", yaxis_title="matching loss (log)", showlegend=False)
    log_axis(fig, "y", [p[1] for p in points])
    return fig


SUPERSCRIPTS = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
LOSS_NAMES = {"l2": "L2", "cos": "cosine"}  # the app's one label per attack loss ("CS" only in the paper's tables)


def loss_name(loss: str) -> str:
    """The app's label of an attack loss: ``l2`` → ``L2``, ``cos`` → ``cosine``."""
    return LOSS_NAMES.get(loss, loss)


def power_label(exponent: int) -> str:
    """``-3`` → ``10⁻³``; ``0`` → ``1``; ``1`` → ``10``."""
    return {0: "1", 1: "10"}.get(exponent, "10" + str(exponent).translate(SUPERSCRIPTS))


def log_axis(fig, axis: str, values, *, row: int | None = None, col: int | None = None, title: str | None = None,
             max_ticks: int = 7) -> None:
    """Make ``axis`` ("x" or "y") of ``fig`` (or of its subplot ``row``, ``col``) a log axis labelled at powers
    of ten only ("10⁻³"; never bare mantissas like "2 / 5" nor SI prefixes like "1f"): the range spans whole
    decades around the finite positive ``values``, with every decade labelled (every second or third one
    when they are many)."""
    v = np.asarray(list(values), dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size:
        low, high = math.floor(math.log10(v.min())), math.ceil(math.log10(v.max()))
    else:
        low, high = 0, 1
    high = max(high, low + 1)
    step = max(1, math.ceil((high - low) / max_ticks))
    exponents = list(range(low, high + 1, step))
    update = fig.update_xaxes if axis == "x" else fig.update_yaxes
    kwargs = {} if row is None else {"row": row, "col": col}
    if title is not None:
        kwargs["title_text"] = title
    update(type="log", range=[low, high], tickmode="array", tickvals=[10.0 ** e for e in exponents],
           ticktext=[power_label(e) for e in exponents], exponentformat="power", showexponent="all",
           minor={"showgrid": False}, **kwargs)
