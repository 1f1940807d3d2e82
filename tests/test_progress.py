"""Progress output: one redraw per ~10 s in a log, in-place redraws on a terminal."""

from __future__ import annotations

import io

from rotaq.pipeline.progress import LOG_INTERVAL_S, progress_bar


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_start_and_an_end_line_for_a_short_stage() -> None:
    log = io.StringIO()
    for _ in progress_bar(range(500), desc="stage", file=log):
        pass
    redraws = log.getvalue().count("\r")
    assert redraws <= 3 and "500/500" in log.getvalue()  # start, (at most one interval), end


def test_a_terminal_keeps_redrawing_in_place() -> None:
    terminal = FakeTerminal()
    bar = progress_bar(total=3, desc="stage", file=terminal)
    assert bar.mininterval < LOG_INTERVAL_S  # tqdm's own terminal default
    log_bar = progress_bar(total=3, desc="stage", file=io.StringIO())
    assert log_bar.mininterval == LOG_INTERVAL_S
    bar.close()
    log_bar.close()
