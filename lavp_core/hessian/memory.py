"""Memory of the dense d × d float64 Hessian of the ``exact`` path.

The matrix is mapped without transparent huge pages (:func:`_dense_matrix`), so that only the pages
written become resident; while the chunks of columns run only its upper triangle is written
(:func:`_store_upper`), and the heap keeps the pages a chunk freed for the next chunk
(:func:`retained_heap`); the heap pages torch freed are handed back to the operating system
(:func:`release_freed_memory`, ``malloc_trim``) before the triangle is mirrored a block of rows at a
time (:func:`_mirror_upper`, blocks sized by :func:`_block_rows`), so that no d × d temporary is made.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from ..errors import ProxyError


def _check_finite(h: np.ndarray, loss_name: str) -> None:
    if not np.isfinite(h).all():
        raise ProxyError(f"the Hessian of matching loss {loss_name!r} at x* has non-finite entries: the loss "
                         f"or the model's gradient is not twice differentiable (or overflows) at this "
                         f"image; try another loss, image or model")


def _block_rows(d: int, budget_bytes: int = 16 * 2 ** 20) -> int:
    """Rows of a (rows, d) float64 temporary that fit in ``budget_bytes``."""
    return int(max(16, min(d, budget_bytes // (8 * d))))


def _dense_matrix(d: int) -> np.ndarray:
    """An uninitialised (d, d) float64 matrix whose memory becomes resident only where it is written.

    numpy asks the kernel for transparent huge pages on large arrays (2 MiB each, ~21 rows of a
    d = 12,288 matrix), so writing only the upper triangle would still make the whole matrix resident.
    Large matrices are therefore mapped here with huge pages declined (4 KiB pages), Linux only.
    """
    size = 8 * d * d
    if size < 2 ** 24 or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.empty((d, d), dtype=np.float64)
    buffer = mmap.mmap(-1, size)
    buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buffer, dtype=np.float64).reshape(d, d)


def _store_upper(h: np.ndarray, start: int, rows: np.ndarray, loss_name: str) -> None:
    """Store the upper-triangle part of Hessian rows start … start + c − 1 (c, d) into h (d, d).

    The two triangles of a computed Hessian agree to round-off; keeping one of them (which
    LAPACK's tridiagonal reduction reads anyway) leaves the pages of h's lower triangle untouched
    until :func:`_mirror_upper`, i.e. until the chunks' tensors are gone. For a 64×64×3 input
    (d = 12,288, h = 1.1 GiB) that keeps the peak at one matrix instead of one plus the chunks'.
    """
    _check_finite(rows, loss_name)
    # One block copy: besides the upper triangle it writes the strict lower triangle of the c × c
    # diagonal block (c²/2 values on the same pages), which _mirror_upper overwrites anyway.
    h[start:start + rows.shape[0], start:] = rows[:, start:]


def _mirror_upper(h: np.ndarray) -> None:
    """Copy h's upper triangle onto its lower triangle, a block at a time (no d × d temporary),
    after giving the memory freed by the chunks back to the operating system."""
    release_freed_memory()
    d = h.shape[0]
    block = _block_rows(d)
    for i in range(0, d, block):
        i1 = min(i + block, d)
        square = h[i:i1, i:i1]
        upper = np.triu(square)
        square[...] = upper + np.triu(upper, 1).T
        h[i1:, i:i1] = h[i:i1, i1:].T


_LIBC: ctypes.CDLL | None | bool = False


def _libc() -> ctypes.CDLL | None:
    global _LIBC
    if _LIBC is False:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = None
    return _LIBC  # type: ignore[return-value]


def release_freed_memory() -> None:
    """Ask glibc to hand heap pages freed by torch back to the operating system (``malloc_trim``),
    so that a large allocation that follows does not stack on top of them; a no-op elsewhere."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# glibc's mallopt parameters and the values this module leaves behind (see retained_heap).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_MMAP_MAX_DEFAULT = 65536  # glibc's DEFAULT_MMAP_MAX
_MMAP_THRESHOLD_AFTER = 32 * 2 ** 20  # the largest value glibc's own dynamic threshold reaches (64-bit)
_TRIM_THRESHOLD_AFTER = 2 * _MMAP_THRESHOLD_AFTER
_HEAP_LOCK = threading.Lock()
_HEAP_USERS = 0


@contextmanager
def retained_heap() -> Iterator[None]:
    """Keep the heap's freed pages for reuse while a loop of same-sized chunks runs (glibc only).

    By default glibc serves blocks above its mmap threshold (at most 32 MiB) with a fresh ``mmap``
    and returns a freed top of the heap above its trim threshold to the kernel, so every chunk of
    Hessian columns touches its working memory (hundreds of MB) as fresh pages again: a page fault
    per 4 KiB, a third of the time of a chunk on lenet at 32×32. Inside this context no block is
    mmapped (``M_MMAP_MAX`` 0: large ones come from the heap too) and nothing is trimmed, so each
    chunk reuses the pages of the one before; the peak is unchanged (one chunk's working memory).
    On leaving (the last of several threads to leave), mmap is allowed again with the thresholds
    that glibc's dynamic adjustment reaches on its own for such blocks (32 MiB, trim 64 MiB; setting
    one turns that adjustment off for the process), and the retained pages are handed back
    (``malloc_trim``). A no-op where mallopt is missing.
    """
    global _HEAP_USERS
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        yield
        return
    with _HEAP_LOCK:
        if _HEAP_USERS == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)
        _HEAP_USERS += 1
    try:
        yield
    finally:
        with _HEAP_LOCK:
            _HEAP_USERS -= 1
            if _HEAP_USERS == 0:
                libc.mallopt(_M_MMAP_MAX, _MMAP_MAX_DEFAULT)
                libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_AFTER)
                libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_AFTER)
                release_freed_memory()
