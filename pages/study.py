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
from lavp_core.metrics import RECOVERED_SSIM
from lavp_core.proxies import proxy_key
from lavp_core.study import check_one_configuration, findings, proxy_column, proxy_names, spearman_table, table1, table3
from lavp_core.study.analysis import MEAN_ARCH, beats, loss_label, recovery_table, regime_notice
from lavp_ui.formatting import fmt, log_axis, loss_name, png_array, show_error
from lavp_ui.routing import draw_through_app
from lavp_ui.sidebar import keep_valid
from lavp_ui.study_access import (
    database_picker,
    model_state,
    pick_study,
    read_study,
    show_study_progress,
    snapshot_epoch,
    study_images,
    study_label,
)

draw_through_app()  # first: a direct visit on a fresh server runs this file alone

SCORE_LABELS = {"mse": "MSE (↓)", "rel_mse": "relative MSE (↓)", "psnr": "PSNR (↑)", "ssim": "SSIM (↑)",
                "lpips": "LPIPS (↓)"}
LOG_SCORES = {"mse", "rel_mse", "lpips"}  # spread over decades; SSIM and PSNR stay linear (SSIM can be ≤ 0)
LOWER_IS_BETTER = {"mse", "rel_mse", "lpips"}
FLAVOUR_LABELS = {"exact": "exact eigenvalues", "paper": "paper recipe"}
LOSSES = ("l2", "cos")
MAX_SHOWN = 6


@st.cache_data(max_entries=16, show_spinner="Computing σ_S and their bootstrap intervals…")
def sigma_table(df: pd.DataFrame, flavour: str) -> pd.DataFrame:
    """σ_S of every proxy with every score per (dataset, weights, loss, arch) and over architectures."""
    return spearman_table(df, flavour)


def interval_text(row) -> str:
    """'+0.45 [+0.30, +0.60], n = 100' for a row of :func:`spearman_table` (n/a when undefined)."""
    if row is None or math.isnan(row.rho):
        return "σ_S n/a" + ("" if row is None else f" (n = {row.n})")
    ci = "" if math.isnan(row.ci_low) else f" [{row.ci_low:+.2f}, {row.ci_high:+.2f}]"
    return f"σ_S = {row.rho:+.2f}{ci} (n = {row.n})"


def relation_sentence(row, proxy: str, score: str, loss: str) -> str:
    """What σ_S says about the proxy and the reconstruction, computed from its sign and its interval."""
    attack = f"the {loss_name(loss)} attack"
    if row is None or math.isnan(row.rho):
        return f"{attack}: σ_S is undefined (too few images, or a constant column)."
    worse = row.rho > 0 if score in LOWER_IS_BETTER else row.rho < 0
    direction = "a worse" if worse else "a better"
    ci_known = not math.isnan(row.ci_low)
    clear = ci_known and (row.ci_low > 0 or row.ci_high < 0)
    if not clear:
        return (f"{attack}: no clear relation between {proxy} and {score} ({interval_text(row)}; the interval "
                f"includes 0)." if ci_known else f"{attack}: {interval_text(row)}, without an interval.")
    paper = " (the direction the paper claims)" if worse else " (against the paper's claim)"
    return (f"{attack}: a larger {proxy} comes with {direction} reconstruction ({interval_text(row)}, the "
            f"interval excludes 0){paper}.")


def fit_line(x: np.ndarray, y: np.ndarray, log_y: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """Least-squares line of log10(y) (or y) on log10(x), drawn over the range of x; None under 3 points."""
    if x.size < 3 or np.all(x == x[0]):
        return None
    lx = np.log10(x)
    slope, intercept = np.polyfit(lx, np.log10(y) if log_y else y, 1)
    grid = np.linspace(lx.min(), lx.max(), 50)
    line = slope * grid + intercept
    return 10 ** grid, (10 ** line if log_y else line)


def scatter_panels(sub: pd.DataFrame, proxy: str, flavour: str, score: str, sigma: dict):
    """The L2 and the cosine panel side by side: proxy (x, log) against the score (y: log for MSE-like
    scores, linear for SSIM and PSNR), a fitted trend line, σ_S with its 95 % interval in each title.

    Returns (figure, job keys per scatter trace, points left out of the log axes)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    log_y = score in LOG_SCORES
    losses = [loss for loss in LOSSES if loss in set(sub["loss"])] or sorted(set(sub["loss"]))
    titles = [f"{loss_name(loss)} attack: {interval_text(sigma.get(loss))}" for loss in losses]
    fig = make_subplots(rows=1, cols=len(losses), subplot_titles=titles, horizontal_spacing=0.1)
    keys, dropped, lines = [], 0, []
    for col, loss in enumerate(losses, start=1):
        part = sub[sub["loss"] == loss]
        x = part[proxy_column(proxy, flavour)].to_numpy(float)
        y = part[score].to_numpy(float)
        finite = np.isfinite(x) & np.isfinite(y)
        keep = finite & (x > 0) & ((y > 0) if log_y else True)
        dropped += int((finite & ~keep).sum())
        part, x, y = part[keep], x[keep], y[keep]
        custom = np.stack([part["image_index"].astype(int).astype(str).to_numpy(),
                           part.get("image_description", pd.Series("", index=part.index)).fillna("").to_numpy(),
                           part["job_key"].to_numpy()], axis=1) if len(part) else np.empty((0, 3))
        keys.append(list(part["job_key"]))
        recovered = part["ssim"].to_numpy(float) >= RECOVERED_SSIM if "ssim" in part else np.zeros(len(part), bool)
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="markers", name=f"{loss_name(loss)} attack", customdata=custom,
            marker={"size": 8, "opacity": 0.8, "color": np.where(recovered, "#2ca02c", "#1f77b4"),
                    "symbol": np.where(recovered, "circle", "circle-open")},
            hovertemplate=(f"image #%{{customdata[0]}}<br>%{{customdata[1]}}<br>{proxy} = %{{x:.3e}}<br>"
                           f"{score} = %{{y:.4g}}<extra></extra>")), row=1, col=col)
        lines.append((col, fit_line(x, y, log_y)))
        log_axis(fig, "x", x, row=1, col=col, title=f"{proxy} (log)")
        if log_y:
            log_axis(fig, "y", y, row=1, col=col, title=f"{SCORE_LABELS[score]} (log)" if col == 1 else None)
        else:
            fig.update_yaxes(type="linear", title_text=SCORE_LABELS[score] if col == 1 else None, row=1, col=col)
    for col, line in lines:  # after the scatter traces: a selection's curve number indexes ``keys``
        if line is not None:
            fig.add_trace(go.Scatter(x=line[0], y=line[1], mode="lines", name="trend (least squares, log-log)",
                                     line={"color": "#d62728", "dash": "dash"}, hoverinfo="skip"), row=1, col=col)
    fig.update_layout(height=400, showlegend=False, margin={"l": 10, "r": 10, "t": 50, "b": 10},
                      clickmode="event+select")
    return fig, keys, dropped


def training_figure(df: pd.DataFrame, proxies: list[str], flavour: str, score: str):
    """Median (and interquartile range over the images) of each proxy and of the score against the training
    epoch of the snapshot (``weights`` = trained@E); the score once per attack loss."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    df = df.assign(epoch=[snapshot_epoch(w) for w in df["weights"]])
    epochs = sorted(int(e) for e in df["epoch"].dropna().unique())
    panels = [*proxies, score]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[*proxies, SCORE_LABELS[score]],
                        horizontal_spacing=0.07, vertical_spacing=0.2)
    unique = df.drop_duplicates(["image_index", "weights", "arch"])  # proxies do not depend on the attack loss
    for i, name in enumerate(panels):
        r, c = i // cols + 1, i % cols + 1
        series = ([(name, unique, proxy_column(name, flavour))] if name != score
                  else [(f"{loss_name(loss)} attack", df[df["loss"] == loss], score) for loss in LOSSES])
        drawn = []
        for label, frame, column in series:
            grouped = frame.groupby("epoch")[column]
            med, q1, q3 = grouped.median(), grouped.quantile(0.25), grouped.quantile(0.75)
            fig.add_trace(go.Scatter(x=list(med.index), y=med.tolist(), mode="lines+markers", name=label,
                                     error_y={"type": "data", "symmetric": False,
                                              "array": (q3 - med).tolist(), "arrayminus": (med - q1).tolist()},
                                     showlegend=name == score),
                          row=r, col=c)
            drawn.extend(frame[column].to_numpy(float))
        fig.update_xaxes(title_text="epoch", tickmode="array", tickvals=epochs, row=r, col=c)
        if name != score or score in LOG_SCORES:
            log_axis(fig, "y", drawn, row=r, col=c)
        else:
            fig.update_yaxes(type="linear", row=r, col=c)
    fig.update_layout(height=300 * rows, margin={"l": 10, "r": 10, "t": 50, "b": 10})
    return fig


def page_findings(table: pd.DataFrame, recovery: pd.DataFrame, flavour: str, weights: str) -> list[str]:
    """:func:`findings` for one model state and flavour, with the app's labels of the attack losses."""
    part = table[(table["flavour"] == flavour) & (table["weights"] == weights)]
    lines = findings(part, recovery)
    out = []
    for line in lines:
        for loss in LOSSES:
            line = line.replace(f"+{loss_label(loss)} ", f", {loss_name(loss)} attack ", 1)
        out.append(line)
    return out


def fmt_rho(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.2f}"


def verdicts(table: pd.DataFrame, flavour: str, weights: str) -> list[str]:
    """One line per attack loss: does that loss's own LAVP beat the gradient norm in the paper's sense
    (:func:`beats`: σ_S with MSE positive and above grad_norm's), computed from the table."""
    mean = table[(table["flavour"] == flavour) & (table["weights"] == weights) & (table["arch"] == MEAN_ARCH)
                 & (table["score"] == "mse")]
    rho = {(r.loss, r.proxy): r for r in mean.itertuples()}
    out = []
    for loss in LOSSES:
        base = rho.get((loss, "grad_norm"))
        own = [rho.get((loss, proxy_key(loss, e))) for e in ("max", "min")]
        own = [r for r in own if r is not None]
        if base is None or not own:
            continue
        winners = [r for r in own if beats(r.rho, base.rho)]
        values = ", ".join(f"{r.proxy} {fmt_rho(r.rho)}" for r in own) + f"; grad_norm {fmt_rho(base.rho)}"
        if math.isnan(base.rho) or all(math.isnan(r.rho) for r in own):
            out.append(f"**{loss_name(loss)} attack**: σ_S is undefined here ({values}): too few images, or a "
                       f"constant column.")
        elif winners:
            firm = [r.proxy for r in winners if not math.isnan(r.ci_low) and r.ci_low > 0]
            out.append(f"**{loss_name(loss)} attack**: {', '.join(r.proxy for r in winners)} beat"
                       f"{'s' if len(winners) == 1 else ''} the gradient "
                       f"norm in the paper's sense (σ_S with MSE: {values})"
                       + (f"; the interval of {', '.join(firm)} excludes 0." if firm
                          else "; but no interval of them excludes 0."))
        else:
            out.append(f"**{loss_name(loss)} attack**: the {loss_name(loss)} LAVP does not track the "
                       f"reconstruction error in the paper's sense here (σ_S with MSE: {values}; the paper "
                       f"claims a positive σ_S, larger than the gradient norm's).")
    return out


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
st.info("This page reads a study database: it does not use the sidebar's image or model.", icon=":material/info:")
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
st.markdown(f"**{study_label(path)}** · model state: {model_state(df)}.")

flavours = [f for f in ("exact", "paper") if proxy_names(df, f)]
if not flavours:
    st.error(f"{path} holds no proxy values; rerun the study with --flavours exact,paper")
    st.stop()
df = df.assign(weights=df["weights"].fillna("") if "weights" in df else "")
archs = sorted(df["arch"].unique())
states = sorted(df["weights"].unique(), key=lambda w: (snapshot_epoch(w) is None, snapshot_epoch(w) or 0, w))
scores = [s for s in ("mse", "ssim", "psnr", "rel_mse", "lpips") if s in df and df[s].notna().any()]
for key, options in (("study.arch", archs), ("study.score", scores), ("study.flavour", flavours),
                     ("study.weights", states)):
    keep_valid(key, options)
c1, c2, c3, c4 = st.columns(4)
arch = c1.selectbox("Study architecture", archs, key="study.arch")
flavour = c4.radio("Proxy values", flavours, key="study.flavour", format_func=FLAVOUR_LABELS.get,
                   help="exact: certified eigenvalues; paper recipe: finite differences + power iteration")
proxies = proxy_names(df, flavour)
keep_valid("study.proxy", proxies)
if "l2_max" in proxies:
    st.session_state.setdefault("study.proxy", "l2_max")
proxy = c2.selectbox("Proxy", proxies, key="study.proxy")
score = c3.selectbox("Similarity score", scores, key="study.score", format_func=SCORE_LABELS.get)
weights = states[0]
if len(states) > 1:
    weights = st.selectbox("Study model state", states, key="study.weights",
                           help="the scatter plots and their σ_S are over one model state's images")
if "lpips" in df and df["lpips"].isna().all():
    reason = next((r for r in df.get("lpips_reason", pd.Series(dtype=object)).dropna() if r), "")
    st.caption(f"LPIPS is unavailable in these results{': ' + reason if reason else ''}.")

sub = df[(df["arch"] == arch) & (df["weights"] == weights)].reset_index(drop=True)
datasets = sorted(sub["dataset"].unique())
if len(datasets) > 1:
    keep_valid("study.dataset", datasets)
    dataset = st.selectbox("Study dataset", datasets, key="study.dataset")
    sub = sub[sub["dataset"] == dataset].reset_index(drop=True)
if sub.empty:
    st.info(f"No finished jobs for {arch} ({weights}) in this database.")
    st.stop()
dataset = sub["dataset"].iloc[0]
try:
    table = sigma_table(df, flavour)
except LavpError as exc:
    show_error(exc)
    st.stop()
recovery = recovery_table(df)

st.subheader(f"{proxy} against {score}: {arch}{f', {weights}' if len(states) > 1 else ''}, "
             f"{sub['image_index'].nunique()} images")
mine = table[(table["dataset"] == dataset) & (table["weights"] == weights) & (table["arch"] == arch)
             & (table["proxy"] == proxy) & (table["score"] == score)]
sigma = {r.loss: r for r in mine.itertuples()}
regime = recovery[(recovery["dataset"] == dataset) & (recovery["weights"] == weights) & (recovery["arch"] == arch)]
for r in regime.itertuples():
    notice = regime_notice(r.recovered)
    if notice:
        st.warning(f"{loss_name(r.loss)} attack on {arch}: {notice[0].upper() + notice[1:]}.",
                   icon=":material/warning:")
st.caption(" · ".join(f"{loss_name(r.loss)} attack: {r.recovered:.0%} of {r.n} images recovered (SSIM ≥ "
                      f"{RECOVERED_SSIM}), median SSIM {fmt(r.median_ssim, 2)}, median PSNR {fmt(r.median_psnr, 3)} dB"
                      for r in regime.itertuples())
           + " · filled green points: recovered; red dashes: least-squares trend on these axes")
fig, keys, dropped = scatter_panels(sub, proxy, flavour, score, sigma)
event = st.plotly_chart(fig, on_select="rerun", selection_mode=("points", "box", "lasso"), key="sel.study.scatter",
                        config={"displayModeBar": True, "displaylogo": False})
if dropped:
    st.caption(f"{dropped} points with a non-positive value are not drawn on the log axes (σ_S still counts them).")
excluded = max((int(r.excluded) for r in sigma.values()), default=0)
if excluded:
    st.caption(f"σ_S leaves out up to {excluded} uncertified exact values (λ_min below float64's resolution); "
               f"the plot draws them.")
st.markdown("**What these panels say** (computed from σ_S and its 95 % bootstrap interval):")
st.markdown("\n".join(f"- {relation_sentence(sigma.get(loss), proxy, score, loss)}" for loss in LOSSES
                      if loss in set(sub["loss"])))

st.markdown("**Inspect images**: click a point, or box/lasso-select several, to see the ground truth and the "
            "reconstruction (left, right).")
chosen = selected_keys(event, keys)
if not chosen:
    ids = sorted(int(i) for i in sub["image_index"].unique())
    keep_valid("study.inspect", ids)
    pick = st.selectbox("…or pick an image", ids, key="study.inspect")
    chosen = list(sub.loc[sub["image_index"] == pick, "job_key"])
show_images(path, sub[sub["job_key"].isin(chosen)].head(MAX_SHOWN))

epochs = [snapshot_epoch(w) for w in states]
if len(states) > 1 and all(e is not None for e in epochs):
    st.subheader(f"Across training: {arch}")
    st.caption("Each proxy and the reconstruction score against the epoch of the snapshot: median over the images, "
               "bars from the first to the third quartile.")
    trained = df[(df["arch"] == arch) & (df["dataset"] == dataset)]
    st.plotly_chart(training_figure(trained, proxies, flavour, score), key="study.training",
                    config={"displayModeBar": False})
    rec = recovery[(recovery["arch"] == arch) & (recovery["dataset"] == dataset)]
    st.caption("Recovered (SSIM ≥ 0.5) per snapshot: " + "; ".join(
        f"{r.weights} {loss_name(r.loss)} {r.recovered:.0%}" for r in rec.sort_values(
            "weights", key=lambda s: s.map(snapshot_epoch)).itertuples()))

st.subheader(f"Does the loss's own LAVP beat the gradient norm? ({FLAVOUR_LABELS[flavour]})")
st.markdown("The paper claims: each loss's LAVP has a positive σ_S with MSE (larger proxy, worse reconstruction), "
            "larger than the gradient norm's. What this study's data says, σ_S averaged over the architectures:")
for line in verdicts(table, flavour, weights):
    st.markdown(f"- {line}")
for r in recovery[(recovery["weights"] == weights) & (recovery["arch"] == MEAN_ARCH)].itertuples():
    notice = regime_notice(r.recovered)
    if notice:
        st.warning(f"{loss_name(r.loss)} attack ({weights or 'this study'}): {notice}; these correlations are not "
                   f"evidence for or against the paper's claim, which is about which images leak.",
                   icon=":material/warning:")
with st.expander("Every σ_S with MSE and its interval"):
    for line in page_findings(table, recovery, flavour, weights):
        st.markdown(f"- {line}")

st.subheader(f"Table 1: Spearman's σ_S, {FLAVOUR_LABELS[flavour]}")
st.caption("The paper's Table 1 layout (rows dataset + attack loss, L2 or CS = cosine); cells: σ_S averaged over "
           "the architectures, MSE / SSIM / PSNR / LPIPS (n/a where undefined). The paper claims a positive σ_S "
           "with MSE for LAVP; read each cell with the recovery notices above.")
try:
    t1 = table1(df, flavour, table=table)
    t3 = table3(df, flavour, table=table)
except LavpError as exc:
    show_error(exc)
    st.stop()
st.dataframe(t1)
st.markdown("**Table 3**: gradient norm against the loss-agnostic fusion √(l2_max · cos_min)")
st.dataframe(t3)

columns = ["image_index", "image_description", "dataset", "arch", "weights", "loss", "mse", "psnr", "ssim",
           "recovered", "lpips"]
columns = [c for c in columns if c in sub] + [proxy_column(p, flavour) for p in proxies]
d1, d2 = st.columns(2)
d1.download_button("Download these points (CSV)", sub[columns].to_csv(index=False).encode(),
                   file_name=f"study-{arch}-{weights or 'default'}-{flavour}.csv", mime="text/csv",
                   key="btn.study.points", icon=":material/download:")
d2.download_button("Download Table 1 (CSV)", t1.reset_index().to_csv(index=False).encode(),
                   file_name=f"table1-{flavour}.csv", mime="text/csv", key="btn.study.table1",
                   icon=":material/download:")
