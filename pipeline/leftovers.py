"""Temporary files and folders named after their writer's pid, so a later writer can tell a killed one's
leftovers (SIGKILL, power loss: no `finally` ran) from a live one's work in progress and remove them."""

from __future__ import annotations

import glob
import os
import shutil
import uuid
from pathlib import Path


def owned_name(stem: str) -> str:
    """`STEM-PID-HEX`: unique, and it names its owner."""
    return f"{stem}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def owner_is_gone(name: str, stem: str) -> bool:
    """True when `name` is `STEM-PID-...` and PID is not a live process, or it carries no pid at all
    (an older rotaq's leftover, which never had one)."""
    owner = name.removeprefix(f"{stem}-").split("-")[0].split(".")[0]
    return not (owner.isdigit() and process_is_alive(int(owner)))


def dead_owners(folder: Path, stem: str) -> list[Path]:
    """The `STEM-PID-...` entries in `folder` whose writer is gone, oldest name first."""
    return [path for path in sorted(Path(folder).glob(f"{glob.escape(stem)}-*")) if owner_is_gone(path.name, stem)]


def process_is_alive(pid: int) -> bool:
    """Whether a process with this pid exists (signal 0 checks without sending anything). A recycled pid
    reads as alive: the leftover is then kept, the safe side."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
