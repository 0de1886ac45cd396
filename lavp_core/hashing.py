"""SHA-256 digests of text and of files: job keys, checkpoint fingerprints. A foundation module (no
imports from the rest of ``lavp_core``)."""

from __future__ import annotations

import hashlib
import os


def sha256_text(text: str) -> str:
    """Hex SHA-256 of ``text`` encoded as UTF-8."""
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the bytes of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
