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
from pathlib import Path

import pandas as pd
import streamlit as st
import torch

from lavp_core.compare import COMPARED_LOSSES, compare_losses, loss_name, reference_lavp
from lavp_core.data import DatasetInfo
from lavp_core.errors import ConfigError, LavpError
from lavp_core.jobs import BackgroundAttack, SharedSlot
from lavp_core.losses import list_losses
from lavp_core.metrics import score_reconstruction
from lavp_core.presets import AttackRequest, get_kind, get_preset, list_presets
from lavp_core.proxies import proxy_title
from lavp_core.runner import PresetRun
from lavp_core.scenario import ScenarioConfig
from lavp_ui.formatting import fmt, loss_curve, metrics_frame, show_job_error, upscale
from lavp_ui.routing import draw_through_app
from lavp_ui.serving import job_board, limits, load_caption, queue_text, session_token
from lavp_ui.sidebar import (
    K_ARCH,
    cached_model,
    current_config,
    describe_config,
    image_archs,
    load_scenario,
    require_scenario,
)
from lavp_ui.tasks import eta_text, known_proxies_task, live_area, proxies_task, warm_up_engine

draw_through_app()  # first: a direct visit on a fresh server runs this file alone

# Demo settings per preset. The default (lavp-paper, cosine, 2,000 steps, one restart on the sidebar's
# default photos #0 and random-weight lenet) is the budget at which benchmarks/results/budget-lenet-random.jsonl
# shows this image recovered (SSIM 0.90); DEFAULT_CAPTION says what it was measured at. The presets' full
# settings are the command line's defaults.
DEMO = {
    "dlg": {"steps": 10, "restarts": 1},
    "idlg": {"steps": 10, "restarts": 1},
    "ig": {"steps": 300, "restarts": 1},
    "lavp-paper": {"steps": 2000, "restarts": 1},
    "gifd": {"steps": 200, "restarts": 2},
}
DEFAULT_CAPTION = (
    "Why this default: on random-weight lenet (seed 0) the gradient of one photo carries enough to rebuild it, "
    "and benchmarks/results/budget-lenet-random.jsonl (the paper's protocol, constant learning rate) shows "
    "photos #0 under the cosine loss at SSIM 0.53 after 500 steps and 0.90 after 2,000, so the default is "
    "2,000 steps. One restart: here the best of two (the lower final matching loss) ended at SSIM 0.81 against "
    "0.91 for one, and took longer. Measured on this 2-core CPU (one PyTorch thread per run): the first frame after "
    "0.1 s and the end after 20 s at a load average of about 4 (33 s at about 9), at PSNR 27.7 dB / SSIM 0.91. "
    "Compare mode runs the L2 and the cosine attack at once: both ended after 39 s at a load average of about 8, "
    "the L2 run at SSIM 0.22 on the same image.")
REFERENCE_STUDIES = tuple(Path(__file__).resolve().parent.parent / "assets" / "study" / name
                          for name in ("photos-random.sqlite", "photos-random-alexnet.sqlite",
                                       "photos-training.sqlite"))
FIRST_FRAME_WAIT = 1.0  # seconds the Run button waits for the first snapshot before the page is redrawn
TV_CHOICES = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
K_PRESET, K_LOSS, K_STEPS, K_LR, K_TV, K_RESTARTS = ("attack.preset", "attack.loss", "attack.steps", "attack.lr",
                                                    "attack.tv", "attack.restarts")
K_RECORD, K_ERROR, K_PROXY_METHOD = "attack.record", "attack.error", "attack.proxy_method"
K_COMPARE, K_COMPARE_RECORD = "attack.compare", "attack.compare_record"
PROXY_METHODS = {"auto": "exact where the input is small enough (dense Hessian), Lanczos otherwise",
                 "paper": "the paper's recipe (power iteration)"}
# Architectures a preset is made for (offered as one click when the sidebar has another): R-CONV inverts
# chains of biased convolutions and linear layers, and lavp_core.analytic names these two.
SHOWN_ON = {"rconv": ("cnn-rconv", "mlp-rconv")}
SIDE_PROXIES = {"l2": ("l2_max", "l2_min"), "cos": ("cos_max", "cos_min")}


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


@dataclass
class CompareRecord:
    """One session's comparison: the same image and settings attacked with the L2 and the cosine loss at
    once (one job each, sharing one of the server's slots)."""

    config: ScenarioConfig
    request: AttackRequest  # the shared settings (its ``loss`` is ignored)
    description: str
    truth01: torch.Tensor  # (C, H, W) in [0, 1]
    info: DatasetInfo
    jobs: dict[str, BackgroundAttack]

    @property
    def finished(self) -> bool:
        return all(job.finished for job in self.jobs.values())


def _running(key: str) -> bool:
    record = st.session_state.get(key)
    if record is None:
        return False
    return not (record.finished if hasattr(record, "jobs") else record.job.finished)  # classes differ per rerun


def _build_run(config: ScenarioConfig, request: AttackRequest):
    """(scenario, preset, PresetRun) for ``request`` on ``config``; raises LavpError on bad settings."""
    check_budget(request)
    scenario = load_scenario(config)
    preset = get_preset(request.preset)
    preset.attack_kind.check_model(scenario.model, scenario.info.image_shape)
    steps = request.steps or preset.defaults().steps or 1  # R-CONV has no steps
    run = PresetRun(scenario.model, scenario.image, scenario.label, scenario.info, request,
                    generator=torch.Generator().manual_seed(int(config.seed)),
                    snapshot_every=max(1, steps // 60))
    return scenario, preset, run


def _scorer(scenario):
    truth, info = scenario.image, scenario.info

    def summarize(outcome):
        return score_reconstruction(outcome.reconstruction, truth, info)

    return summarize


def start_attack() -> None:
    """Run button: build the attack here (bad settings fail at once), then iterate it in a thread.

    The settings are read when the button is pressed (not bound when it was drawn), so a value changed
    just before the click is the one used. In compare mode it starts the L2 and the cosine run instead.
    A refusal removes the last run's display (no full progress bar left under an error)."""
    st.session_state.pop(K_ERROR, None)
    if _running(K_RECORD) or _running(K_COMPARE_RECORD):
        return
    config = current_config()
    if config is None:
        st.session_state[K_ERROR] = "Choose an image in the sidebar first."
        return
    if st.session_state.get(K_COMPARE) and "loss" in get_preset(st.session_state[K_PRESET]).attack_kind.settings:
        start_compare(config)
        return
    request = request_from_settings()
    try:
        scenario, preset, run = _build_run(config, request)
    except LavpError as exc:
        st.session_state[K_ERROR] = str(exc)
        st.session_state.pop(K_RECORD, None)
        return
    except Exception as exc:  # a bug: one line, not a traceback
        st.session_state[K_ERROR] = f"The attack could not start ({type(exc).__name__}: {exc})."
        st.session_state.pop(K_RECORD, None)
        return
    board = job_board()
    job = BackgroundAttack(run, summarize=_scorer(scenario), name=f"lavp-attack-{request.preset}",
                           slots=board.slots)
    try:
        board.claim(session_token(), "attack", job, exclusive=True)
    except LavpError as exc:
        st.session_state[K_ERROR] = str(exc)
        return
    job.start()
    job.wait_first_snapshot(FIRST_FRAME_WAIT)  # so that the page drawn next already shows the first frame
    st.session_state.pop(K_COMPARE_RECORD, None)
    st.session_state[K_RECORD] = AttackRecord(config, request, preset.kind, scenario.description,
                                              scenario.image01[0], scenario.info, job)


def start_compare(config: ScenarioConfig) -> None:
    """Start the L2 and the cosine attack with the same settings on the same image, at once: two jobs
    (board kinds ``compare-l2`` and ``compare-cos``) that share one of the server's slots."""
    base = request_from_settings()
    board = job_board()
    slot = SharedSlot(board.slots)
    jobs: dict[str, BackgroundAttack] = {}
    try:
        for loss in COMPARED_LOSSES:
            request = dataclasses.replace(base, loss=loss)
            scenario, preset, run = _build_run(config, request)
            jobs[loss] = BackgroundAttack(run, summarize=_scorer(scenario), name=f"lavp-compare-{loss}", slots=slot)
        for loss, job in jobs.items():
            board.claim(session_token(), f"compare-{loss}", job, exclusive=True)
    except LavpError as exc:
        for job in jobs.values():
            job.stop()
        st.session_state[K_ERROR] = str(exc)
        st.session_state.pop(K_COMPARE_RECORD, None)
        return
    except Exception as exc:  # a bug: one line, not a traceback
        st.session_state[K_ERROR] = f"The comparison could not start ({type(exc).__name__}: {exc})."
        st.session_state.pop(K_COMPARE_RECORD, None)
        return
    for job in jobs.values():
        job.start()
    for job in jobs.values():
        job.wait_first_snapshot(FIRST_FRAME_WAIT / 2)
    st.session_state.pop(K_RECORD, None)
    st.session_state[K_COMPARE_RECORD] = CompareRecord(config, base, scenario.description, scenario.image01[0],
                                                       scenario.info, jobs)


def stop_attack() -> None:
    """Stop button: ends the single run, or both runs of a comparison."""
    record = st.session_state.get(K_RECORD)
    if record is not None:
        record.job.stop()
    compare = st.session_state.get(K_COMPARE_RECORD)
    if compare is not None:
        for job in compare.jobs.values():
            job.stop()


def progress_label(view) -> str:
    """The progress bar's text: state, seconds, matching loss, and the time left measured from this run's
    own speed (steps done / elapsed)."""
    if view.queue_position:
        return queue_text(view.queue_position)
    loss_now = view.snapshot.matching_loss if view.snapshot is not None else math.nan
    label = f"{view.state} · {view.elapsed:.1f} s · matching loss {fmt(loss_now)}"
    if view.running and view.snapshot is not None:
        eta = eta_text(int(view.snapshot.step), int(view.snapshot.total_steps), view.elapsed)
        label += f" · {eta}" if eta else ""
    return label + (" · stopping…" if view.running and view.stop_requested else "")


def render_frame(column, view, info: DatasetInfo, title: str = "reconstruction") -> None:
    """The latest reconstruction of a job (or its place in line) in ``column``."""
    if view.outcome is not None and view.outcome.reconstruction is not None:
        final = info.denormalize(view.outcome.reconstruction.detach().float().cpu())[0]
        column.image(upscale(final), caption=f"{title} ({view.state}, {view.outcome.steps} steps)",
                     output_format="PNG")
    elif view.snapshot is not None:
        stage = getattr(view.snapshot, "stage", None)
        text = f"step {view.snapshot.step} / {view.snapshot.total_steps}" + (
            f" · stage {stage}" if stage is not None else "")
        column.image(upscale(view.snapshot.image01), caption=f"{title}, {text}", output_format="PNG")
    elif view.running and view.queue_position:
        column.info(f"{queue_text(view.queue_position)}: the server runs at most "
                    f"{job_board().slots.slots} computation(s) at once", icon=":material/hourglass_top:")
    elif view.running:
        column.info("starting…", icon=":material/hourglass_top:")


def render_live(record: AttackRecord) -> None:
    """The live part of a run, redrawn by a fragment while it runs: reconstruction, loss curve, progress.
    (The ground truth, drawn once outside, is not sent again on every redraw.)"""
    view = record.job.view()
    rec_col, curve_col = st.columns([1, 2])
    render_frame(rec_col, view, record.info)
    if not get_kind(record.kind).has_loss_curve:
        curve_col.caption(f"{record.request.preset}: no loss curve ({get_kind(record.kind).summary}).")
    elif view.history:
        curve_col.plotly_chart(loss_curve(view.history), config={"displayModeBar": False})
    if view.error is not None:  # a refusal or a failure: the message, not a full progress bar
        show_job_error(view.error)
    else:
        st.progress(view.fraction, text=progress_label(view))


def render_compare_live(record: CompareRecord) -> None:
    """Both runs of a comparison side by side, redrawn while either runs."""
    columns = st.columns(len(record.jobs))
    for column, (loss, job) in zip(columns, record.jobs.items()):
        view = job.view()
        with column:
            st.markdown(f"**{loss_name(loss)} loss**")
            render_frame(st, view, record.info, title=f"{loss_name(loss)} reconstruction")
            if view.history:
                st.plotly_chart(loss_curve(view.history, title=f"{loss_name(loss)} matching loss", height=220),
                                config={"displayModeBar": False}, key=f"curve-{loss}")
            if view.error is not None:
                show_job_error(view.error)
            else:
                st.progress(view.fraction, text=progress_label(view))


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


def recipe_dependent(result, name: str) -> bool:
    """Whether ``name``'s value in a paper-recipe result rests on the recipe's λ_min (λ_min itself, or a
    fusion with a λ_min part), which its power iteration often leaves far from the exact value."""
    if name.endswith("_min"):
        return True
    return any(extreme == "min" for _, extreme in getattr(result, "fusions", {}).get(name, ()))


def proxy_rows(result, exact=None, names=None) -> pd.DataFrame:
    """A proxies table (proxy, meaning, value, converged, note). A paper-recipe λ_min (and a fusion using
    one) is shown only with its distance from the exact value; without an exact result it is withheld."""
    rows = []
    for name, value in result.items():
        if names is not None and name not in names:
            continue
        shown, note = fmt(value, 5), ""
        if result.method == "paper" and recipe_dependent(result, name):
            reference = exact.get(name) if exact is not None and exact.method == "exact" else None
            if reference is None or not math.isfinite(reference) or reference == 0:
                shown = "withheld"
                note = (f"the recipe's value ({fmt(value, 3)}) is unverified: no exact value of this image to "
                        f"check it against; compute the exact proxies first (the other solver choice)")
            else:
                note = f"exact {fmt(reference, 3)}; the recipe's value is {value / reference:,.3g} times it"
        elif result.method == "lanczos" and name.endswith("_min") and not result.converged(name):
            note = "Lanczos did not converge for this λ_min: treat it as an upper bound"
        rows.append((name, proxy_title(name), shown, "yes" if result.converged(name) else "no", note))
    return pd.DataFrame(rows, columns=["proxy", "meaning", "value", "converged", "note"])


def finished_exact(config: ScenarioConfig):
    """This image's exact proxies if a finished computation has them (``auto`` on a small input, or
    ``exact``), else ``None``."""
    for method in ("auto", "exact"):
        task = known_proxies_task(config, method)
        if task is not None:
            view = task.view()
            if view.result is not None and view.result.method == "exact":
                return view.result
    return None


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
            st.dataframe(proxy_rows(view.result, finished_exact(record.config)), hide_index=True)
            st.caption(f"{view.result.method} solver, {view.result.seconds:.1f} s. The paper claims that a larger "
                       f"value predicts a worse reconstruction under that loss; the Proxies page has the spectra "
                       f"and a solver comparison.")

    live_area(render, lambda: not task.finished)


@st.cache_data(ttl=60, show_spinner=False)
def reference_population(dataset: str, arch: str, weights: str, seed: int) -> dict:
    """Each loss's exact λ_max over the bundled studies' images of this model (read-only; re-read once a
    minute, as the studies may still be running)."""
    from lavp_core.study import load_results

    frames = []
    for path in REFERENCE_STUDIES:
        if path.is_file():
            try:
                frames.append(load_results(str(path)))
            except Exception:  # a study being created: no reference from it yet
                continue
    frames = [f for f in frames if not f.empty]
    if not frames:
        return {loss: [] for loss in COMPARED_LOSSES}
    found = reference_lavp(pd.concat(frames, ignore_index=True), dataset=dataset, arch=arch, weights=weights,
                           seed=seed)
    return {loss: [float(v) for v in values] for loss, values in found.items()}


def render_compare_outcome(record: CompareRecord) -> None:
    """Each run's scores beside its own loss's LAVP, the gradient norm once, and the verdict sentence."""
    views = {loss: job.view() for loss, job in record.jobs.items()}
    task = proxies_task(record.config, "auto")

    def render() -> None:
        proxies = task.view()
        result = proxies.result
        if result is not None:
            st.markdown(f"**grad_norm** (the same for both losses): {fmt(result.get('grad_norm'), 5)} · "
                        f"{result.method} solver, {result.seconds:.1f} s")
        columns = st.columns(len(views))
        for column, (loss, view) in zip(columns, views.items()):
            with column:
                st.markdown(f"**{loss_name(loss)} attack**")
                if view.summary is not None:
                    st.dataframe(metrics_frame(view.summary), hide_index=True, key=f"metrics-{loss}")
                if view.outcome is not None:
                    st.caption(f"{view.outcome.steps} steps in {view.outcome.seconds:.1f} s, final matching loss "
                               f"{fmt(view.outcome.matching_loss)}" + (" (stopped early)" if view.outcome.cancelled
                                                                       else ""))
                if result is not None:
                    st.dataframe(proxy_rows(result, names=SIDE_PROXIES[loss]), hide_index=True, key=f"lavp-{loss}")
        if proxies.running:
            st.progress(proxies.progress,
                        text=queue_text(proxies.queue_position) or f"proxies: {proxies.message}… "
                                                                   f"{proxies.elapsed:.0f} s")
        elif proxies.error is not None:
            show_job_error(proxies.error)
        summaries = {loss: view.summary for loss, view in views.items()}
        if result is not None and all(summaries.values()):
            config = record.config
            reference = reference_population(config.dataset, config.arch, config.weights, int(config.seed))
            model = (f"{config.arch}, {config.weights} weights" +
                     (f" (seed {config.seed})" if config.weights == "random" else "") + f", {config.dataset}")
            verdict = compare_losses({loss: float(s["ssim"]) for loss, s in summaries.items()},
                                     {loss: float(result[f"{loss}_max"]) for loss in COMPARED_LOSSES},
                                     reference, model=model)
            st.info(verdict.sentence, icon=":material/balance:")

    live_area(render, lambda: not task.finished)


@st.cache_data(show_spinner=False)
def supported_archs(kind: str, dataset: str) -> list[str]:
    """The sidebar's architectures whose model ``kind`` accepts (its own ``check_model``)."""
    from lavp_core.data import load_dataset

    shape = load_dataset(dataset, "val").info.image_shape
    found = []
    for arch in image_archs():
        try:
            get_kind(kind).check_model(cached_model(arch, "random", 0, dataset), shape)
        except LavpError:
            continue
        except Exception:
            continue
        found.append(arch)
    return found


def use_arch(arch: str) -> None:
    """An offered architecture's button: switch the sidebar to it and drop the ended run on the other one."""
    st.session_state[K_ARCH] = arch
    st.session_state.pop(K_ERROR, None)
    if not _running(K_RECORD):
        st.session_state.pop(K_RECORD, None)


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
                    format_func=lambda n: n)
preset = presets[name]
st.caption(f"**{name}**: {preset.description}")
cli, demo = preset.defaults(), DEMO.get(name, {})


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}{'s' if n != 1 else ''}"


changed = [_count(demo[k], k.rstrip("s")) for k in ("steps", "restarts")
           if k in demo and getattr(cli, k) not in (None, demo[k])]
if changed:
    st.caption(f"This page starts it at {' and '.join(changed)}; the description gives the command line's defaults "
               f"({_count(cli.steps, 'step')}, {_count(cli.restarts, 'restart')}).")
honoured = preset.attack_kind.settings  # widgets for settings this kind does not have are greyed out
try:
    preset.attack_kind.check_model(scenario.model, scenario.info.image_shape)
    refusal = None
except LavpError as exc:
    refusal = exc
shown_on = [a for a in SHOWN_ON.get(name, ()) if a in image_archs()]
if refusal is not None or (shown_on and scenario.config.arch not in shown_on):
    if refusal is not None:
        st.warning(f"{name} cannot attack {scenario.config.arch}: {refusal}", icon=":material/warning:")
    else:
        st.caption(f"{name} is made for {' and '.join(shown_on)}; on {scenario.config.arch} its linear systems "
                   f"may fall short of full rank. Switch the sidebar's architecture:")
    buttons = st.columns(6)
    for column, arch in zip(buttons, shown_on or supported_archs(preset.kind, scenario.config.dataset)):
        column.button(f"Use {arch}", key=f"btn.attack.arch.{arch}", on_click=use_arch, args=(arch,))
allowed = limits()
for key, most in ((K_STEPS, allowed.max_steps), (K_RESTARTS, allowed.max_restarts)):
    if int(st.session_state.get(key, 1)) > most:  # e.g. a value kept from before the limits
        st.session_state[key] = most
can_compare = "loss" in honoured
st.toggle("Compare L2 and cosine on this image", key=K_COMPARE, disabled=not can_compare,
          help="Runs the L2 and the cosine attack at once with the settings below, side by side, each with its "
               "own loss's LAVP" if can_compare else f"{name} has no matching-loss setting to compare")
comparing = bool(st.session_state.get(K_COMPARE)) and can_compare
cols = st.columns(5)
cols[0].radio("Matching loss", [loss.name for loss in list_losses()], key=K_LOSS,
              disabled="loss" not in honoured or comparing, format_func=loss_name,
              help="L2: ½‖g − g*‖² (DLG); cosine: 1 − cosine over all layers (Inverting Gradients)")
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

running = _running(K_RECORD) or _running(K_COMPARE_RECORD)
run_col, stop_col, _ = st.columns([1, 1, 6])
run_col.button("Compare" if comparing else "Run", type="primary", icon=":material/play_arrow:", disabled=running,
               on_click=start_attack, key="btn.attack.run")
stop_col.button("Stop", icon=":material/stop:", disabled=not running, on_click=stop_attack, key="btn.attack.stop")
if st.session_state.get(K_ERROR):
    st.error(st.session_state[K_ERROR], icon=":material/error:")
st.caption(load_caption())

record = st.session_state.get(K_RECORD)
compare = st.session_state.get(K_COMPARE_RECORD)
if record is None and compare is None:
    st.info("Choose a preset and press **Run**, or turn on the comparison to run the L2 and the cosine attack "
            "on this image at once. While a run goes, its progress bar shows the time left measured from its "
            "own speed.", icon=":material/info:")
    st.caption(DEFAULT_CAPTION)
elif compare is not None:
    if compare.config != scenario.config:
        st.caption(f"Showing the last comparison: {compare.description}")
    truth_col, live_col = st.columns([1, 4])
    truth_col.image(upscale(compare.truth01), caption="ground truth", output_format="PNG")
    with live_col:
        live_area(lambda: render_compare_live(compare), lambda: not compare.finished)
    if compare.finished:
        render_compare_outcome(compare)
else:
    if record.config != scenario.config or record.request != request:
        st.caption(f"Showing the last run: {record.description}, preset {record.request.preset}"
                   + (f", {loss_name(record.request.loss)} loss" if record.request.loss else ""))
    truth_col, live_col = st.columns([1, 3])
    truth_col.image(upscale(record.truth01), caption="ground truth", output_format="PNG")
    with live_col:
        live_area(lambda: render_live(record), lambda: not record.job.finished)
    view = record.job.view()
    if view.finished and view.outcome is not None:
        render_outcome(record, view)
        render_proxies(record)
