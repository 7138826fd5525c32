"""Progress for the long commands: a tqdm bar on a terminal (stderr; nothing in logs or pipes) and one summary line
at the end (what was done, how many, how long, how fast), so every command says what it did, interactive or not."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def format_duration(seconds: float | None) -> str:
    """'--', '42s', '17m05s', '3h07m', '2d04h'."""
    if seconds is None:
        return "--"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def bar(total: int | None, desc: str, unit: str = "img", enabled: bool = True, initial: int = 0):
    """A tqdm bar on stderr, shown only when stderr is a terminal (and `enabled`: rank 0)."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not enabled or not sys.stderr.isatty(),
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
    )


def summary(done: str, count: int, unit: str, seconds: float) -> str:
    """'<done>: 50000 images in 12m05s (69.0 images/s)'."""
    rate = count / seconds if seconds > 0 else float("inf")
    return f"{done}: {count} {unit} in {format_duration(seconds)} ({rate:.1f} {unit}/s)"


class Timer:
    def __init__(self):
        self.start = time.time()

    @property
    def seconds(self) -> float:
        return time.time() - self.start
