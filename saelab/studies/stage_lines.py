"""A study's progress: rich bars on a terminal, plain stage lines where nobody sees the bars.

    with study_progress() as stage:
        update = stage("sample lists", 138)   # -> update(done)
        run_lists(cfg, out, stage)

Rich draws nothing when its stream is not a terminal, so `saelab demo | tee log`
or a job under nohup was silent for the whole run. There each stage prints a
line when it starts, at every quarter, and when it ends, with the time taken:

    [01:02:03] sample lists: 0/138
    [01:02:40] sample lists: 35/138
    [01:05:10] sample lists: 138/138 done in 187 s
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

Update = Callable[[int], None]
Stage = Callable[[str, int], Update]


def line_stage(stream: IO[str], clock: Callable[[], float] = time.monotonic,
               stamp: Callable[[], str] = lambda: time.strftime("%H:%M:%S")) -> Stage:
    """A stage factory that writes plain lines to `stream` (flushed, so a pipe shows them)."""

    def stage(name: str, total: int) -> Update:
        start, shown = clock(), -1  # shown: the last quarter printed

        def write(text: str) -> None:
            stream.write(f"[{stamp()}] {name}: {text}\n")
            stream.flush()

        def update(done: int) -> None:
            nonlocal shown
            done = min(done, total)
            quarter = 4 if total <= 0 or done >= total else 4 * done // total
            if quarter <= shown:
                return
            shown = quarter
            if quarter == 4:
                write(f"{done:,}/{total:,} done in {clock() - start:.0f} s")
            else:
                write(f"{done:,}/{total:,}")

        update(0)
        return update

    return stage


def _tty(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@contextmanager
def study_progress(*, json: bool = False) -> Iterator[Stage]:
    """Rich bars on stderr when it is a terminal; stage lines on stderr when it is not; and
    stage lines on stdout too when only stdout is piped (`| tee log`) and it does not carry
    --json output."""
    from saelab.console import progress

    if not _tty(sys.stderr):
        yield line_stage(sys.stderr)
        return
    lines = None if json or _tty(sys.stdout) else line_stage(sys.stdout)
    with progress() as bar:

        def stage(name: str, total: int) -> Update:
            task = bar.add_task(name, total=max(total, 1), info="")
            also = lines(name, total) if lines else None

            def update(done: int) -> None:
                bar.update(task, completed=min(done, total), info=f"{done:,}/{total:,}")
                if also:
                    also(done)

            return update

        yield stage
