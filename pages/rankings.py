"""Rankings: four images ranked by MSE under the L2 and the cosine attack, and which proxy predicts each
ranking (the paper's Figure 1b/1c).

Results come from a study database when it holds the chosen images; otherwise the app runs the eight
attacks (and the proxies) itself, in the background, through the same study pipeline, into a scratch
database (so they are computed once).
"""

from __future__ import annotations

import math
import re

import pandas as pd
import streamlit as st

from lavp_core.errors import LavpError
from lavp_core.metrics import RECOVERED_SSIM
from lavp_core.proxies import proxy_key, proxy_title
from lavp_core.study import StudyConfig, kendall, pick_disagreeing_images, proxy_names, rankings
from lavp_core.study.analysis import loss_label, recovery_table, regime_notice
from lavp_ui.formatting import fmt, loss_name, png_array, show_error, show_job_error
from lavp_ui.routing import draw_through_app
from lavp_ui.serving import limits, queue_text
from lavp_ui.sidebar import current_config, dataset_table, keep_valid
from lavp_ui.study_access import (
    database_picker,
    pick_study,
    read_study,
    scratch_db,
    show_study_progress,
    snapshot_epoch,
    study_images,
    study_label,
)
from lavp_ui.tasks import live_area, new_attacks_known, new_attacks_task

draw_through_app()  # first: a direct visit on a fresh server runs this file alone

LETTERS = "ABCDEFGH"
LOSSES = ("l2", "cos")
COUNT = 4
# New attacks: (steps, restarts) of the lavp-paper preset (Adam, constant lr 0.1). On the random-weight lenet
# the budget runs (benchmarks/results/budget-lenet-random.jsonl, 8 photos, best of 3) recovered 2 of 8 cosine
# attacks at 2,000 steps and 3 of 8 at 3,000; at 300 steps almost none is recovered.
BUDGETS = {"reconstructs": (2500, 3), "quick": (300, 1)}
BUDGET_LABELS = {"reconstructs": "2,500 steps, best of 3 starts (reconstructs on random weights; minutes)",
                 "quick": "300 steps, 1 start (quick look; the attacks mostly fail)"}


def letter_ranking(text: str, letters: dict[int, str]) -> str:
    """'12 > 5 > 3 (missing: 7)' -> 'B > A > C (missing: D)' with the images' letters."""
    return re.sub(r"\d+", lambda m: letters.get(int(m.group()), m.group()), text)


def recovered_images(df: pd.DataFrame) -> pd.Series:
    """Per image index: whether an attack (either loss) recovered it (SSIM ≥ RECOVERED_SSIM)."""
    flags = df["recovered"] if "recovered" in df else df["ssim"] >= RECOVERED_SSIM
    return flags.groupby(df["image_index"]).any()


def default_images(sub: pd.DataFrame, arch: str, flavour: str) -> list[int]:
    """:func:`pick_disagreeing_images`, then, when its picks are all recovered or all not while the study
    has both kinds, one pick swapped for an image of the other kind (the swap keeping the L2 and cosine
    rankings most in disagreement), so the reconstructions shown visibly differ."""
    picked = pick_disagreeing_images(sub, arch, count=COUNT, flavour=flavour)
    mse = sub.pivot_table(index="image_index", columns="loss", values="mse", aggfunc="first")
    if len(picked) < COUNT or not set(LOSSES) <= set(mse.columns):
        return picked
    mse = mse[list(LOSSES)].dropna()
    recovered = recovered_images(sub).reindex(mse.index).fillna(False).astype(bool)
    kinds = set(recovered.loc[picked])
    if len(kinds) > 1 or len(set(recovered)) < 2:
        return picked
    others = [int(i) for i in mse.index if recovered.loc[i] != next(iter(kinds)) and int(i) not in picked]
    best, best_tau = picked, math.inf
    for position in range(COUNT):
        for candidate in others:
            trial = [*picked[:position], candidate, *picked[position + 1:]]
            tau, _, _ = kendall(mse.loc[trial, "l2"].to_numpy(float), mse.loc[trial, "cos"].to_numpy(float))
            tau = 1.0 if math.isnan(tau) else tau
            if tau < best_tau:
                best, best_tau = trial, tau
    return sorted(best)


def show_regime(df: pd.DataFrame, arch: str, images: list[int]) -> None:
    """A warning per attack loss whose attacks mostly failed in the study (:func:`regime_notice`), and how
    many of the shown images each attack recovered."""
    recovery = recovery_table(df[df["arch"] == arch])
    for r in recovery[recovery["arch"] == arch].itertuples():
        notice = regime_notice(r.recovered)
        if notice:
            orders = ("failed reconstructions" if r.regime == "failed"
                      else "recovered images by how exactly each was rebuilt")
            st.warning(f"{loss_name(r.loss)} attack on {arch}: {notice}; its ranking orders {orders}.",
                       icon=":material/warning:")
    shown = df[(df["arch"] == arch) & df["image_index"].isin(images)]
    flags = shown["recovered"] if "recovered" in shown else shown["ssim"] >= RECOVERED_SSIM
    counts = flags.groupby(shown["loss"]).agg(["sum", "count"])
    st.caption("Recovered among these images (SSIM ≥ 0.5): " + ", ".join(
        f"{loss_name(loss)} attack {int(counts.loc[loss, 'sum'])} of {int(counts.loc[loss, 'count'])}"
        for loss in LOSSES if loss in counts.index))


def ranking_sentences(table: pd.DataFrame, df: pd.DataFrame, images: list[int], arch: str) -> list[str]:
    """What the rankings on screen say, computed from them: whether the two attacks agree, and per attack the
    proxy whose ranking follows it best, against the gradient norm (Kendall's τ with its p-value)."""
    lines = []
    sub = df[(df["arch"] == arch) & df["image_index"].isin(images)]
    mse = sub.pivot_table(index="image_index", columns="loss", values="mse", aggfunc="first").reindex(images)
    if set(LOSSES) <= set(mse.columns):
        tau, p, n = kendall(mse["l2"].to_numpy(float), mse["cos"].to_numpy(float))
        if math.isnan(tau):
            lines.append("The two attacks' rankings cannot be compared here (missing or tied MSE).")
        elif tau >= 1 - 1e-9:
            lines.append(f"Here the L2 and the cosine attack rank these {n} images the same way (τ = {tau:.2f}).")
        else:
            lines.append(f"Here the L2 and the cosine attack rank these {n} images differently (Kendall's τ "
                         f"between their MSEs = {tau:+.2f}).")
    predicted = table[table["kind"] == "predicted"]
    for loss in LOSSES:
        column = f"tau_{loss}"
        if column not in predicted:
            continue
        ranked = predicted.dropna(subset=[column]).sort_values(column, ascending=False, kind="stable")
        base = predicted.loc[predicted["name"] == "grad_norm", column]
        base = float(base.iloc[0]) if len(base) else math.nan
        own = [proxy_key(loss, e) for e in ("max", "min")]
        own_taus = predicted[predicted["name"].isin(own)].set_index("name")[column]
        attack = f"{loss_name(loss)} attack"
        if ranked.empty:
            lines.append(f"{attack}: no proxy's τ is defined here.")
            continue
        top = ranked.iloc[0]
        p = top.get(f"p_{loss}", math.nan)
        significance = (f"p = {fmt(p, 2)}" + (", not significant" if not (p < 0.05) else "")) if p == p else ""
        if top[column] <= 0:
            lines.append(f"{attack}: no proxy ranks these images as the attack does (best τ = {top[column]:+.2f}, "
                         f"{top['name']}).")
            continue
        own_text = ", ".join(f"{name} τ = {fmt(value, 2)}" for name, value in own_taus.items())
        better = [name for name, value in own_taus.items() if value == value and value > base]
        if better:
            verdict = f"{', '.join(better)} rank{'s' if len(better) == 1 else ''} closer than the gradient norm."
        else:
            verdict = "the gradient norm ranks at least as close as this loss's LAVP."
        lines.append(f"{attack}: the closest ranking is {top['name']}'s (τ = {top[column]:+.2f}"
                     + (f", {significance}" if significance else "")
                     + f"); {own_text}; gradient norm τ = {fmt(base, 2)}: {verdict}")
    return lines


def render_rankings(df: pd.DataFrame, images: list[int], arch: str, flavour: str, source: str, path: str | None):
    """Both MSE rankings side by side with the images, then each proxy's predicted ranking."""
    letters = {index: LETTERS[i] for i, index in enumerate(images)}
    try:
        table = rankings(df, images, proxy_flavour=flavour, arch=arch)
    except LavpError as exc:
        show_error(exc, "Pick other images, or run the attacks for them.")
        return
    st.caption("Letters: " + ", ".join(f"**{letters[i]}** = image #{i}" for i in images) + f" · results {source}")
    show_regime(df, arch, images)
    observed = table[table["kind"] == "observed"]
    columns = st.columns(len(LOSSES))
    for col, loss in zip(columns, LOSSES):
        rows = df[(df["loss"] == loss) & (df["arch"] == arch) & df["image_index"].isin(images)]
        rows = rows.drop_duplicates("image_index").sort_values("mse", ascending=False, na_position="last")
        match = observed[observed["name"] == f"MSE ({loss_label(loss)})"]
        ranking = letter_ranking(match["ranking"].iloc[0], letters) if len(match) else "n/a"
        with col:
            st.markdown(f"#### {loss_name(loss)[0].upper() + loss_name(loss)[1:]} attack: {ranking}")
            st.caption("largest MSE (worst reconstruction) first; each card: ground truth, reconstruction")
            cards = st.columns(COUNT)
            for card, row in zip(cards, rows.itertuples()):
                images_png = study_images(path, row.job_key) if path else (None, None)
                recon, truth = images_png
                shown = [png_array(p) for p in (truth, recon) if p is not None]
                if shown:
                    card.image(shown, output_format="PNG")
                recovered = row.ssim >= RECOVERED_SSIM if row.ssim == row.ssim else False
                card.markdown(f"**{letters[int(row.image_index)]}** · #{int(row.image_index)}  \n"
                              f"MSE {fmt(row.mse, 3)} · SSIM {fmt(row.ssim, 2)}  \n"
                              + ("recovered" if recovered else "not recovered"))
    st.subheader("Which proxy predicts which ranking")
    st.caption("Each proxy ranks the images largest value first (the paper claims a larger proxy means a worse "
               "reconstruction). τ: Kendall's τ with the MSE under that attack; 1 means the same ranking, "
               "−1 the reverse.")
    predicted = table[table["kind"] == "predicted"].copy()
    out = pd.DataFrame({
        "proxy": predicted["name"],
        "meaning": [proxy_title(n) for n in predicted["name"]],
        "predicted ranking": [letter_ranking(r, letters) for r in predicted["ranking"]],
    })
    for loss in LOSSES:
        column = f"tau_{loss}"
        if column in predicted:
            out[f"τ vs {loss_name(loss)} MSE"] = [fmt(v, 2) for v in predicted[column]]
            out[f"matches {loss_name(loss)}"] = ["✓" if (isinstance(v, float) and not math.isnan(v)
                                                       and v >= 1 - 1e-9) else "" for v in predicted[column]]
    st.dataframe(out, hide_index=True)
    st.markdown("**What these rankings say** (computed from the τ above; with four images τ takes few values and "
                "is never significant on its own):")
    for line in ranking_sentences(table, df, images, arch):
        st.markdown(f"- {line}")


# --------------------------------------------------------------------------------------------
# Page

st.title("Rankings")
st.caption("The paper claims: which of four images is most vulnerable depends on the attack's matching loss "
           "(its Figure 1b), and each loss's LAVP predicts that loss's ranking while the gradient norm cannot "
           "(Figure 1c). Below, the same comparison on a study's images, with what the data says.")

path = database_picker("rankings")
df = None
if path is not None:
    try:
        df = read_study(path, pick_study(path, "rankings"))
    except LavpError as exc:
        show_error(exc, "Results will come from new attacks instead.")
        df = None
    else:
        show_study_progress(path)
usable = df is not None and not df.empty and set(LOSSES) <= set(df["loss"])

config = current_config()
sources = (["database"] if usable else []) + ["new attacks"]
keep_valid("rankings.mode", sources)
mode = st.radio("Results from", sources, horizontal=True, key="rankings.mode",
                format_func={"database": "the study database", "new attacks": "new attacks (run here)"}.get)

if mode == "database":
    st.caption(f"Results from {study_label(path)}: this mode does not use the sidebar's image or model.")
    df = df.assign(weights=df["weights"].fillna("") if "weights" in df else "")
    flavours = [f for f in ("exact", "paper") if proxy_names(df, f)]
    archs = sorted(df["arch"].unique())
    states = sorted(df["weights"].unique(), key=lambda w: (snapshot_epoch(w) is None, snapshot_epoch(w) or 0, w))
    keep_valid("rankings.arch", archs)
    keep_valid("rankings.flavour", flavours)
    keep_valid("rankings.weights", states)
    c1, c2, c3 = st.columns(3)
    arch = c1.selectbox("Study architecture", archs, key="rankings.arch")
    weights = c2.selectbox("Study model state", states, key="rankings.weights") if len(states) > 1 else states[0]
    flavour = c3.radio("Proxy values", flavours, key="rankings.flavour", horizontal=True)
    sub = df[(df["arch"] == arch) & (df["weights"] == weights)]
    both = sorted(set(sub[sub["loss"] == "l2"]["image_index"]) & set(sub[sub["loss"] == "cos"]["image_index"]))
    if len(both) < 2:
        st.info(f"The database has fewer than two images attacked with both losses on {arch}.")
        st.stop()
    if len(both) < COUNT:
        st.info(f"This study has only {len(both)} images attacked with both losses on {arch} so far (it is "
                f"partial): the rankings use those {len(both)}.")
    default = default_images(sub, arch, flavour)
    chosen_key = f"rankings.images.{arch}.{weights}.{flavour}"
    st.session_state.setdefault(chosen_key, default)
    if any(i not in both for i in st.session_state[chosen_key]):
        st.session_state[chosen_key] = default
    images = st.multiselect(f"Images (up to {COUNT}; the default: rankings that disagree, recovered and "
                            f"unrecovered images mixed)", both, key=chosen_key, max_selections=COUNT)
    if len(images) < 2:
        st.info("Pick at least two images.")
        st.stop()
    render_rankings(sub, sorted(images), arch, flavour, f"from {study_label(path)}", path)
else:
    if config is None or config.image is not None:
        st.info("New attacks need dataset images: choose a bundled dataset in the sidebar (its architecture, "
                "weights and seed are used).")
        st.stop()
    st.caption(f"New attacks use the sidebar's dataset and model: {config.dataset}, {config.arch}, "
               f"{config.weights} weights, seed {config.seed}.")
    table = dataset_table(config.dataset)
    st.session_state.setdefault("rankings.new_images", list(range(COUNT)))
    images = st.multiselect(f"Images of {config.dataset} (up to {COUNT})", list(range(len(table))),
                            key="rankings.new_images", max_selections=COUNT,
                            format_func=lambda i: f"#{i} ({table.class_names[table.labels[i]]})")
    allowed = limits()
    budgets = [b for b, (s, r) in BUDGETS.items() if s <= allowed.max_steps and s * r <= allowed.max_work
               and r <= allowed.max_restarts] or ["quick"]
    keep_valid("rankings.budget", budgets)
    budget = st.radio("Attack budget (lavp-paper: Adam, constant lr 0.1)", budgets, key="rankings.budget",
                      format_func=BUDGET_LABELS.get)
    steps, restarts = BUDGETS[budget]
    exact = st.toggle("Exact proxies too (20–60 s more per image on 2 cores)", key="rankings.exact")
    if len(images) < 2:
        st.info("Pick at least two images.")
        st.stop()
    study = StudyConfig(name="app-rankings", dataset=config.dataset, images=tuple(sorted(int(i) for i in images)),
                        archs=(config.arch,), weights=config.weights, seed=config.seed, losses=LOSSES,
                        steps=steps, restarts=restarts, flavours=("exact", "paper") if exact else ("paper",))
    flavour = "exact" if exact else "paper"
    db = str(scratch_db())
    task = new_attacks_known(study, db)
    running = task is not None and not task.finished
    b1, b2, _ = st.columns([2, 1, 5])
    b1.button(f"Run the {len(images) * len(LOSSES)} attacks", type="primary", icon=":material/play_arrow:",
              key="btn.rankings.run", disabled=running, on_click=new_attacks_task, args=(study, db),
              help=f"lavp-paper preset (constant lr), {steps} steps, best of {restarts}, on {config.arch}; "
                   f"finished attacks are kept, so a rerun only does what is missing")
    b2.button("Stop", icon=":material/stop:", key="btn.rankings.stop", disabled=not running,
              on_click=(task.stop if task is not None else None))
    task = new_attacks_known(study, db)
    if task is None:
        per_attack = "about 1–3 minutes" if budget == "reconstructs" else "about 10–20 s"
        st.caption(f"Runs the lavp-paper attack ({steps:,} steps, constant lr, best of {restarts}) with both losses "
                   f"on each image, scores it and computes its proxies: {per_attack} per attack on 2 cores. "
                   f"On a random-weight lenet this budget recovers some images (about 2–3 in 8 cosine attacks "
                   f"in the budget runs at 2,000–3,000 steps); on trained weights the attacks mostly fail."
                   if budget == "reconstructs" else
                   f"Runs the lavp-paper attack ({steps} steps, 1 start) with both losses on each image, scores "
                   f"it and computes its proxies: {per_attack} per attack on 2 cores. At this budget the "
                   f"attacks mostly fail, so the rankings order failed reconstructions.")
    else:
        def render() -> None:
            view = task.view()
            if view.running and view.queue_position:
                st.progress(0.0, text=queue_text(view.queue_position))
            elif view.running:
                st.progress(view.progress, text=f"{view.message} · {view.elapsed:.0f} s")
            elif view.error is not None:
                show_job_error(view.error)
            elif view.result is not None and not view.result.empty:
                if view.state == "cancelled":
                    st.warning("Stopped: showing the attacks that finished. Run again to complete them.")
                render_rankings(view.result, sorted(int(i) for i in images), config.arch, flavour,
                                "from new attacks", db)

        live_area(render, lambda: not task.finished)
