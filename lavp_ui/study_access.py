"""Study databases as the Study and Rankings pages open them: which file, which study in it, its rows,
its progress and its stored images (each read cached by the file's version)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from lavp_core.errors import StoreError
from lavp_core.store import open_store
from lavp_core.study import load_results

from .sidebar import keep_valid

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_STUDY = ROOT / "assets" / "study" / "photos-default.sqlite"
STUDY_DB_ENV = "LAVP_STUDY_DB"  # overrides the bundled study's path (used by the tests)


def study_db_default() -> Path:
    """The database the Study and Rankings pages open first: ``$LAVP_STUDY_DB`` or the bundled study."""
    override = os.environ.get(STUDY_DB_ENV)
    return Path(override) if override else BUNDLED_STUDY


def create_study_hint(path: Path) -> str:
    return (f"No results database at `{path}`. Create one with the command line, for example\n\n"
            f"```bash\npython -m lavp_core study --db {path} --archs lenet --weights random --images 20\n```\n\n"
            f"(add `--archs lenet,resnet8 --weights trained --images 100` for the paper-sized study), "
            f"then reload this page or give its path below.")


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
    with open_store(path, readonly=True) as store:
        return store.images(job_key)


def scratch_db() -> Path:
    """The results database where the app stores attacks it runs for the Rankings page (a cache: rerunning
    the same attacks reads them back)."""
    folder = Path(tempfile.gettempdir()) / "lavp-explorer"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "app-rankings.sqlite"
