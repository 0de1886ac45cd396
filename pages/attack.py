"""Attack: run a preset on the sidebar's image and watch the reconstruction converge, live.

The attack runs in a daemon thread (:class:`lavp_core.jobs.BackgroundAttack`) kept in this session's
state; a fragment redraws the latest snapshot once a second (``lavp_ui.tasks.POLL_SECONDS``), so the page
stays responsive, Stop works, and other clicks (even on other pages) do not lose the run. The server's job
board (:mod:`lavp_ui.serving`) holds it: one attack per session, a place in line while the server is busy,
and a stop within seconds when the session ends (a reload or a closed tab leaves no run behind). Steps and
restarts are bounded by what this machine can do; the command line has no such bounds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pandas as pd
import streamlit as st
import torch

from lavp_core.data import DatasetInfo
from lavp_core.errors import ConfigError, LavpError
from lavp_core.jobs import BackgroundAttack
from lavp_core.losses import list_losses
from lavp_core.metrics import score_reconstruction
from lavp_core.presets import AttackRequest, get_kind, get_preset, list_presets
from lavp_core.runner import PresetRun
from lavp_core.scenario import ScenarioConfig
from lavp_ui.formatting import fmt, loss_curve, metrics_frame, proxies_frame, show_job_error, upscale
from lavp_ui.routing import draw_through_app
from lavp_ui.serving import job_board, limits, load_caption, queue_text, session_token
from lavp_ui.sidebar import current_config, describe_config, load_scenario, require_scenario
from lavp_ui.tasks import live_area, proxies_task, warm_up_engine

draw_through_app()  # first: a direct visit on a fresh server runs this file alone

# Demo settings per preset: the default (lavp-paper on lenet) shows its first frame well under 2 s and
# ends within 30 s on a 2-core CPU. The presets' full settings are the command line's defaults.
DEMO = {
    "dlg": {"steps": 10, "restarts": 1},
    "idlg": {"steps": 10, "restarts": 1},
    "ig": {"steps": 300, "restarts": 1},
    "lavp-paper": {"steps": 1000, "restarts": 2},
    "gifd": {"steps": 200, "restarts": 2},
}
FIRST_FRAME_WAIT = 1.0  # seconds the Run button waits for the first snapshot before the page is redrawn
TV_CHOICES = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
K_PRESET, K_LOSS, K_STEPS, K_LR, K_TV, K_RESTARTS = ("attack.preset", "attack.loss", "attack.steps", "attack.lr",
                                                    "attack.tv", "attack.restarts")
K_RECORD, K_ERROR, K_PROXY_METHOD = "attack.record", "attack.error", "attack.proxy_method"
PROXY_METHODS = {"paper": "the paper's recipe (seconds)", "exact": "exact (20–60 s on 2 cores)"}


@dataclass
class AttackRecord:
    """One session's attack: what was attacked, with which settings, and the running job."""

    config: ScenarioConfig
    request: AttackRequest
    kind: str
    description: str
    truth01: torch.Tensor  # (C, H, W) in [0, 1]
    info: DatasetInfo
    job: BackgroundAttack


def apply_preset_defaults() -> None:
    """Put the chosen preset's demo settings into the widgets (on a change of preset)."""
    preset = get_preset(st.session_state[K_PRESET])
    defaults = preset.defaults()  # None for a setting the preset's kind does not have (R-CONV: every one)
    demo = DEMO.get(preset.name, {})
    if defaults.loss is not None:
        st.session_state[K_LOSS] = defaults.loss
    if defaults.steps is not None:
        st.session_state[K_STEPS] = int(demo.get("steps", min(defaults.steps, 1000)))
    if defaults.restarts is not None:
        st.session_state[K_RESTARTS] = int(demo.get("restarts", defaults.restarts))
    if defaults.lr is not None:
        st.session_state[K_LR] = float(defaults.lr)
    if defaults.tv_weight is not None:
        st.session_state[K_TV] = min(TV_CHOICES, key=lambda v: abs(v - defaults.tv_weight))


def check_budget(request: AttackRequest) -> None:
    """Refuse an attack larger than this server allows one session (steps × restarts)."""
    allowed = limits()
    steps, restarts = request.steps or 1, request.restarts or 1
    if steps > allowed.max_steps or restarts > allowed.max_restarts or steps * restarts > allowed.max_work:
        raise ConfigError(f"{steps:,} steps × {restarts} restarts is more than this server runs for one session "
                          f"(at most {allowed.max_steps:,} steps, {allowed.max_restarts} restarts and "
                          f"{allowed.max_work:,} steps × restarts); lower them, or run it with the command line: "
                          f"python -m lavp_core attack --preset {request.preset} --steps {steps} --restarts "
                          f"{restarts}")


def request_from_settings() -> AttackRequest:
    """The attack the widgets describe (read from the session state, so a callback sees the latest values)."""
    state = st.session_state
    name = state[K_PRESET]
    widgets = {"loss": state[K_LOSS], "steps": int(state[K_STEPS]), "restarts": int(state[K_RESTARTS]),
               "lr": float(state[K_LR]), "tv_weight": float(state[K_TV])}
    honoured = get_preset(name).attack_kind.settings
    return AttackRequest(preset=name, **{k: v for k, v in widgets.items() if k in honoured})


def start_attack() -> None:
    """Run button: build the attack here (bad settings fail at once), then iterate it in a thread.

    The settings are read when the button is pressed (not bound when it was drawn), so a value changed
    just before the click is the one used."""
    st.session_state.pop(K_ERROR, None)
    config = current_config()
    if config is None:
        st.session_state[K_ERROR] = "Choose an image in the sidebar first."
        return
    request = request_from_settings()
    record = st.session_state.get(K_RECORD)
    if record is not None and not record.job.finished:
        return
    try:
        check_budget(request)
        scenario = load_scenario(config)
        preset = get_preset(request.preset)
        preset.attack_kind.check_model(scenario.model, scenario.info.image_shape)
        steps = request.steps or preset.defaults().steps or 1  # R-CONV has no steps
        run = PresetRun(scenario.model, scenario.image, scenario.label, scenario.info, request,
                        generator=torch.Generator().manual_seed(int(config.seed)),
                        snapshot_every=max(1, steps // 60))
    except LavpError as exc:
        st.session_state[K_ERROR] = str(exc)
        return
    except Exception as exc:  # a bug: one line, not a traceback
        st.session_state[K_ERROR] = f"The attack could not start ({type(exc).__name__}: {exc})."
        return

    truth, info = scenario.image, scenario.info

    def summarize(outcome):
        return score_reconstruction(outcome.reconstruction, truth, info)

    board = job_board()
    job = BackgroundAttack(run, summarize=summarize, name=f"lavp-attack-{request.preset}", slots=board.slots)
    try:
        board.claim(session_token(), "attack", job, exclusive=True)
    except LavpError as exc:
        st.session_state[K_ERROR] = str(exc)
        return
    job.start()
    job.wait_first_snapshot(FIRST_FRAME_WAIT)  # so that the page drawn next already shows the first frame
    st.session_state[K_RECORD] = AttackRecord(config, request, preset.kind, scenario.description,
                                              scenario.image01[0], scenario.info, job)


def stop_attack() -> None:
    record = st.session_state.get(K_RECORD)
    if record is not None:
        record.job.stop()


def render_live(record: AttackRecord) -> None:
    """The live part of a run, redrawn by a fragment while it runs: reconstruction, loss curve, progress.
    (The ground truth, drawn once outside, is not sent again on every redraw.)"""
    view = record.job.view()
    rec_col, curve_col = st.columns([1, 2])
    if view.outcome is not None and view.outcome.reconstruction is not None:
        final = record.info.denormalize(view.outcome.reconstruction.detach().float().cpu())[0]
        rec_col.image(upscale(final), caption=f"reconstruction ({view.state}, {view.outcome.steps} steps)",
                      output_format="PNG")
    elif view.snapshot is not None:
        stage = getattr(view.snapshot, "stage", None)
        text = f"step {view.snapshot.step} / {view.snapshot.total_steps}" + (
            f" · stage {stage}" if stage is not None else "")
        rec_col.image(upscale(view.snapshot.image01), caption=f"reconstruction, {text}", output_format="PNG")
    elif view.running and view.queue_position:
        rec_col.info(f"{queue_text(view.queue_position)}: the server runs at most "
                     f"{job_board().slots.slots} computation(s) at once", icon=":material/hourglass_top:")
    elif view.running:
        rec_col.info("starting…", icon=":material/hourglass_top:")
    if not get_kind(record.kind).has_loss_curve:
        curve_col.caption(f"{record.request.preset}: no loss curve ({get_kind(record.kind).summary}).")
    elif view.history:
        curve_col.plotly_chart(loss_curve(view.history), config={"displayModeBar": False})
    loss_now = view.snapshot.matching_loss if view.snapshot is not None else math.nan
    label = (queue_text(view.queue_position) if view.queue_position else
             f"{view.state} · {view.elapsed:.1f} s · matching loss {fmt(loss_now)}")
    label += " · stopping…" if view.running and view.stop_requested else ""
    st.progress(view.fraction, text=label)
    if view.error is not None:
        show_job_error(view.error)


def render_outcome(record: AttackRecord, view) -> None:
    outcome = view.outcome
    st.subheader("Similarity to the ground truth")
    left, right = st.columns([1, 1])
    if view.summary is not None:
        left.dataframe(metrics_frame(view.summary), hide_index=True)
    facts = [("preset", outcome.preset), ("final matching loss", fmt(outcome.matching_loss)),
             ("steps", str(outcome.steps)), ("seconds", f"{outcome.seconds:.1f}"),
             ("first frame after (s)", fmt(view.first_frame_seconds, 3)),
             ("label used / true", f"{outcome.label_used} / {outcome.label_true}"),
             ("stopped early", "yes" if outcome.cancelled else "no")]
    right.dataframe(pd.DataFrame(facts, columns=["", "value"]), hide_index=True)
    if outcome.details.get("warning"):
        st.warning(outcome.details["warning"])
    stages = outcome.details.get("stages")
    if stages:
        st.markdown("**GIFD stages** (the kept candidate after each stage; the best stage is the outcome)")
        st.image([upscale(s.image01, 4) for s in stages],
                 caption=[f"{s.name}: loss {fmt(s.matching_loss, 3)}" for s in stages], output_format="PNG")
    layers = outcome.details.get("layers")
    if layers:
        st.markdown(f"**R-CONV, layer by layer** (gradient residual "
                    f"{fmt(outcome.details.get('gradient_residual'), 3)})")
        st.dataframe(pd.DataFrame([dataclasses.asdict(layer) for layer in layers]), hide_index=True)


def render_proxies(record: AttackRecord) -> None:
    """This image's proxies, computed in the background once the attack has ended."""
    st.subheader("This image's vulnerability proxies")
    method = st.radio("Eigen-solver", list(PROXY_METHODS), format_func=PROXY_METHODS.get, horizontal=True,
                      key=K_PROXY_METHOD)
    task = proxies_task(record.config, method)

    def render() -> None:
        view = task.view()
        if view.running:
            st.progress(view.progress, text=queue_text(view.queue_position) or f"{view.message}… {view.elapsed:.0f} s")
        elif view.error is not None:
            show_job_error(view.error)
        elif view.result is not None:
            st.dataframe(proxies_frame(view.result), hide_index=True)
            st.caption(f"{view.result.method} solver, {view.result.seconds:.1f} s. Larger values predict a worse "
                       f"reconstruction under that loss; the Proxies page has the spectra and a solver comparison.")

    live_area(render, lambda: not task.finished)


# --------------------------------------------------------------------------------------------
# Page

scenario = require_scenario()
warm_up_engine()
st.title("Attack")
st.caption(f"Client image: {scenario.description} · model {scenario.config.arch} "
           f"({describe_config(scenario.config)})")

presets = {p.name: p for p in list_presets()}
if K_PRESET not in st.session_state:
    st.session_state[K_PRESET] = "lavp-paper"
    apply_preset_defaults()
name = st.selectbox("Preset", list(presets), key=K_PRESET, on_change=apply_preset_defaults,
                    format_func=lambda n: f"{n}: {presets[n].description}")
preset = presets[name]
honoured = preset.attack_kind.settings  # widgets for settings this kind does not have are greyed out
allowed = limits()
for key, most in ((K_STEPS, allowed.max_steps), (K_RESTARTS, allowed.max_restarts)):
    if int(st.session_state.get(key, 1)) > most:  # e.g. a value kept from before the limits
        st.session_state[key] = most
cols = st.columns(5)
cols[0].radio("Matching loss", [loss.name for loss in list_losses()], key=K_LOSS, disabled="loss" not in honoured,
              help="l2: ½‖g − g*‖² (DLG); cos: 1 − cosine over all layers (Inverting Gradients)")
cols[1].number_input("Steps", min_value=1, max_value=allowed.max_steps, step=50, key=K_STEPS,
                     disabled="steps" not in honoured,
                     help=f"GIFD: the total over its stages; DLG/iDLG: L-BFGS steps of 20 iterations. At most "
                          f"{allowed.max_steps:,} here and {allowed.max_work:,} steps × restarts (this machine's "
                          f"share for one session; the command line has no limit)")
cols[2].number_input("Learning rate", min_value=1e-5, max_value=10.0, format="%.4g", key=K_LR,
                     disabled="lr" not in honoured)
cols[3].select_slider("TV weight", TV_CHOICES, key=K_TV, disabled="tv_weight" not in honoured,
                      format_func=lambda v: f"{v:g}")
cols[4].number_input("Restarts", min_value=1, max_value=allowed.max_restarts, step=1, key=K_RESTARTS,
                     disabled="restarts" not in honoured,
                     help=f"random starts; the best final matching loss wins (at most {allowed.max_restarts} here)")
if preset.attack_kind.note:
    st.caption(preset.attack_kind.note)
request = request_from_settings()

record: AttackRecord | None = st.session_state.get(K_RECORD)
running = record is not None and not record.job.finished
run_col, stop_col, _ = st.columns([1, 1, 6])
run_col.button("Run", type="primary", icon=":material/play_arrow:", disabled=running, on_click=start_attack,
               key="btn.attack.run")
stop_col.button("Stop", icon=":material/stop:", disabled=not running, on_click=stop_attack, key="btn.attack.stop")
if st.session_state.get(K_ERROR):
    st.error(st.session_state[K_ERROR], icon=":material/error:")
st.caption(load_caption())

record = st.session_state.get(K_RECORD)
if record is None:
    st.info("Choose a preset and press **Run**. The default (the paper's protocol, 1000 steps, 2 restarts) takes "
            "about 10–25 s on a 2-core CPU; switch the matching loss between l2 and cos to see how differently the "
            "same image comes back.", icon=":material/info:")
else:
    if record.config != scenario.config or record.request != request:
        st.caption(f"Showing the last run: {record.description}, preset {record.request.preset}"
                   + (f", {record.request.loss} loss" if record.request.loss else ""))
    truth_col, live_col = st.columns([1, 3])
    truth_col.image(upscale(record.truth01), caption="ground truth", output_format="PNG")
    with live_col:
        live_area(lambda: render_live(record), lambda: not record.job.finished)
    view = record.job.view()
    if view.finished and view.outcome is not None:
        render_outcome(record, view)
        render_proxies(record)
