"""Progress bars that suit where the output goes.

On a terminal, tqdm redraws one line in place. Written to a file or a CI log, every redraw is kept, so a
demo log became thousands of progress lines; there a bar updates at most every LOG_INTERVAL_S seconds
(and once when it ends), which keeps a line every ~10 s for long stages and one line for short ones.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 10.0


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or file-like objects without isatty
        return False


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """`tqdm(iterable, **kwargs)`, with redraws spaced LOG_INTERVAL_S apart unless the stream is a terminal."""
    stream = kwargs.get("file") or sys.stderr
    if not _is_terminal(stream):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", LOG_INTERVAL_S)
    return tqdm(iterable, **kwargs)
