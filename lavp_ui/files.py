"""Files the app writes: uploads and the Rankings page's scratch database, in a private folder of this process.

The folder is made by :func:`tempfile.mkdtemp` (mode 0700: no other user can list, plant or read files in
it) on first use and removed when the process exits. Each upload is written once, with exclusive creation
(``O_CREAT | O_EXCL | O_NOFOLLOW``: an existing file or a planted symlink is never written through), under a
name no one can predict, and belongs to one session: two sessions uploading the same bytes get two files.
A file is read back only if this process wrote it, and only if its content still has the digest it had.
Nothing here draws anything.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import secrets
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from lavp_core.errors import ImageError

_lock = threading.Lock()
_folder: Path | None = None


@dataclass(frozen=True)
class PrivateFile:
    path: Path
    owner: str
    digest: str  # sha256 of the content written


_written: dict[Path, PrivateFile] = {}  # every file this process wrote, by path
_by_content: dict[tuple[str, str, str], Path] = {}  # (owner, digest, suffix) -> its file


def private_dir() -> Path:
    """This process's private folder (created with mode 0700 on first use, removed at exit)."""
    global _folder
    with _lock:
        if _folder is None or not _folder.is_dir():
            _folder = Path(tempfile.mkdtemp(prefix="lavp-explorer-"))
            os.chmod(_folder, 0o700)
            atexit.register(_remove_folder, _folder)
        return _folder


def _remove_folder(folder: Path) -> None:
    from lavp_core.jobs import stop_all

    stop_all()  # jobs still writing into the folder (the scratch database) end first
    shutil.rmtree(folder, ignore_errors=True)


def _suffix(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,7}", suffix) else ".bin"


def save_private(data: bytes, name: str, owner: str) -> Path:
    """Write ``data`` (an upload called ``name``) for session ``owner`` into the private folder, once per
    content: the same bytes from the same session give the same file; from another session, another file."""
    digest = hashlib.sha256(data).hexdigest()
    suffix = _suffix(name)
    key = (owner, digest, suffix)
    folder = private_dir()
    with _lock:
        known = _by_content.get(key)
        if known is not None and known.is_file():
            return known
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        for _ in range(8):  # a name already taken (nothing of ours is ever there) is skipped, never written
            path = folder / f"{secrets.token_hex(16)}{suffix}"  # unpredictable; the owner is kept here, not in it
            try:
                descriptor = os.open(path, flags, 0o600)
                break
            except FileExistsError:
                continue
        else:
            raise ImageError(f"could not store the upload in {folder}: every name tried was taken; restart the app")
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        _written[path] = PrivateFile(path, owner, digest)
        _by_content[key] = path
        return path


def is_private(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file this process wrote into its private folder."""
    with _lock:
        return Path(path) in _written


def read_private(path: str | os.PathLike) -> bytes:
    """The bytes of a file :func:`save_private` wrote, checked against the digest it was written with.

    Raises:
        ImageError: the file is not one this process wrote, is gone, or was changed since.
    """
    path = Path(path)
    with _lock:
        record = _written.get(path)
    if record is None:
        raise ImageError("the uploaded file is not one this server wrote; upload it again")
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(descriptor, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ImageError(f"the uploaded file is no longer on the server ({exc.strerror}); upload it again") from exc
    if hashlib.sha256(data).hexdigest() != record.digest:
        raise ImageError("the uploaded file was changed on the server since it was uploaded; upload it again")
    return data


def remove_owner_files(owner: str) -> int:
    """Delete every file written for session ``owner`` (when it has ended); returns how many."""
    with _lock:
        mine = [record for record in _written.values() if record.owner == owner]
        for record in mine:
            _written.pop(record.path, None)
        for key in [k for k in _by_content if k[0] == owner]:
            _by_content.pop(key)
    for record in mine:
        try:
            record.path.unlink()
        except FileNotFoundError:
            pass
    return len(mine)
