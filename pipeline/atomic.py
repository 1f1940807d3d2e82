"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rotaq.pipeline.leftovers import dead_owners, owned_name, remove_path


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write to a temporary file in the same folder, then rename it over `path` in one step. The file gets
    the mode a plain `open()` would give it (0666 less the umask), not a temporary file's 0600; a full
    disk is a one-line error naming the file, with the previous file intact."""
    from rotaq.pipeline.artifacts import is_disk_full
    from rotaq.pipeline.errors import RotaqError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    stem = f".{path.name}.tmp"
    for leftover in dead_owners(path.parent, stem):  # a writer killed between write and rename
        remove_path(leftover)
    tmp = path.parent / owned_name(stem)
    try:
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and is_disk_full(exc):
            raise RotaqError(f"disk full while writing {path}; the previous file is intact") from exc
        raise


def write_json_atomic(path: Path, payload: Any) -> None:
    atomic_write(path, json.dumps(payload, indent=2, default=str) + "\n")
