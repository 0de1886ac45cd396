"""What every page of the app shares: the sidebar, caches, the scenario, error boxes and live areas.

Pages stay thin (widgets -> configuration -> a call into ``lavp_core`` -> render); anything two pages
need lives here. Streamlit skips files whose name starts with ``_`` when it lists pages, and the app
routes with ``st.navigation`` anyway.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st
import torch

from lavp_core.data import load_dataset, load_image
from lavp_core.errors import LavpError
from lavp_core.jobs import FORWARD_AD_LOCK, BackgroundAttack, BackgroundTask, TaskControl, TaskPool
from lavp_core.metrics import to_uint8_image
from lavp_core.models import list_models, trained_checkpoint_path
from lavp_core.runner import AttackRequest, PresetRun
from lavp_core.scenario import Scenario, ScenarioConfig, build_model

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_STUDY = ROOT / "assets" / "study" / "photos-default.sqlite"
UPLOAD = "upload an image"
POLL_SECONDS = 1.0  # live areas redraw once a second: on 2 cores every redraw costs the attack CPU time
STUDY_DB_ENV = "LAVP_STUDY_DB"  # overrides the bundled study's path (used by the tests)

# Session-state keys of the shared sidebar (kept across pages because app.py draws them on every run).
K_DATASET, K_INDEX, K_ARCH, K_WEIGHTS, K_SEED = "side.dataset", "side.index", "side.arch", "side.weights", "side.seed"
K_UPLOAD, K_UPLOAD_LABEL, K_UPLOAD_STATS = "side.upload", "side.upload_label", "side.upload_stats"
K_CONFIG = "side.config"
# Pages' widget keys start with these prefixes; app.py re-stores them on every run so that Streamlit does
# not drop a page's settings while another page is shown. Buttons, uploaders and chart selections (which
# cannot be set) use keys outside these prefixes ("btn.", "sel.").
PAGE_PREFIXES = ("attack.", "proxies.", "study.", "rankings.")


# --------------------------------------------------------------------------------------------
# Routing


def ensure_entry_file() -> None:
    """Rerun through app.py when Streamlit ran this page file alone.

    Until some session of a fresh server has called ``st.navigation``, Streamlit treats the ``pages/``
    folder as an old-style multipage app: a first visit straight to ``/attack`` runs pages/attack.py by
    itself (no sidebar) and lists every file of the folder in the menu. Each page calls this first: it
    records that the app routes with ``st.navigation`` (as the first run of app.py would) and reruns, so
    app.py draws the sidebar and the menu with only the intended titles.
    """
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # a Streamlit without this internal: nothing to fix
        return
    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


# --------------------------------------------------------------------------------------------
# Errors


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


# --------------------------------------------------------------------------------------------
# Caches


@st.cache_resource(max_entries=12, show_spinner=False)
def cached_model(arch: str, weights: str, seed: int, dataset: str) -> torch.nn.Module:
    """The model of (arch, weights, seed, dataset), shared by every session: treat it as read-only
    (attacks and proxies work on private copies)."""
    info = load_dataset(dataset, "val").info
    return build_model(ScenarioConfig(dataset=dataset, arch=arch, weights=weights, seed=seed), info)


@dataclass(frozen=True)
class DatasetTable:
    """Display data of one dataset split: uint8 thumbnails (N, H, W, 3), labels and captions."""

    name: str
    split: str
    images: np.ndarray
    labels: tuple[int, ...]
    descriptions: tuple[str, ...]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


@st.cache_data(max_entries=8, show_spinner=False)
def dataset_table(name: str, split: str = "val") -> DatasetTable:
    """Thumbnails and captions of a bundled dataset split (a copy per caller)."""
    data = load_dataset(name, split)
    images = np.stack([to_uint8_image(data[i][0]) for i in range(len(data))])
    return DatasetTable(name, split, images, tuple(data.label(i) for i in range(len(data))),
                        tuple(data.describe(i) for i in range(len(data))), data.info.class_names)


@st.cache_resource(show_spinner=False)
def shared_tasks() -> TaskPool:
    """Computations whose result depends only on their key (proxies of a scenario, a ranking of images),
    shared by every session of this server: a cache that also remembers work in progress."""
    return TaskPool(max_finished=64)


@st.cache_resource(show_spinner=False)
def configure_torch_threads() -> int:
    """Give PyTorch half of the CPU cores (once per server process); ``$LAVP_TORCH_THREADS`` overrides.

    The browser and the server share the machine with the attack: on 2 cores, PyTorch's two OpenMP threads
    then wait on each other and the default attack takes 2-3 times longer than with one. Under AppTest
    (the test suite's process) nothing is changed.
    """
    wanted = os.environ.get("LAVP_TORCH_THREADS", "").strip()
    if wanted.isdigit() and int(wanted) > 0:
        threads = int(wanted)
    elif st.get_option("global.appTest"):
        return torch.get_num_threads()
    else:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 2
        threads = max(1, cores // 2)
    torch.set_num_threads(threads)
    return threads


@st.cache_resource(show_spinner=False)
def warm_up_engine() -> BackgroundAttack | None:
    """Run a two-step attack once per process in the background, so that the first real attack does not
    pay for PyTorch's one-time set-up (its first frame then comes within a fraction of a second)."""
    try:
        data = load_dataset("photos", "val")
        model = cached_model("lenet", "random", 0, "photos")
        image01, label = data[0]
        run = PresetRun(model, data.info.normalize(image01.unsqueeze(0)), label, data.info,
                        AttackRequest(preset="lavp-paper", loss="cos", steps=2, restarts=2),
                        generator=torch.Generator().manual_seed(0), snapshot_every=1)
        return BackgroundAttack(run, name="lavp-warm-up").start()
    except Exception:  # warming up is an optimisation only
        return None


# --------------------------------------------------------------------------------------------
# The scenario (the sidebar's choice)


def load_scenario(config: ScenarioConfig) -> Scenario:
    """Tensors of the chosen image and the shared cached model (raises :class:`LavpError` on bad input)."""
    data = load_dataset(config.dataset, config.split)
    info = data.info
    model = cached_model(config.arch, config.weights, config.seed, config.dataset)
    if config.image is not None:
        image01 = load_image(config.image, size=info.image_shape[1], channels=info.image_shape[0])
        label = int(config.label or 0)
        description = f"uploaded image (label {label}: {info.class_names[label]})"
    else:
        image01, label = data[config.index]
        description = data.describe(config.index)
    image01 = image01.unsqueeze(0)
    return Scenario(config, info, model, image01, info.normalize(image01), int(label), description)


def current_config() -> ScenarioConfig | None:
    """The scenario chosen in the sidebar of this session (``None`` until an upload is readable)."""
    return st.session_state.get(K_CONFIG)


def require_scenario() -> Scenario:
    """The sidebar's scenario, or an info/error box and the end of this page's run."""
    config = current_config()
    if config is None:
        st.info("Choose an image in the sidebar: a dataset image, or upload a PNG or JPEG.")
        st.stop()
    try:
        return load_scenario(config)
    except LavpError as exc:
        show_error(exc, "Change the choice in the sidebar.")
        st.stop()


def describe_config(config: ScenarioConfig) -> str:
    image = "uploaded image" if config.image else f"{config.dataset} #{config.index}"
    weights = "trained" if config.weights == "trained" else f"random (seed {config.seed})"
    return f"{image} · {config.arch} · {weights} weights"


def _save_upload(data: bytes, name: str) -> str:
    """Keep an uploaded file under a name made from its content (so it can be part of a cache key)."""
    folder = Path(tempfile.gettempdir()) / "lavp-explorer-uploads"
    folder.mkdir(parents=True, exist_ok=True)
    suffix = Path(name).suffix.lower()[:8] or ".img"
    path = folder / f"{hashlib.sha256(data).hexdigest()[:24]}{suffix}"
    if not path.is_file():
        tmp = path.with_suffix(path.suffix + f".{os.getpid()}.part")
        tmp.write_bytes(data)
        tmp.replace(path)
    return str(path)


def image_archs() -> list[str]:
    """Architectures made for the bundled datasets' 32x32 images."""
    return [spec.name for spec in list_models() if spec.input_size == 32]


def bundled_datasets() -> list[str]:
    """Datasets that need no download or folder (photos, faces)."""
    from lavp_core.data import list_datasets

    return [spec.name for spec in list_datasets() if not spec.needs_root]


def sidebar() -> ScenarioConfig | None:
    """Draw the shared choices in the sidebar; store and return the scenario (``None`` if unusable)."""
    side = st.sidebar
    datasets = bundled_datasets()
    side.header("Client image and model")
    source = side.selectbox("Dataset", [*datasets, UPLOAD], key=K_DATASET,
                            help="Bundled images, or your own PNG/JPEG (resized and centre-cropped to 32x32).")
    config: ScenarioConfig | None = None
    if source == UPLOAD:
        stats = side.selectbox("Normalise and label like", datasets, key=K_UPLOAD_STATS,
                               help="Your image is normalised with this dataset's statistics and takes one of "
                                    "its labels; trained weights are this dataset's.")
        upload = side.file_uploader("Image file", type=["png", "jpg", "jpeg", "bmp", "gif", "webp"], key=K_UPLOAD)
        names = dataset_table(stats).class_names
        label = side.selectbox("Its label", range(len(names)), format_func=lambda i: f"{i}: {names[i]}",
                               key=K_UPLOAD_LABEL)
        dataset = stats
        if upload is None:
            side.info("Upload a PNG or JPEG file to use it as the client's image.")
        else:
            data = upload.getvalue()
            try:
                thumb = load_image(data, size=32)
            except LavpError as exc:
                with side:
                    show_error(exc, "Upload another file, or pick a bundled dataset.")
            else:
                side.image(upscale(to_uint8_image(thumb), 4), caption=f"{upload.name} (as the model sees it)",
                           output_format="PNG")
                config = ScenarioConfig(dataset=stats, image=_save_upload(data, upload.name), label=int(label))
    else:
        dataset = source
        table = dataset_table(source)
        if st.session_state.get(K_INDEX, 0) >= len(table):
            st.session_state[K_INDEX] = 0
        index = side.number_input(f"Image index (0 to {len(table) - 1})", min_value=0, max_value=len(table) - 1,
                                  step=1, key=K_INDEX)
        side.image(upscale(table.images[int(index)], 4), caption=table.descriptions[int(index)], output_format="PNG")
        config = ScenarioConfig(dataset=source, index=int(index))
    archs = image_archs()
    arch = side.selectbox("Architecture", archs, key=K_ARCH,
                          help="cnn-rconv and mlp-rconv are the architectures the analytical R-CONV attack inverts.")
    has_trained = trained_checkpoint_path(arch, dataset).is_file()
    options = ["random", "trained"] if has_trained else ["random"]
    if st.session_state.get(K_WEIGHTS) not in options:
        st.session_state[K_WEIGHTS] = "random"
    weights = side.radio("Weights", options, key=K_WEIGHTS, horizontal=True,
                         help="trained: the bundled checkpoint for this architecture and dataset" if has_trained
                         else f"no bundled checkpoint for {arch} on {dataset}: random weights only")
    seed = side.number_input("Seed", min_value=0, max_value=2**31 - 1, step=1, key=K_SEED,
                             help="Seed of the random weights and of the attacks' random starts.")
    if config is not None:
        config = ScenarioConfig(dataset=config.dataset, index=config.index, arch=arch, weights=weights,
                                seed=int(seed), image=config.image, label=config.label)
    st.session_state[K_CONFIG] = config
    return config


def keep_page_settings() -> None:
    """Re-store every page setting so that it survives runs of other pages (Streamlit forgets the value
    of a widget that a run does not draw)."""
    for key in list(st.session_state):
        if isinstance(key, str) and key.startswith(PAGE_PREFIXES):
            st.session_state[key] = st.session_state[key]


def keep_valid(key: str, options: Sequence) -> None:
    """Forget a stored choice that is no longer among ``options`` (e.g. after opening another database)."""
    if key in st.session_state and st.session_state[key] not in list(options):
        del st.session_state[key]


def init_sidebar_state() -> None:
    """Defaults of the sidebar's widgets (set once per session, before the widgets are drawn)."""
    defaults = {K_DATASET: "photos", K_INDEX: 0, K_ARCH: "lenet", K_WEIGHTS: "random", K_SEED: 0,
                K_UPLOAD_STATS: "photos", K_UPLOAD_LABEL: 0}
    for key, value in defaults.items():
        st.session_state.setdefault(key, value)


# --------------------------------------------------------------------------------------------
# Images and charts


def upscale(image: np.ndarray | torch.Tensor, factor: int = 6) -> np.ndarray:
    """A uint8 (H, W, 3) image (or a [0, 1] tensor) enlarged by pixel repetition (no blur)."""
    if isinstance(image, torch.Tensor):
        image = to_uint8_image(image)
    return np.repeat(np.repeat(np.asarray(image), factor, axis=0), factor, axis=1)


def loss_curve(history: Sequence[tuple[int, float]], *, title: str = "Matching loss", height: int = 260):
    """A plotly line of (step, loss) on a log y axis (non-positive and NaN values are left out)."""
    import plotly.graph_objects as go

    points = [(s, v) for s, v in history if v is not None and math.isfinite(v) and v > 0]
    fig = go.Figure(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
                               marker={"size": 4}, name="best matching loss"))
    fig.update_layout(title=title, height=height, margin={"l": 10, "r": 10, "t": 40, "b": 10},
                      xaxis_title="step", yaxis_title="matching loss (log)", showlegend=False)
    fig.update_yaxes(type="log", dtick="D2")  # labels at 1, 2, 5 of each decade only
    return fig


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


PROXY_LABELS = {
    "grad_norm": "‖g*‖, the gradient norm (baseline)",
    "l2_max": "λ_max of H_L2 (paper: max)",
    "l2_min": "λ_min of H_L2 (paper: min)",
    "cos_max": "λ_max of H_cos (paper: ang_max)",
    "cos_min": "λ_min of H_cos (paper: ang_min)",
    "cos_layer_max": "λ_max of H_cos-layer",
    "cos_layer_min": "λ_min of H_cos-layer",
    "fusion": "√(l2_max · cos_min), loss-agnostic LAVP",
}


def proxies_frame(result) -> pd.DataFrame:
    """A :class:`lavp_core.proxies.ProxyResult` as a table: proxy, meaning, value, converged."""
    rows = [(name, PROXY_LABELS.get(name, name), fmt(value, 5), "yes" if result.converged(name) else "no")
            for name, value in result.items()]
    return pd.DataFrame(rows, columns=["proxy", "meaning", "value", "converged"])


# --------------------------------------------------------------------------------------------
# Background work shown live


def live_area(render: Callable[[], None], is_running: Callable[[], bool], *, interval: float = POLL_SECONDS) -> None:
    """Draw ``render()`` in a fragment that redraws itself every ``interval`` seconds while
    ``is_running()``; when the work ends the whole page reruns once (buttons, final results)."""
    polling = is_running()

    def body() -> None:
        running = is_running()
        render()
        if polling and not running:
            st.rerun()

    st.fragment(run_every=interval if polling else None)(body)()


METHOD_WORK = {"exact": "forming the dense Hessians and diagonalising them",
               "lanczos": "running Lanczos iterations", "paper": "running the paper's power iterations"}


def proxies_task(config: ScenarioConfig, method: str) -> BackgroundTask:
    """The shared background computation of every proxy of ``config``'s image with ``method``."""
    from lavp_core.proxies import compute_proxies

    def compute(control: TaskControl):
        control.report(0.0, "waiting for another proxy computation to end")
        with FORWARD_AD_LOCK:  # one proxy computation at a time per process (see lavp_core.jobs)
            control.report(0.0, METHOD_WORK.get(method, f"computing the proxies ({method})"))
            scenario = load_scenario(config)
            return compute_proxies(scenario.model, scenario.image, scenario.label, losses=("l2", "cos"),
                                   method=method)

    return shared_tasks().submit(("proxies", config, method), compute, name=f"lavp-proxies-{method}")


def known_proxies_task(config: ScenarioConfig, method: str) -> BackgroundTask | None:
    """The shared proxies computation of ``config`` with ``method`` if one was started (else ``None``)."""
    return shared_tasks().get(("proxies", config, method))


# --------------------------------------------------------------------------------------------
# Study databases


def study_db_default() -> Path:
    """The database the Study and Rankings pages open first: ``$LAVP_STUDY_DB`` or the bundled study."""
    override = os.environ.get(STUDY_DB_ENV)
    return Path(override) if override else BUNDLED_STUDY


def create_study_hint(path: Path) -> str:
    return (f"No results database at `{path}`. Create one with the command line, for example\n\n"
            f"```bash\npython -m lavp_core study --db {path} --archs lenet --weights random --images 20\n```\n\n"
            f"(add `--archs lenet,resnet8 --weights trained --images 100` for the paper-sized study), "
            f"then reload this page or give its path below.")


@st.cache_data(max_entries=8, show_spinner="Reading the results database…")
def study_results(path: str, mtime: float, size: int, study: str | None = None) -> pd.DataFrame:
    """Finished jobs of a results database (``mtime`` and ``size`` key the cache to the file's version),
    only those of study ``study`` when given."""
    from lavp_core.study import load_results

    return load_results(path, study=study)


def _version(path: Path) -> tuple[float, int]:
    """(modification time including the WAL file, size): keys the caches to the file's content."""
    stat = path.stat()
    wal = path.with_name(path.name + "-wal")
    return max(stat.st_mtime, wal.stat().st_mtime if wal.is_file() else 0.0), stat.st_size


def read_study(path: str | Path, study: str | None = None) -> pd.DataFrame:
    """:func:`study_results` for the file's current version (raises :class:`LavpError` when unusable)."""
    from lavp_core.errors import StoreError

    path = Path(path)
    if not path.is_file():
        raise StoreError(f"results database {path} does not exist; create it with "
                         f"'python -m lavp_core study --db {path} ...' or give another path")
    return study_results(str(path), *_version(path), study)


@st.cache_data(max_entries=8, show_spinner=False)
def _study_progress(path: str, mtime: float, size: int) -> list[dict]:
    from lavp_core.store import open_store

    with open_store(path, readonly=True) as store:
        return store.studies()


def pick_study(path: str | Path, prefix: str) -> str | None:
    """A select box of the study names in the database when it holds more than one (their jobs must not
    be mixed in one correlation); the chosen name, or ``None`` when the file holds one study or none."""
    path = Path(path)
    if not path.is_file():  # read_study says what is wrong with the path
        return None
    names = sorted({str(s["name"]) for s in _study_progress(str(path), *_version(path))})
    if len(names) <= 1:
        return None
    keep_valid(f"{prefix}.study", names)
    return st.selectbox("Study in this database", names, key=f"{prefix}.study",
                        help="each study's jobs are analysed on their own")


def show_study_progress(path: str | Path) -> None:
    """A notice under the database picker when a study in the file is unfinished (a partial study still
    gives every plot and table, from the jobs that are done), with how to complete it."""
    path = Path(path)
    for study in _study_progress(str(path), *_version(path)):
        jobs, done = int(study["jobs"] or 0), int(study["done"] or 0)
        if done < jobs:
            st.warning(f"Partial study: {done} of {jobs} jobs of study '{study['name']}' are finished, so the "
                       f"plots and correlations use those {done}. The runner is resumable: rerunning the "
                       f"`python -m lavp_core study … --db {path.name}` command that made it skips the finished "
                       f"jobs and adds the rest.", icon=":material/hourglass_top:")


def database_picker(prefix: str) -> str | None:
    """Radio 'bundled study' / 'a file' (+ its path); returns the chosen path, or ``None`` after an info box
    saying how to create the bundled study when it is missing."""
    default_db = study_db_default()
    st.session_state.setdefault(f"{prefix}.source", "bundled")
    st.session_state.setdefault(f"{prefix}.path", "results.sqlite")
    source = st.radio("Results database", ["bundled", "file"], horizontal=True, key=f"{prefix}.source",
                      format_func={"bundled": f"the bundled study ({default_db.name})",
                                   "file": "a database made with the command line"}.get)
    if source == "file":
        path = st.text_input("Path of the results database", key=f"{prefix}.path",
                             help="made with: python -m lavp_core study --db PATH ...")
        if not path.strip():
            st.info("Give the path of a results database made with `python -m lavp_core study --db PATH`.")
            return None
        return path.strip()
    if not default_db.is_file():
        st.info(create_study_hint(default_db), icon=":material/info:")
        return None
    return str(default_db)


@st.cache_data(max_entries=512, show_spinner=False)
def study_images(path: str, job_key: str) -> tuple[bytes | None, bytes | None]:
    """(reconstruction PNG, ground-truth PNG) stored for one job."""
    from lavp_core.store import open_store

    with open_store(path, readonly=True) as store:
        return store.images(job_key)


def pick_disagreeing_images(df: pd.DataFrame, arch: str, *, count: int = 4, dataset: str | None = None,
                            flavour: str = "exact", max_candidates: int = 24) -> list[int]:
    """``count`` image indices whose MSE rankings under the L2 and the cosine attack disagree most
    (lowest Kendall τ between them), ties broken by how well each loss's own LAVP (``l2_max``,
    ``cos_min``) predicts its ranking: the situation of the paper's Figure 1b/1c.

    Only images with results for both losses on ``arch`` count; the ``max_candidates`` images whose MSE
    ranks differ most between the losses are searched exhaustively. Fewer than ``count`` usable images:
    all of them.
    """
    from lavp_core.study import proxy_column

    sub = df[df["arch"] == arch]
    if dataset is not None:
        sub = sub[sub["dataset"] == dataset]
    if sub.empty or not {"l2", "cos"} <= set(sub["loss"]):
        return sorted(int(i) for i in sub["image_index"].unique())[:count]
    mse = sub.pivot_table(index="image_index", columns="loss", values="mse", aggfunc="first")[["l2", "cos"]]
    mse = mse.dropna()
    if len(mse) <= count:
        return sorted(int(i) for i in mse.index)
    ranks = mse.rank()
    spread = (ranks["l2"] - ranks["cos"]).abs().sort_values(ascending=False, kind="stable")
    candidates = sorted(int(i) for i in spread.index[:max_candidates])
    per_image = sub.drop_duplicates("image_index").set_index("image_index").reindex(candidates)

    def signs(values) -> np.ndarray:  # (n, n): sign(v_i - v_j), 0 where either is NaN
        v = np.asarray(values, dtype=float)
        out = np.sign(v[:, None] - v[None, :])
        return np.nan_to_num(out, nan=0.0)

    combos = np.array(list(itertools.combinations(range(len(candidates)), count)))  # (K, count)
    pairs = list(itertools.combinations(range(count), 2))

    def tau(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # Kendall's τ-a of every combination, (K,)
        s = a * b
        return np.mean([s[combos[:, i], combos[:, j]] for i, j in pairs], axis=0)

    l2, cos = signs(mse.loc[candidates, "l2"]), signs(mse.loc[candidates, "cos"])
    disagreement = tau(l2, cos)
    fit = np.zeros(len(combos))
    for mse_signs, proxy in ((l2, "l2_max"), (cos, "cos_min")):
        column = proxy_column(proxy, flavour)
        if column in per_image:
            fit += tau(signs(per_image[column]), mse_signs)
    best = int(np.lexsort((-fit, disagreement))[0])  # lowest τ(L2, cos), then best LAVP fit
    return [candidates[i] for i in combos[best]]


def png_array(png: bytes, factor: int = 3) -> np.ndarray:
    """A stored PNG as a uint8 array, enlarged by pixel repetition."""
    import io

    from PIL import Image

    return upscale(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), factor)


def scratch_db() -> Path:
    """The results database where the app stores attacks it runs for the Rankings page (a cache: rerunning
    the same attacks reads them back)."""
    folder = Path(tempfile.gettempdir()) / "lavp-explorer"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "app-rankings.sqlite"


class _Cancelled(Exception):
    """Raised from a study's per-job callback to end it early (finished jobs stay stored)."""


def new_attacks_task(config, db: str) -> BackgroundTask:
    """Run the study ``config`` (a :class:`lavp_core.study.StudyConfig`) into ``db`` in the background,
    shared by sessions; its result is the DataFrame of exactly that study's jobs."""
    from lavp_core.study import load_results, plan_study, run_study

    def work(control: TaskControl):
        plan = plan_study(config)
        total = len(plan.jobs)
        done = [0]

        def on_job(outcome, action) -> None:
            done[0] += 1
            control.report(done[0] / total, f"{done[0]} of {total} attacks done")
            if control.cancelled:
                raise _Cancelled

        control.report(0.0, "waiting for a proxy computation to end")
        with FORWARD_AD_LOCK:  # the jobs compute proxies in this process (see lavp_core.jobs)
            control.report(0.0, f"0 of {total} attacks done")
            try:
                run_study(plan, db, workers=0, progress=False, on_job=on_job)
            except _Cancelled:
                pass
        df = load_results(db)
        keys = {job.key for job in plan.jobs}
        return df[df["job_key"].isin(keys)].reset_index(drop=True) if not df.empty else df

    return shared_tasks().submit(("study", config, db), work, name="lavp-rankings")
