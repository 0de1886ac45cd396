"""Study: proxies against reconstruction quality over many images (the paper's Figures 2-3, Table 1).

Reads a results database written by ``python -m lavp_core study`` (the bundled study by default).
Plotly cannot draw an image inside a hover label, so hovering a point shows its image id, class and
values, and clicking (or box/lasso-selecting) points shows their ground truth and reconstruction,
stored as PNGs in the database, below the plots.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import streamlit as st

from lavp_core.errors import LavpError
from lavp_core.study import check_one_configuration, loss_label, proxy_column, proxy_names, spearman, table1, table3
from lavp_ui.formatting import fmt, png_array, show_error
from lavp_ui.routing import draw_through_app
from lavp_ui.sidebar import keep_valid
from lavp_ui.study_access import database_picker, pick_study, read_study, show_study_progress, study_images

draw_through_app()  # first: a direct visit on a fresh server runs this file alone

SCORE_LABELS = {"mse": "MSE (↓)", "psnr": "PSNR (↑)", "ssim": "SSIM (↑)", "lpips": "LPIPS (↓)"}
FLAVOUR_LABELS = {"exact": "exact eigenvalues", "paper": "paper recipe"}
MAX_SHOWN = 6


def scatter_panels(sub: pd.DataFrame, proxies: list[str], flavour: str, score: str):
    """One log-log panel per proxy: proxy value (x) against the score (y), σ_S in each title.

    Returns (figure, job keys per trace, points left out because they are not positive)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    cols = min(3, len(proxies))
    rows = math.ceil(len(proxies) / cols)
    titles, keys, dropped = [], [], 0
    traces = []
    for proxy in proxies:
        x = sub[proxy_column(proxy, flavour)].to_numpy(float)
        y = sub[score].to_numpy(float)
        rho, _, n = spearman(x, y)
        titles.append(f"{proxy}: σ_S = {'n/a' if math.isnan(rho) else f'{rho:+.2f}'} (n = {n})")
        keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
        dropped += int((np.isfinite(x) & np.isfinite(y) & ~keep).sum())
        part = sub[keep]
        custom = np.stack([part["image_index"].astype(int).astype(str).to_numpy(),
                           part.get("image_description", pd.Series("", index=part.index)).fillna("").to_numpy(),
                           part["job_key"].to_numpy()], axis=1) if len(part) else np.empty((0, 3))
        keys.append(list(part["job_key"]))
        traces.append(go.Scatter(
            x=x[keep], y=y[keep], mode="markers", name=proxy, customdata=custom,
            marker={"size": 8, "opacity": 0.8},
            hovertemplate=(f"image #%{{customdata[0]}}<br>%{{customdata[1]}}<br>{proxy} = %{{x:.4g}}<br>"
                           f"{score} = %{{y:.4g}}<extra></extra>")))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.08,
                        vertical_spacing=0.16)
    for i, trace in enumerate(traces):
        r, c = i // cols + 1, i % cols + 1
        fig.add_trace(trace, row=r, col=c)
        fig.update_xaxes(type="log", dtick="D2", title_text=f"{proxies[i]} (log)", row=r, col=c)
        fig.update_yaxes(type="log", dtick="D2", title_text=f"{score} (log)" if c == 1 else None, row=r, col=c)
    fig.update_layout(height=320 * rows, showlegend=False, margin={"l": 10, "r": 10, "t": 50, "b": 10},
                      clickmode="event+select")
    return fig, keys, dropped


def selected_keys(event, keys: list[list[str]]) -> list[str]:
    """Job keys of the points selected in the chart (clicked, boxed or lassoed)."""
    out: list[str] = []
    points = event.selection.points if event is not None and "selection" in event else []
    for point in points:
        custom = point.get("customdata")
        if isinstance(custom, (list, tuple)) and len(custom) >= 3:
            key = custom[2]
        else:
            curve, index = point.get("curve_number"), point.get("point_index", point.get("point_number"))
            if curve is None or index is None or curve >= len(keys) or index >= len(keys[curve]):
                continue
            key = keys[curve][index]
        if key not in out:
            out.append(key)
    return out


def show_images(path: str, rows: pd.DataFrame) -> None:
    """Ground truth and reconstruction of each row, from the database's PNGs."""
    cols = st.columns(max(1, min(MAX_SHOWN, len(rows))))
    for col, row in zip(cols, rows.itertuples()):
        try:
            recon, truth = study_images(path, row.job_key)
        except LavpError as exc:
            with col:
                show_error(exc)
            continue
        images = [png_array(png) for png in (truth, recon) if png is not None]
        if images:
            col.image(images, output_format="PNG")
        col.caption(f"#{row.image_index} · MSE {fmt(row.mse, 3)}"
                    + ("" if recon is not None else " · no reconstruction stored"))


# --------------------------------------------------------------------------------------------
# Page

st.title("Study")
st.caption("Proxy against reconstruction quality over the images of a study, like the paper's Figures 2 and 3, "
           "with its Table 1 correlations.")
path = database_picker("study")
if path is None:
    st.stop()
try:
    df = read_study(path, pick_study(path, "study"))
except LavpError as exc:
    show_error(exc)
    st.stop()
show_study_progress(path)
try:
    check_one_configuration(df)
except LavpError as exc:
    show_error(exc, "Pick one study in this database, or one database per configuration.")
    st.stop()
if df.empty:
    st.info(f"{path} holds no finished jobs yet. Run a study into it: python -m lavp_core study --db {path}")
    st.stop()

flavours = [f for f in ("exact", "paper") if proxy_names(df, f)]
if not flavours:
    st.error(f"{path} holds no proxy values; rerun the study with --flavours exact,paper")
    st.stop()
archs = sorted(df["arch"].unique())
losses = sorted(df["loss"].unique(), key=lambda v: (v not in ("l2", "cos"), v != "l2", v))
scores = [s for s in ("mse", "ssim", "psnr", "lpips") if s in df and df[s].notna().any()]
for key, options in (("study.arch", archs), ("study.loss", losses), ("study.score", scores),
                     ("study.flavour", flavours)):
    keep_valid(key, options)
c1, c2, c3, c4 = st.columns(4)
arch = c1.selectbox("Architecture", archs, key="study.arch")
loss = c2.selectbox("Attack loss", losses, key="study.loss", format_func=lambda v: f"{v} ({loss_label(v)})")
score = c3.selectbox("Similarity score", scores, key="study.score", format_func=SCORE_LABELS.get)
flavour = c4.radio("Proxy values", flavours, key="study.flavour", format_func=FLAVOUR_LABELS.get,
                   help="exact: certified eigenvalues; paper recipe: finite differences + power iteration")
if "lpips" in df and df["lpips"].isna().all():
    reason = next((r for r in df.get("lpips_reason", pd.Series(dtype=object)).dropna() if r), "")
    st.caption(f"LPIPS is unavailable in these results{': ' + reason if reason else ''}.")

sub = df[(df["arch"] == arch) & (df["loss"] == loss)].reset_index(drop=True)
datasets = sorted(sub["dataset"].unique())
if len(datasets) > 1:
    keep_valid("study.dataset", datasets)
    dataset = st.selectbox("Dataset", datasets, key="study.dataset")
    sub = sub[sub["dataset"] == dataset].reset_index(drop=True)
if sub.empty:
    st.info(f"No finished jobs for {arch} with the {loss} loss in this database.")
    st.stop()
proxies = proxy_names(sub, flavour)
st.subheader(f"{arch}, {loss_label(loss)} attack: {len(sub)} images")
fig, keys, dropped = scatter_panels(sub, proxies, flavour, score)
event = st.plotly_chart(fig, on_select="rerun", selection_mode=("points", "box", "lasso"), key="sel.study.scatter",
                        config={"displayModeBar": True, "displaylogo": False})
if dropped:
    st.caption(f"{dropped} points with a non-positive value are not drawn on the log axes (σ_S still counts them).")

st.markdown("**Inspect images**: click a point, or box/lasso-select several, to see the ground truth and the "
            "reconstruction (left, right).")
chosen = selected_keys(event, keys)
if not chosen:
    ids = sorted(int(i) for i in sub["image_index"])
    keep_valid("study.inspect", ids)
    pick = st.selectbox("…or pick an image", ids, key="study.inspect")
    chosen = list(sub.loc[sub["image_index"] == pick, "job_key"])
show_images(path, sub[sub["job_key"].isin(chosen)].head(MAX_SHOWN))

st.subheader(f"Table 1: Spearman's σ_S, {FLAVOUR_LABELS[flavour]}")
st.caption("Rows: dataset + attack loss; cells: σ_S averaged over the architectures, MSE / SSIM / PSNR / LPIPS "
           "(n/a where undefined). A positive σ_S with MSE means a larger proxy predicts a worse reconstruction.")
try:
    t1 = table1(df, flavour)
    t3 = table3(df, flavour)
except LavpError as exc:
    show_error(exc)
    st.stop()
st.dataframe(t1)
st.markdown("**Table 3**: gradient norm against the loss-agnostic fusion √(l2_max · cos_min)")
st.dataframe(t3)

columns = ["image_index", "image_description", "dataset", "arch", "loss", "mse", "psnr", "ssim", "lpips"]
columns = [c for c in columns if c in sub] + [proxy_column(p, flavour) for p in proxies]
d1, d2 = st.columns(2)
d1.download_button("Download these points (CSV)", sub[columns].to_csv(index=False).encode(),
                   file_name=f"study-{arch}-{loss}-{flavour}.csv", mime="text/csv", key="btn.study.points",
                   icon=":material/download:")
d2.download_button("Download Table 1 (CSV)", t1.reset_index().to_csv(index=False).encode(),
                   file_name=f"table1-{flavour}.csv", mime="text/csv", key="btn.study.table1",
                   icon=":material/download:")
