"""The shared sidebar and what it chooses: the scenario (image, model) of this session.

``app.py`` draws :func:`sidebar` on every run, so its choices keep their values across pages; a page reads
them with :func:`current_config` or :func:`require_scenario`. The model and the dataset's thumbnails are
cached once per server and shared by every session (read-only).

An upload is checked (at most :attr:`~lavp_ui.serving.Limits.max_image_pixels`, read from its header) and
decoded once per file, not on every rerun; it is kept in the process's private folder as this session's own
file (:mod:`lavp_ui.files`), removed when the session ends.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import streamlit as st
import torch

from lavp_core.data import list_datasets, load_dataset, load_image
from lavp_core.errors import ImageError, LavpError
from lavp_core.metrics import to_uint8_image
from lavp_core.models import list_models, trained_checkpoint_path
from lavp_core.scenario import Scenario, ScenarioConfig, build_model, build_scenario

from .files import is_private, read_private, remove_owner_files, save_private
from .formatting import show_error, upscale
from .serving import job_board, limits, session_token

DEVICE = "cpu"  # the app's models, attacks and proxies (a shared server: one device for every session)
UPLOAD = "upload an image"

# Session-state keys of the shared sidebar (kept across pages because app.py draws them on every run).
K_DATASET, K_INDEX, K_ARCH, K_WEIGHTS, K_SEED = "side.dataset", "side.index", "side.arch", "side.weights", "side.seed"
K_UPLOAD, K_UPLOAD_LABEL, K_UPLOAD_STATS = "side.upload", "side.upload_label", "side.upload_stats"
K_CONFIG = "side.config"
K_SAVED = "serve.upload_file"  # (upload's content digest, the private file it was saved to)
K_DIGEST = "serve.upload_digest"  # {upload's file id: its content digest}
K_CLEANUP = "serve.cleanup"  # set once the session's files are to be removed when it ends
# Pages' widget keys start with these prefixes; app.py re-stores them on every run so that Streamlit does
# not drop a page's settings while another page is shown. Buttons, uploaders and chart selections (which
# cannot be set) use keys outside these prefixes ("btn.", "sel.").
PAGE_PREFIXES = ("attack.", "proxies.", "study.", "rankings.")


# --------------------------------------------------------------------------------------------
# Caches shared by every session


@st.cache_resource(max_entries=12, show_spinner=False)
def cached_model(arch: str, weights: str, seed: int, dataset: str) -> torch.nn.Module:
    """The model of (arch, weights, seed, dataset) on :data:`DEVICE`, shared by every session: treat it as
    read-only (attacks and proxies work on private copies)."""
    info = load_dataset(dataset, "val").info
    return build_model(ScenarioConfig(dataset=dataset, arch=arch, weights=weights, seed=seed), info, DEVICE)


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


# --------------------------------------------------------------------------------------------
# The scenario


def load_scenario(config: ScenarioConfig) -> Scenario:
    """:func:`lavp_core.scenario.build_scenario` with the shared cached model (its label and input-shape
    checks included); raises :class:`LavpError` on bad input. An upload's scenario is built once per
    configuration (its file is decoded once), as long as its file is there."""
    if config.image is not None and is_private(config.image):
        if not Path(config.image).is_file():
            raise ImageError("the uploaded image is no longer on the server; upload it again")
        return _upload_scenario(config)
    image_bytes = None
    if config.image is not None:
        try:
            image_bytes = Path(config.image).read_bytes()
        except OSError as exc:
            raise ImageError(f"the uploaded image is no longer on the server ({exc.strerror}); "
                             f"upload it again") from exc
    model = cached_model(config.arch, config.weights, config.seed, config.dataset)
    return build_scenario(config, device=DEVICE, image_bytes=image_bytes, model=model)


@st.cache_resource(max_entries=32, show_spinner=False)
def _upload_scenario(config: ScenarioConfig) -> Scenario:
    """The scenario of an upload this server saved (read back only if its content is unchanged); shared
    read-only, like the model in it."""
    model = cached_model(config.arch, config.weights, config.seed, config.dataset)
    return build_scenario(config, device=DEVICE, image_bytes=read_private(config.image), model=model)


@st.cache_data(max_entries=16, show_spinner=False)
def upload_preview(digest: str, _data: bytes, max_pixels: int) -> tuple[np.ndarray | None, str | None]:
    """(the upload as the model sees it, as a uint8 thumbnail; or the message saying why it is refused),
    decoded once per content (``digest``, its SHA-256) rather than on every rerun."""
    try:
        return to_uint8_image(load_image(_data, size=32, max_pixels=max_pixels)), None
    except LavpError as exc:
        return None, str(exc)


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


def keep_session_file(data: bytes, name: str, file_key: str, state_key: str = K_SAVED) -> str:
    """Save an upload as this session's private file (once per uploaded file); the session's files are
    removed when it ends. Returns the file's path (stable for the same upload, so usable in cache keys)."""
    saved = st.session_state.get(state_key)
    if saved is not None and saved[0] == file_key and Path(saved[1]).is_file():
        return saved[1]
    token = session_token()
    path = str(save_private(data, name, token))
    st.session_state[state_key] = (file_key, path)
    if not st.session_state.get(K_CLEANUP):
        job_board().on_owner_gone(token, lambda: remove_owner_files(token))
        st.session_state[K_CLEANUP] = True
    return path


def upload_key(upload, data: bytes) -> str:
    """The SHA-256 of an upload's content (what its decoding is cached by), computed once per uploaded file
    (Streamlit's file id) rather than on every rerun."""
    file_id = str(getattr(upload, "file_id", "") or "")
    known = st.session_state.setdefault(K_DIGEST, {})
    if file_id and file_id in known:
        return known[file_id]
    digest = hashlib.sha256(data).hexdigest()
    if file_id:
        if len(known) >= 8:  # a few uploads of this session (its image, a database per page)
            known.pop(next(iter(known)))
        known[file_id] = digest
    return digest


def image_archs() -> list[str]:
    """Architectures made for the bundled datasets' 32x32 images."""
    return [spec.name for spec in list_models() if spec.input_size == 32]


def bundled_datasets() -> list[str]:
    """Datasets that need no download or folder (photos, faces)."""
    return [spec.name for spec in list_datasets() if not spec.needs_root]


# --------------------------------------------------------------------------------------------
# The sidebar and the session state it keeps


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
        allowed = limits()
        upload = side.file_uploader("Image file", type=["png", "jpg", "jpeg", "bmp", "gif", "webp"], key=K_UPLOAD,
                                    max_upload_size=allowed.max_upload_mb,
                                    help=f"At most {allowed.max_upload_mb} MB and "
                                         f"{allowed.max_image_pixels / 1e6:g} megapixels.")
        names = dataset_table(stats).class_names
        label = side.selectbox("Its label", range(len(names)), format_func=lambda i: f"{i}: {names[i]}",
                               key=K_UPLOAD_LABEL)
        dataset = stats
        if upload is None:
            side.info("Upload a PNG or JPEG file to use it as the client's image.")
        else:
            data = upload.getvalue()
            key = upload_key(upload, data)
            thumb, refused = upload_preview(key, data, allowed.max_image_pixels)
            if refused is not None:
                with side:
                    show_error(ImageError(refused), "Upload another file, or pick a bundled dataset.")
            else:
                side.image(upscale(thumb, 4), caption=f"{upload.name} (as the model sees it)", output_format="PNG")
                path = keep_session_file(data, upload.name, key)
                config = ScenarioConfig(dataset=stats, image=path, label=int(label))
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
        config = replace(config, arch=arch, weights=weights, seed=int(seed))
    st.session_state[K_CONFIG] = config
    return config


def init_sidebar_state() -> None:
    """Defaults of the sidebar's widgets (set once per session, before the widgets are drawn)."""
    defaults = {K_DATASET: "photos", K_INDEX: 0, K_ARCH: "lenet", K_WEIGHTS: "random", K_SEED: 0,
                K_UPLOAD_STATS: "photos", K_UPLOAD_LABEL: 0}
    for key, value in defaults.items():
        st.session_state.setdefault(key, value)


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
