"""Record when each pipeline stage computed, waited and sent, and save it as one Chrome trace.

Every rank keeps a Tracer; rank 0 gathers `tracer.events` from all ranks and calls
write_chrome_trace (one row per rank: with tensor parallelism, a stage's TP ranks are its rows). Open the file in ui.perfetto.dev or chrome://tracing, or draw it with
`python -m llama.tools.plot schedule trace.json --out schedule.svg`.
"""
import contextlib
import json
import time

from llama.formats.files import atomic_write_text

COMPUTE_CATEGORIES = ("forward", "backward")
_DISABLED_SPAN = contextlib.nullcontext()


class Tracer:
    """One stage's spans as Chrome "complete" events (times in microseconds); off, it is a no-op.

    `synchronize` (torch.cuda.synchronize on a GPU, None on the CPU) runs before each clock read,
    so that a span covers the device work queued inside it rather than only the launch.
    """

    def __init__(self, stage: int, enabled: bool, synchronize=None):
        self.stage = stage
        self.enabled = enabled
        self.synchronize = synchronize
        self.events = []

    def span(self, name: str, category: str, **args):
        """`with tracer.span("F3", "forward", micro_batch=3, step=12):` times the block."""
        if not self.enabled:
            return _DISABLED_SPAN
        return self._recorded_span(name, category, args)

    @contextlib.contextmanager
    def _recorded_span(self, name: str, category: str, args: dict):
        # Appended at the start, so an enclosing span comes before the spans nested in it.
        event = {"name": name, "cat": category, "ph": "X", "ts": self._now_us(), "dur": 0.0,
                 "pid": self.stage, "tid": 0, "args": args}
        self.events.append(event)
        try:
            yield
        finally:
            # The wall clock may be stepped back by NTP; a span never lasts less than nothing.
            event["dur"] = max(0.0, self._now_us() - event["ts"])

    def _now_us(self) -> float:
        if self.synchronize is not None:
            self.synchronize()
        # The wall clock rather than a monotonic one: processes on one machine share it, so the
        # stages line up. A multi-node trace is only as well aligned as the nodes' clocks (NTP/PTP).
        return time.time_ns() / 1000


def stage_name(stage: int, tp: int = 1) -> str:
    """The row of rank `stage` (its stage, and its TP rank where there are several)."""
    return f"stage {stage}" if tp == 1 else f"stage {stage // tp} TP {stage % tp}"


def _stage_name_events(n_stages: int, metadata: dict) -> list:
    tp = int(metadata.get("tp") or 1)
    named = [{"name": "process_name", "ph": "M", "pid": stage, "tid": 0,
              "args": {"name": stage_name(stage, tp)}} for stage in range(n_stages)]
    ordered = [{"name": "process_sort_index", "ph": "M", "pid": stage, "tid": 0,
                "args": {"sort_index": stage}} for stage in range(n_stages)]
    return named + ordered


def _shifted_spans(events_per_stage: list) -> list:
    """All stages' spans with pid = stage (the list index) and the earliest start at time 0."""
    spans = [{**event, "pid": stage, "tid": 0}
             for stage, events in enumerate(events_per_stage) for event in events]
    origin = min((span["ts"] for span in spans), default=0)
    for span in spans:
        span["ts"] -= origin
    return sorted(spans, key=lambda span: (span["pid"], span["ts"]))


def write_chrome_trace(path: str, events_per_stage: list, metadata: dict):
    """Write events_per_stage[s] (rank s's Tracer.events) as one trace file, atomically.

    metadata (e.g. n_stages, tp, n_micro_batches, schedule) is stored as the trace's
    "metadata"; n_stages defaults to the number of ranks given (tp ranks a stage: 1).
    """
    trace = {"traceEvents": _stage_name_events(len(events_per_stage), metadata)
             + _shifted_spans(events_per_stage),
             "displayTimeUnit": "ms",
             "metadata": {"n_stages": len(events_per_stage), **metadata}}
    atomic_write_text(path, json.dumps(trace))


def events_by_stage(trace_events: list, n_stages: int = None) -> list:
    """The "X" events of a loaded trace grouped by pid: element s holds stage s's events."""
    spans = [event for event in trace_events if event.get("ph") == "X"]
    if n_stages is None:
        n_stages = 1 + max((int(span["pid"]) for span in spans), default=-1)
    per_stage = [[] for _ in range(n_stages)]
    for span in spans:
        if 0 <= int(span["pid"]) < n_stages:
            per_stage[int(span["pid"])].append(span)
    return per_stage


def _covered_time(intervals: list) -> float:
    """Length of the union of (start, end) intervals, so nested or overlapping spans count once."""
    covered, reached = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reached:
            covered += end - max(start, reached)
            reached = end
    return covered


def busy_time(events: list) -> float:
    """Time one stage spent computing (forward or backward), in the events' unit.

    The trainer's forward and backward spans contain their own wait for the peer's tensor (a
    recv_wait span nested inside); that wait is idle, so busy = |compute ∪ waits| − |waits|,
    which is right whether the waits are nested in the compute spans or beside them.
    """
    def covered(categories):
        return _covered_time([(event["ts"], event["ts"] + event["dur"]) for event in events
                              if event.get("cat") in categories])
    return covered(COMPUTE_CATEGORIES + ("recv_wait",)) - covered(("recv_wait",))


def idle_shares(events_per_stage: list) -> list:
    """Each stage's idle share of the step: 1 - its busy time / the wall time.

    The wall time runs from the first start to the last end over all stages' events, so
    waits, sends and the optimizer step all count as idle. Time a stage's process was not
    running inside a forward or backward (another process had the CPU) counts as busy: the
    clock cannot tell it from computing.
    """
    spans = [event for events in events_per_stage for event in events]
    if not spans:
        raise ValueError("idle_shares needs at least one event")
    wall = (max(span["ts"] + span["dur"] for span in spans)
            - min(span["ts"] for span in spans))
    if wall <= 0:
        return [0.0] * len(events_per_stage)
    return [1.0 - busy_time(events) / wall for events in events_per_stage]


def bubble_fraction(events_per_stage: list) -> float:
    """Measured idle share: idle_shares averaged over the stages."""
    idle = idle_shares(events_per_stage)
    return sum(idle) / len(idle)


def ideal_bubble_fraction(n_stages: int, n_micro_batches: int) -> float:
    """(p - 1) / (m + p - 1): the idle share of GPipe and 1F1B with equal-cost stages."""
    if n_stages < 1 or n_micro_batches < 1:
        raise ValueError(f"need n_stages >= 1 and n_micro_batches >= 1, got {n_stages} and "
                         f"{n_micro_batches}")
    return (n_stages - 1) / (n_micro_batches + n_stages - 1)
