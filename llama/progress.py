"""A sense of time for long work: elapsed time and an estimate of what is left, as one short text.

Used by the training log (every logged step) and by generation (a line on stderr now and then).
"""
import sys
import time


def format_duration(seconds: float) -> str:
    """12s, 3m05s, 2h07m: short, and exact enough for a person waiting."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def elapsed_and_eta(elapsed_s: float, done: int, total: int) -> str:
    """'elapsed 40s, ETA 1m20s' from the work done so far (done of total units, at the same pace)."""
    if done <= 0:
        return f"elapsed {format_duration(elapsed_s)}"
    remaining = elapsed_s / done * max(total - done, 0)
    return f"elapsed {format_duration(elapsed_s)}, ETA {format_duration(remaining)}"


class Progress:
    """Prints `<what>: done/total <unit>, elapsed …, ETA …` to stderr, at most every every_s
    seconds, so short work prints nothing at all. Disabled on every rank but one."""

    def __init__(self, what: str, total: int, unit: str = "tokens", every_s: float = 10.0,
                 enabled: bool = True, stream=None, clock=time.monotonic):
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.enabled, self.stream, self.clock = enabled, stream, clock
        self.started = self.last_shown = clock()

    def update(self, done: int):
        if not self.enabled:
            return
        now = self.clock()
        if now - self.last_shown < self.every_s:
            return
        self.last_shown = now
        stream = self.stream or sys.stderr
        print(f"{self.what}: {done}/{self.total} {self.unit}, "
              f"{elapsed_and_eta(now - self.started, done, self.total)}", file=stream, flush=True)
