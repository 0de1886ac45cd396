"""Study databases as the Study and Rankings pages open them: which file, which study in it, its rows,
its progress and its stored images (each read cached by the file's version).

A page opens only databases the server offers: the bundled studies (``assets/study/*.sqlite``, or
``$LAVP_STUDY_DB`` in their place), the ``.sqlite`` files of the results folder the server was started
with (``$LAVP_RESULTS_DIR``), or a file the user uploads (kept as that session's private file). No path
typed in the browser is ever opened, and every database is opened read-only.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import streamlit as st

from lavp_core.errors import StoreError
from lavp_core.store import open_store
from lavp_core.study import load_results

from .files import private_dir
from .serving import limits
from .sidebar import keep_session_file, keep_valid, upload_key

ROOT = Path(__file__).resolve().parent.parent
STUDY_DIR = ROOT / "assets" / "study"
BUNDLED_STUDY = STUDY_DIR / "photos-random.sqlite"  # the default: the cosine attack leaks there
BUNDLED_LABELS = {  # the bundled studies by name, in the picker's order
    "photos-random.sqlite": "random-weight lenet (the cosine attack leaks)",
    "photos-random-alexnet.sqlite": "random-weight alexnet, 500 steps (both attacks leak)",
    "photos-training.sqlite": "training snapshots (epochs 0, 1, 5, 40)",
    "photos-trained.sqlite": "trained (attacks fail)",
}
STUDY_DB_ENV = "LAVP_STUDY_DB"  # overrides the bundled study's path (used by the tests)
RESULTS_DIR_ENV = "LAVP_RESULTS_DIR"  # a folder of results databases the server offers (made with `study --db`)
SOURCES = {"bundled": "a bundled study", "server": "the server's results folder", "upload": "upload a database"}


def study_db_default() -> Path:
    """The database the Study and Rankings pages open first: ``$LAVP_STUDY_DB`` or the bundled study."""
    override = os.environ.get(STUDY_DB_ENV)
    return Path(override) if override else BUNDLED_STUDY


def bundled_studies() -> list[Path]:
    """The default database first, then the other bundled studies (``assets/study/*.sqlite``) that exist
    (the random-weight study is the default; when it is not there, the first bundled study that is)."""
    default = study_db_default()
    if STUDY_DB_ENV not in os.environ and not default.is_file():
        present = [p for p in STUDY_DIR.glob("*.sqlite") if p.is_file()]
        order = list(BUNDLED_LABELS)
        present.sort(key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))
        default = present[0] if present else default
    order = list(BUNDLED_LABELS)
    others = sorted((p for p in STUDY_DIR.glob("*.sqlite") if p.is_file() and p.resolve() != default.resolve()),
                    key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))
    return [default, *others]


def study_label(path: str | Path) -> str:
    """A bundled study's name for people ("random-weight lenet (the cosine attack leaks)"), else the file's
    name."""
    name = Path(path).name
    return BUNDLED_LABELS.get(name, name)


def model_state(df: pd.DataFrame) -> str:
    """What the study's models were, in words, from its ``weights`` and ``arch`` columns."""
    if df.empty or "weights" not in df:
        return "unknown (the results carry no weights column)"
    archs = ", ".join(sorted(str(a) for a in df["arch"].dropna().unique()))
    states = sorted({str(w) for w in df["weights"].dropna()}, key=lambda w: (snapshot_epoch(w) or 0, w))
    epochs = [snapshot_epoch(w) for w in states]
    if states and all(e is not None for e in epochs):
        return (f"{archs} at training snapshots after {', '.join(str(e) for e in epochs)} epochs "
                f"({', '.join(states)}), the same images attacked at each")
    words = {"random": "random initial weights, never trained", "trained": "trained weights (the bundled checkpoint)"}
    return f"{archs} with " + "; ".join(words.get(w, f"weights '{w}'") for w in states)


def snapshot_epoch(weights: str) -> int | None:
    """``trained@5`` → 5; anything else → ``None``."""
    head, _, epoch = str(weights).partition("@")
    return int(epoch) if head == "trained" and epoch.isdigit() else None


def results_dir() -> Path | None:
    """The results folder the server was started with (``$LAVP_RESULTS_DIR``), or ``None``."""
    folder = os.environ.get(RESULTS_DIR_ENV, "").strip()
    return Path(folder).resolve() if folder else None


def server_results() -> list[Path]:
    """The ``.sqlite`` files directly in the results folder (links leading outside it are left out)."""
    folder = results_dir()
    if folder is None or not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.sqlite") if p.is_file() and p.resolve().parent == folder)


def create_study_hint(path: Path) -> str:
    return (f"No results database at `{path}`. Create one with the command line, for example\n\n"
            f"```bash\npython -m lavp_core study --db {path} --archs lenet --weights random --images 20\n```\n\n"
            f"(add `--archs lenet,resnet8 --weights trained --images 100` for the paper-sized study), "
            f"then reload this page, or upload the database below.")


def _version(path: Path) -> tuple[float, int]:
    """(modification time including the WAL file, size): keys the caches to the file's content."""
    stat = path.stat()
    wal = path.with_name(path.name + "-wal")
    return max(stat.st_mtime, wal.stat().st_mtime if wal.is_file() else 0.0), stat.st_size


@st.cache_data(max_entries=8, show_spinner="Reading the results database…")
def study_results(path: str, mtime: float, size: int, study: str | None = None) -> pd.DataFrame:
    """Finished jobs of a results database (``mtime`` and ``size`` key the cache to the file's version),
    only those of study ``study`` when given."""
    return load_results(path, study=study)


def read_study(path: str | Path, study: str | None = None) -> pd.DataFrame:
    """:func:`study_results` for the file's current version (raises :class:`LavpError` when unusable)."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"results database {path} does not exist; create it with "
                         f"'python -m lavp_core study --db {path} ...' or give another path")
    return study_results(str(path), *_version(path), study)


@st.cache_data(max_entries=8, show_spinner=False)
def _study_progress(path: str, mtime: float, size: int) -> list[dict]:
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
    """Where the results come from: a bundled study, a file of the server's results folder, or an upload
    (read-only in every case). Returns the chosen database's path, or ``None`` after an info box saying what
    is missing (how to create the bundled study, which folder is empty, what to upload)."""
    sources = ["bundled"] + (["server"] if results_dir() is not None else []) + ["upload"]
    keep_valid(f"{prefix}.source", sources)
    st.session_state.setdefault(f"{prefix}.source", "bundled")
    source = st.radio("Results database", sources, horizontal=True, key=f"{prefix}.source", format_func=SOURCES.get)
    if source == "server":
        folder, found = results_dir(), server_results()
        if not found:
            st.info(f"The server's results folder holds no `.sqlite` file yet: run a study into it with "
                    f"`python -m lavp_core study --db {folder}/NAME.sqlite`.", icon=":material/info:")
            return None
        names = [p.name for p in found]
        keep_valid(f"{prefix}.server", names)
        name = st.selectbox("Database", names, key=f"{prefix}.server", help=f"the .sqlite files in {folder}")
        return str(found[names.index(name)])
    if source == "upload":
        allowed = limits().max_database_mb
        upload = st.file_uploader("Results database (.sqlite)", type=["sqlite", "db", "sqlite3"],
                                  key=f"up.{prefix}.db", max_upload_size=allowed,
                                  help=f"made with: python -m lavp_core study --db FILE ... (at most {allowed} MB)")
        if upload is None:
            st.info("Upload a results database made with `python -m lavp_core study --db FILE`.")
            return None
        data = upload.getvalue()
        return keep_session_file(data, upload.name, upload_key(upload, data), state_key=f"serve.{prefix}.db")
    found = bundled_studies()
    if len(found) > 1:
        names = [p.name for p in found]
        keep_valid(f"{prefix}.bundled", names)
        name = st.selectbox("Study", names, key=f"{prefix}.bundled", format_func=study_label,
                            help="the bundled studies: random-weight lenet (the cosine attack leaks, L2 mostly "
                                 "fails), random-weight alexnet at 500 steps (both leak), lenet at training "
                                 "snapshots, and trained lenet and resnet8 (attacks fail)")
        chosen = found[names.index(name)]
    else:
        chosen = found[0]
    if not chosen.is_file():
        st.info(create_study_hint(chosen), icon=":material/info:")
        return None
    return str(chosen)


@st.cache_data(max_entries=512, show_spinner=False)
def study_images(path: str, job_key: str) -> tuple[bytes | None, bytes | None]:
    """(reconstruction PNG, ground-truth PNG) stored for one job."""
    with open_store(path, readonly=True) as store:
        return store.images(job_key)


def scratch_db() -> Path:
    """The results database where the app stores attacks it runs for the Rankings page (a cache for this
    server process: rerunning the same attacks reads them back), in the process's private folder."""
    return private_dir() / "app-rankings.sqlite"
