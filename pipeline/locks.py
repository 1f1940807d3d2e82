"""One writer per run folder (and per sweep store): an OS lock that a crashed holder cannot leave behind.

Two `rotaq run` into one folder used to corrupt each other (one swapped a stage folder under the other,
whose table then showed the other's numbers). The lock is `flock` on `<folder>/.rotaq.lock`: the kernel
drops it when the holder dies, however it dies, so there is no stale lock to recover; the holder writes
its pid into the file so a refused process can say who holds it.

Why fcntl and not the `filelock` package: filelock opens the lock file with O_TRUNC before trying to
lock it, so a refused process would erase the holder's pid that the error message names.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from rotaq.pipeline.errors import RotaqError

LOCK_NAME = ".rotaq.lock"

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None  # type: ignore[assignment]

_held: dict[Path, int] = {}  # lock file -> how many times this process holds it (a sweep, then its variants)


class FolderBusyError(RotaqError):
    """Another live process writes into the folder."""


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold the folder's lock for the block, or fail at once (never wait: a queued run would silently
    reuse what the other wrote). Re-entrant within one process."""
    lock_path = (Path(folder) / LOCK_NAME).resolve()
    if lock_path in _held or fcntl is None:
        _held[lock_path] = _held.get(lock_path, 0) + 1
        try:
            yield
        finally:
            _release_count(lock_path)
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise FolderBusyError(f"{folder} is in use by another rotaq process ({_holder(descriptor)}); wait for "
                                  "it to finish or pick another --out") from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        _held[lock_path] = 1
        try:
            yield
        finally:
            _release_count(lock_path)
    finally:
        os.close(descriptor)  # closing releases the flock


def _release_count(lock_path: Path) -> None:
    _held[lock_path] -= 1
    if not _held[lock_path]:
        del _held[lock_path]


def _holder(descriptor: int) -> str:
    text = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
    return f"pid {text}" if text.isdigit() else "pid unknown"
