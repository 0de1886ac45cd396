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
from lavp_core.proxies import proxy_title
from lavp_core.study import StudyConfig, loss_label, pick_disagreeing_images, proxy_names, rankings
from lavp_ui.formatting import fmt, png_array, show_error, show_job_error
from lavp_ui.routing import draw_through_app
from lavp_ui.serving import queue_text
from lavp_ui.sidebar import current_config, dataset_table, keep_valid
from lavp_ui.study_access import database_picker, pick_study, read_study, scratch_db, show_study_progress, study_images
from lavp_ui.tasks import live_area, new_attacks_known, new_attacks_task

draw_through_app()  # first: a direct visit on a fresh server runs this file alone

LETTERS = "ABCDEFGH"
LOSSES = ("l2", "cos")
COUNT = 4
NEW_STEPS, NEW_RESTARTS = 300, 1


def letter_ranking(text: str, letters: dict[int, str]) -> str:
    """'12 > 5 > 3 (missing: 7)' -> 'B > A > C (missing: D)' with the images' letters."""
    return re.sub(r"\d+", lambda m: letters.get(int(m.group()), m.group()), text)


def render_rankings(df: pd.DataFrame, images: list[int], arch: str, flavour: str, source: str, path: str | None):
    """Both MSE rankings side by side with the images, then each proxy's predicted ranking."""
    letters = {index: LETTERS[i] for i, index in enumerate(images)}
    try:
        table = rankings(df, images, proxy_flavour=flavour, arch=arch)
    except LavpError as exc:
        show_error(exc, "Pick other images, or run the attacks for them.")
        return
    st.caption("Letters: " + ", ".join(f"**{letters[i]}** = image #{i}" for i in images) + f" · results {source}")
    observed = table[table["kind"] == "observed"]
    columns = st.columns(len(LOSSES))
    for col, loss in zip(columns, LOSSES):
        rows = df[(df["loss"] == loss) & (df["arch"] == arch) & df["image_index"].isin(images)]
        rows = rows.drop_duplicates("image_index").sort_values("mse", ascending=False, na_position="last")
        match = observed[observed["name"] == f"MSE ({loss_label(loss)})"]
        ranking = letter_ranking(match["ranking"].iloc[0], letters) if len(match) else "n/a"
        with col:
            st.markdown(f"#### {'L2' if loss == 'l2' else 'Cosine'} attack: {ranking}")
            st.caption("largest MSE (most robust) first; each card: ground truth, reconstruction")
            cards = st.columns(COUNT)
            for card, row in zip(cards, rows.itertuples()):
                images_png = study_images(path, row.job_key) if path else (None, None)
                recon, truth = images_png
                shown = [png_array(p) for p in (truth, recon) if p is not None]
                if shown:
                    card.image(shown, output_format="PNG")
                card.markdown(f"**{letters[int(row.image_index)]}** · #{int(row.image_index)}  \n"
                              f"MSE {fmt(row.mse, 3)}")
    st.subheader("Which proxy predicts which ranking")
    st.caption("Each proxy ranks the images largest value first (the paper expects a larger proxy for a worse "
               "reconstruction). τ: Kendall's τ with the MSE under that attack; 1 means the same ranking.")
    predicted = table[table["kind"] == "predicted"].copy()
    out = pd.DataFrame({
        "proxy": predicted["name"],
        "meaning": [proxy_title(n) for n in predicted["name"]],
        "predicted ranking": [letter_ranking(r, letters) for r in predicted["ranking"]],
    })
    for loss in LOSSES:
        column = f"tau_{loss}"
        if column in predicted:
            out[f"τ vs {loss_label(loss)} MSE"] = [fmt(v, 2) for v in predicted[column]]
            out[f"matches {loss_label(loss)}"] = ["✓" if (isinstance(v, float) and not math.isnan(v)
                                                        and v >= 1 - 1e-9) else "" for v in predicted[column]]
    st.dataframe(out, hide_index=True)
    for loss in LOSSES:
        column = f"tau_{loss}"
        if column not in predicted:
            continue
        best = predicted.sort_values(column, ascending=False, na_position="last").iloc[0]
        st.markdown(f"- {loss_label(loss)} attack: the best predictor is **{best['name']}** "
                    f"(τ = {fmt(best[column], 2)}); the gradient norm's τ is "
                    f"{fmt(predicted.loc[predicted['name'] == 'grad_norm', column].squeeze(), 2)}.")


# --------------------------------------------------------------------------------------------
# Page

st.title("Rankings")
st.caption("Which of four images is most vulnerable depends on the attack's matching loss (Figure 1b); the "
           "loss-aware proxies predict each loss's ranking, the gradient norm cannot (Figure 1c).")

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
    flavours = [f for f in ("exact", "paper") if proxy_names(df, f)]
    archs = sorted(df["arch"].unique())
    keep_valid("rankings.arch", archs)
    keep_valid("rankings.flavour", flavours)
    c1, c2 = st.columns(2)
    arch = c1.selectbox("Architecture", archs, key="rankings.arch")
    flavour = c2.radio("Proxy values", flavours, key="rankings.flavour", horizontal=True)
    sub = df[df["arch"] == arch]
    both = sorted(set(sub[sub["loss"] == "l2"]["image_index"]) & set(sub[sub["loss"] == "cos"]["image_index"]))
    if len(both) < 2:
        st.info(f"The database has fewer than two images attacked with both losses on {arch}.")
        st.stop()
    default = pick_disagreeing_images(sub, arch, count=COUNT, flavour=flavour)
    chosen_key = f"rankings.images.{arch}.{flavour}"
    st.session_state.setdefault(chosen_key, default)
    if any(i not in both for i in st.session_state[chosen_key]):
        st.session_state[chosen_key] = default
    images = st.multiselect(f"Images (up to {COUNT}; the default shows the two rankings disagreeing)", both,
                            key=chosen_key, max_selections=COUNT)
    if len(images) < 2:
        st.info("Pick at least two images.")
        st.stop()
    render_rankings(sub, sorted(images), arch, flavour, f"from {path}", path)
else:
    if config is None or config.image is not None:
        st.info("New attacks need dataset images: choose a bundled dataset in the sidebar (its architecture, "
                "weights and seed are used).")
        st.stop()
    table = dataset_table(config.dataset)
    st.session_state.setdefault("rankings.new_images", list(range(COUNT)))
    images = st.multiselect(f"Images of {config.dataset} (up to {COUNT})", list(range(len(table))),
                            key="rankings.new_images", max_selections=COUNT,
                            format_func=lambda i: f"#{i} ({table.class_names[table.labels[i]]})")
    exact = st.toggle("Exact proxies too (20–60 s more per image on 2 cores)", key="rankings.exact")
    if len(images) < 2:
        st.info("Pick at least two images.")
        st.stop()
    study = StudyConfig(name="app-rankings", dataset=config.dataset, images=tuple(sorted(int(i) for i in images)),
                        archs=(config.arch,), weights=config.weights, seed=config.seed, losses=LOSSES,
                        steps=NEW_STEPS, restarts=NEW_RESTARTS,
                        flavours=("exact", "paper") if exact else ("paper",))
    flavour = "exact" if exact else "paper"
    db = str(scratch_db())
    task = new_attacks_known(study, db)
    running = task is not None and not task.finished
    b1, b2, _ = st.columns([2, 1, 5])
    b1.button(f"Run the {len(images) * len(LOSSES)} attacks", type="primary", icon=":material/play_arrow:",
              key="btn.rankings.run", disabled=running, on_click=new_attacks_task, args=(study, db),
              help=f"lavp-paper preset, {NEW_STEPS} steps, {NEW_RESTARTS} restart, on {config.arch}; finished "
                   f"attacks are kept, so a rerun only does what is missing")
    b2.button("Stop", icon=":material/stop:", key="btn.rankings.stop", disabled=not running,
              on_click=(task.stop if task is not None else None))
    task = new_attacks_known(study, db)
    if task is None:
        st.caption(f"Runs the lavp-paper attack ({NEW_STEPS} steps) with both losses on each image, scores it and "
                   f"computes its proxies: about 10–20 s per attack on 2 cores.")
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
