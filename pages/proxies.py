"""Proxies: every vulnerability proxy of the sidebar's image, the Hessian spectra, and a solver comparison.

The eigen-solvers run in background threads shared by every session (a result depends only on the
scenario and the solver), so the page stays responsive and a result computed once is reused.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import streamlit as st

from lavp_core.hessian import METHODS
from lavp_ui.formatting import fmt, log_axis, proxies_frame, show_job_error, upscale
from lavp_ui.routing import draw_through_app
from lavp_ui.serving import queue_text
from lavp_ui.sidebar import describe_config, require_scenario
from lavp_ui.tasks import known_proxies_task, live_area, proxies_task

draw_through_app()  # first: a direct visit on a fresh server runs this file alone

METHOD_LABELS = {"exact": "exact (dense Hessian)", "lanczos": "Lanczos (matrix-free)",
                 "paper": "paper recipe (finite differences + power iteration)"}


def spectra_figure(spectra: dict[str, np.ndarray]):
    """Eigenvalues of each loss's Hessian, largest first, on a log axis (one panel per loss)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(spectra)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=[f"H_{n} at x*" for n in names])
    for col, name in enumerate(names, start=1):
        values = np.sort(np.asarray(spectra[name], dtype=float))[::-1]
        rank = np.arange(1, values.size + 1)
        keep = values > 0
        fig.add_trace(go.Scattergl(x=rank[keep], y=values[keep], mode="lines", name=name), row=1, col=col)
        log_axis(fig, "y", values[keep], row=1, col=col, title="eigenvalue (log)" if col == 1 else None)
        fig.update_xaxes(title_text="rank (largest first)", row=1, col=col)
    fig.update_layout(height=360, showlegend=False, margin={"l": 60, "r": 10, "t": 40, "b": 10})
    return fig


def comparison_frame(results: dict) -> pd.DataFrame:
    """One row per (proxy, solver): value, relative difference to exact, residual, converged, seconds."""
    exact = results.get("exact")
    rows = []
    for method, result in results.items():
        for name, value in result.items():
            diag = result.diagnostics.get(name)
            ref = exact[name] if exact is not None and name in exact else math.nan
            rel = abs(value - ref) / abs(ref) if ref and math.isfinite(ref) and method != "exact" else math.nan
            shown = fmt(value, 6)
            if method == "paper" and not math.isfinite(rel) and (name.endswith("_min") or any(
                    extreme == "min" for _, extreme in result.fusions.get(name, ()))):
                # the recipe's λ_min is never shown without its distance from the exact value
                shown = f"{shown} (unverified: the exact value is not computed yet, and the recipe's λ_min can be " \
                        f"far from it)"
            rows.append({"proxy": name, "solver": method, "value": shown,
                         "rel. diff. to exact": fmt(rel, 3),
                         "residual ‖Hv−λv‖/|λ|": fmt(diag.residual if diag else None, 3),
                         "converged": "yes" if result.converged(name) else "no",
                         "iterations": "" if diag is None else str(diag.iterations),
                         "seconds": fmt(diag.seconds if diag else None, 3)})
    frame = pd.DataFrame(rows)
    proxies = {name: i for i, name in enumerate(dict.fromkeys(frame["proxy"]))}  # compute_proxies' order
    methods = {m: i for i, m in enumerate(METHODS)}
    return frame.sort_values(["proxy", "solver"], key=lambda s: s.map(methods if s.name == "solver" else proxies),
                             kind="stable")


scenario = require_scenario()
config = scenario.config
st.title("Proxies")
st.caption(f"Client image: {scenario.description} · {describe_config(config)}")
left, right = st.columns([1, 4])
left.image(upscale(scenario.image01[0], 5), caption="x*, the client's image", output_format="PNG")
right.markdown(
    "Each proxy is computed at the ground truth x*: the gradient norm ‖g*‖ and, for the L2 and cosine matching "
    "losses, the largest and smallest eigenvalue of the loss's Hessian (LAVP), plus the paper's loss-agnostic "
    "fusion √(l2_max · cos_min). The paper claims: larger values predict a worse reconstruction under that "
    "loss. Whether they do in this app's models is measured on the Study page (σ_S with its interval, and "
    "whether the attacks recovered the images at all); a value here is not a verdict on this image.")

st.subheader("Every proxy, exactly, with the spectra")
exact_task = known_proxies_task(config, "exact")
if exact_task is None or exact_task.view().error is not None:
    st.button("Compute the exact proxies and spectra", icon=":material/calculate:", key="btn.proxies.exact",
              on_click=proxies_task, args=(config, "exact"),
              help=f"Forms the dense {scenario.image[0].numel()}×{scenario.image[0].numel()} Hessians with "
                   f"Hessian-vector products: 20–60 s on 2 CPU cores. It keeps running if you leave "
                   f"the page, and the result is kept for this image and model.")
exact_task = known_proxies_task(config, "exact")


def render_exact() -> None:
    view = exact_task.view()
    if view.running:
        st.progress(view.progress, text=queue_text(view.queue_position) or f"{view.message}… {view.elapsed:.0f} s")
        return
    if view.error is not None:
        show_job_error(view.error)
        return
    result = view.result
    st.dataframe(proxies_frame(result), hide_index=True)
    st.caption(f"d = {result.input_dim} input values, n = {result.num_params} weights, {result.seconds:.1f} s.")
    if result.spectra:
        st.plotly_chart(spectra_figure(result.spectra), config={"displayModeBar": False})
        notes = [f"{name}: {int((np.asarray(v) <= 0).sum())} of {len(v)} eigenvalues ≤ 0 (not drawn on the log axis;"
                 f" both Hessians are positive semi-definite, so these are zero up to rounding)"
                 for name, v in result.spectra.items() if (np.asarray(v) <= 0).any()]
        for note in notes:
            st.caption(note)


if exact_task is not None:
    live_area(render_exact, lambda: not exact_task.finished)
else:
    st.caption("Not computed yet for this image and model.")

st.subheader("Solver comparison")
st.markdown("The same proxies from the exact solver, Lanczos (ARPACK, matrix-free) and the paper's recipe "
            "(finite-difference Hessian-vector products with power iteration). The paper recipe runs by itself: "
            "it takes seconds.")
proxies_task(config, "paper")
missing = [m for m in METHODS if known_proxies_task(config, m) is None]
if missing:
    def start_missing() -> None:
        for method in missing:
            proxies_task(config, method)

    st.button(f"Compute with {', '.join(METHOD_LABELS[m] for m in missing)}", key="btn.proxies.compare",
              on_click=start_missing, icon=":material/compare_arrows:")
tasks = {m: known_proxies_task(config, m) for m in METHODS}
tasks = {m: t for m, t in tasks.items() if t is not None}


def render_comparison() -> None:
    views = {m: t.view() for m, t in tasks.items()}
    for method, view in views.items():
        if view.running:
            doing = queue_text(view.queue_position) or f"{view.message}… {view.elapsed:.0f} s"
            st.progress(view.progress, text=f"{METHOD_LABELS[method]}: {doing}")
        elif view.error is not None:
            show_job_error(view.error)
    done = {m: v.result for m, v in views.items() if v.result is not None and v.error is None}
    if done:
        st.dataframe(comparison_frame(done), hide_index=True)


live_area(render_comparison, lambda: any(not t.finished for t in tasks.values()))
