"""How one server process shares itself between browser sessions: who a session is, whether it is still
there, the board of background jobs (a cap on concurrent heavy work, one job per kind per session, jobs of
closed sessions stopped) and the limits on what one session may ask for.

The command line has none of these limits: they are the app's, sized to the machine it serves from.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import streamlit as st

from lavp_core.jobs import JobBoard
from lavp_core.system import available_cores

K_SESSION = "serve.session"  # outside the pages' prefixes: never re-stored as a widget value
SLOTS_ENV = "LAVP_MAX_JOBS"  # overrides how many heavy jobs compute at once
GRACE_SECONDS = 5.0  # a session gone this long (a closed tab, a reloaded page) loses its running jobs
SWEEP_SECONDS = 1.0


def session_token() -> str:
    """This browser session's id: Streamlit's session id under a running server (what the runtime answers
    :func:`session_alive` about); under ``AppTest`` (where every session shares one id and the runtime is a
    stand-in) a random one kept in the session state."""
    token = st.session_state.get(K_SESSION)
    if token is None:
        from streamlit import config
        from streamlit.runtime.scriptrunner import get_script_run_ctx

        ctx = get_script_run_ctx()
        testing = bool(config.get_option("global.appTest"))  # AppTest patches streamlit.config.get_option
        token = ctx.session_id if ctx is not None and not testing else uuid.uuid4().hex
        st.session_state[K_SESSION] = token
    return token


def session_alive(token: str) -> bool:
    """Whether the session ``token`` is still connected (``Runtime.is_active_session``, safe from any
    thread). Without a running server (``AppTest``) every session counts as alive."""
    from streamlit import runtime

    if not runtime.exists():
        return True
    return bool(runtime.get_instance().is_active_session(token))


def heavy_slots(cores: int | None = None) -> int:
    """How many heavy jobs (attacks, proxies, a ranking's attacks) compute at once: one per 4 cores, at least
    one (so about half the cores compute, at :func:`torch_threads_per_job` threads each, and the rest serve
    pages); ``$LAVP_MAX_JOBS`` overrides."""
    wanted = os.environ.get(SLOTS_ENV, "").strip()
    if wanted.isdigit() and int(wanted) > 0:
        return int(wanted)
    return max(1, (available_cores() if cores is None else cores) // 4)


def torch_threads_per_job(cores: int | None = None) -> int:
    """PyTorch threads per heavy job: half the cores shared by the :func:`heavy_slots` jobs."""
    cores = available_cores() if cores is None else cores
    return max(1, cores // (2 * heavy_slots(cores)))


@st.cache_resource(show_spinner=False)
def job_board() -> JobBoard:
    """The server's board of background jobs, shared by every session (see :class:`lavp_core.jobs.JobBoard`)."""
    return JobBoard(heavy_slots(), alive=session_alive, grace=GRACE_SECONDS, interval=SWEEP_SECONDS)


def load_caption() -> str:
    """One line on how busy the server is: computations running and waiting, and the cap."""
    running, waiting = job_board().load()
    cap = job_board().slots.slots
    return (f"Server: {running} computation{'s' if running != 1 else ''} running, {waiting} waiting "
            f"(at most {cap} at once on {available_cores()} cores; the command line has no such limit).")


def queue_text(position: int | None) -> str:
    """'waiting for a free slot: next in line' / '… 3rd in line' ('' when not waiting)."""
    if not position:
        return ""
    if position == 1:
        return "waiting for a free slot: next in line"
    suffix = "th" if 10 <= position % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(position % 10, "th")
    return f"waiting for a free slot: {position}{suffix} in line"


@dataclass(frozen=True)
class Limits:
    """What one session may ask of this server (the command line keeps the full ranges).

    ``max_steps`` and ``max_restarts`` bound the Attack page's widgets and ``max_work`` their product (an
    attack's cost is about steps × restarts); ``max_image_pixels`` and ``max_upload_mb`` bound uploads.
    """

    max_steps: int
    max_restarts: int
    max_work: int
    max_image_pixels: int
    max_upload_mb: int
    max_database_mb: int


def limits(cores: int | None = None) -> Limits:
    """Limits sized to the machine: per 2 cores, 5,000 steps, 4 restarts and 10,000 steps × restarts (the
    default attack is 1,000 × 2, 10-25 s on 2 cores; 10,000 about two minutes). Images: 16 megapixels (a
    12-megapixel phone photo fits; decoding one takes at most 64 MB) and 32 MB; databases 200 MB."""
    cores = available_cores() if cores is None else cores
    return Limits(max_steps=min(20_000, 2_500 * cores), max_restarts=min(16, 2 * cores), max_work=5_000 * cores,
                  max_image_pixels=16_000_000, max_upload_mb=32, max_database_mb=200)
