"""What llama.tools.plot draws from: one step of a Chrome trace, and the losses of a run's
metrics.jsonl (with the held-out losses of the tuning.json beside it)."""
import json
import math
from collections import Counter
from pathlib import Path

from llama.errors import BadInput
from llama.parallel.pipeline import SCHEDULES, schedule_actions
from llama.parallel.trace import busy_time, stage_name


def load_trace(path: str) -> dict:
    """A Chrome trace as a dict with "traceEvents"; BadInput if it is unreadable or has no spans."""
    fix = "pass the trace.json that a traced training run wrote"
    try:
        trace = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadInput(f"trace {path} cannot be read as JSON ({error}): {fix}") from None
    if isinstance(trace, list):  # Chrome's other layout: a bare array of events
        trace = {"traceEvents": trace}
    events = trace.get("traceEvents") if isinstance(trace, dict) else None
    if not isinstance(events, list) or not any(is_span(event) for event in events):
        raise BadInput(f"trace {path} holds no spans (\"ph\": \"X\" events in \"traceEvents\"): "
                       + fix)
    return trace


def is_span(event) -> bool:
    return isinstance(event, dict) and event.get("ph") == "X"


def step_of(span: dict):
    return (span.get("args") or {}).get("step")


def select_step(spans: list, step=None):
    """(the spans of one step, that step): the asked step, else the last one in which every stage
    ran as many backwards as forwards (and some). A trace without step numbers is drawn whole."""
    steps = sorted({step_of(span) for span in spans} - {None})
    if not steps:
        if step is not None:
            raise BadInput(f"--step {step} was asked but the spans carry no step numbers: "
                           "leave --step out to draw the whole trace")
        return spans, None
    if step is None:
        counts = Counter((step_of(span), span.get("pid", 0), span.get("cat")) for span in spans)
        stages = {span.get("pid", 0) for span in spans}
        complete = [n for n in steps if all(
            0 < counts[n, stage, "forward"] == counts[n, stage, "backward"] for stage in stages)]
        step = (complete or steps)[-1]
    elif step not in steps:
        raise BadInput(f"the trace holds steps {steps[0]}..{steps[-1]} ({len(steps)} in all), "
                       f"not step {step}: pass --step with one of them")
    return [span for span in spans if step_of(span) == step], step


def stage_labels(trace: dict, n_stages: int, tp: int = 1) -> list:
    """The trace's own process names where it has them, else "stage s" (with its TP rank)."""
    names = {event.get("pid"): (event.get("args") or {}).get("name")
             for event in trace["traceEvents"] if isinstance(event, dict)
             and event.get("ph") == "M" and event.get("name") == "process_name"}
    return [names.get(stage) or stage_name(stage, tp) for stage in range(n_stages)]


def count_micro_batches(per_stage: list) -> int:
    """Micro-batches in the step: the distinct micro_batch numbers of the first stage's
    forwards (of the first stage that has any), or its forwards if they are unnumbered."""
    forwards = next(([span for span in events if span.get("cat") == "forward"]
                     for events in per_stage if any(s.get("cat") == "forward" for s in events)), [])
    numbers = {(span.get("args") or {}).get("micro_batch") for span in forwards}
    return len(forwards) if None in numbers else len(numbers)


def mean_compute_times(events: list):
    """(mean forward, mean backward) time of one stage's spans, each without the waits for a
    peer that the trainer times inside it; None when the stage has no forward or backward."""
    waits = [event for event in events if event.get("cat") == "recv_wait"]
    means = []
    for category in ("forward", "backward"):
        times = [busy_time([span] + waits) for span in events if span.get("cat") == category]
        if not times:
            return None
        means.append(sum(times) / len(times))
    return tuple(means)


def modelled_bubble_fraction(per_stage: list, schedule: str, n_micro: int):
    """The idle share the schedule leaves when each stage's every forward and backward takes
    that stage's measured mean time and a tensor arrives the moment it is sent: the bubble these
    stages' own costs make, unequal as they are; (p-1)/(m+p-1) is that of equal stages. The
    optimizer step is idle time at the end, as in the measurement. None without the schedule's
    name or a stage's forwards and backwards."""
    costs = [mean_compute_times(events) for events in per_stage]
    if schedule not in SCHEDULES or not n_micro or None in costs:
        return None
    n_stages = len(per_stage)
    todo = [schedule_actions(schedule, stage, n_stages, n_micro) for stage in range(n_stages)]
    ends, free = {}, [0.0] * n_stages  # (kind, stage, micro-batch) -> end; when a stage is free
    while any(todo):
        left = sum(map(len, todo))
        for stage in range(n_stages):
            while todo[stage]:
                kind, i = todo[stage][0]
                # A forward waits for the stage before it, a backward for the stage after it.
                peer = stage - 1 if kind == "F" else stage + 1
                need = (kind, peer, i) if 0 <= peer < n_stages else None
                if need is not None and need not in ends:
                    break
                start = max(free[stage], ends.get(need, 0.0))
                free[stage] = ends[kind, stage, i] = start + costs[stage][kind == "B"]
                todo[stage].pop(0)
        if sum(map(len, todo)) == left:  # both schedules always progress; a guard, not a path
            raise ValueError(f"the {schedule} schedule is stuck at {todo}")
    optimizer = max((span.get("dur", 0) for events in per_stage for span in events
                     if span.get("cat") == "optimizer"), default=0.0)
    wall = max(free) + optimizer
    idle = [1.0 - n_micro * sum(cost) / wall for cost in costs]
    return sum(idle) / n_stages


def read_metrics(path: str) -> list:
    """The JSON objects of a metrics JSONL file; BadInput if it is unreadable or holds none.

    A last line that is not valid JSON is skipped: the trainer may be writing it right now.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise BadInput(f"metrics file {path} cannot be read ({error}): pass the metrics.jsonl "
                       "that a training run wrote") from None
    records = []
    for number, line_text in enumerate(lines, start=1):
        try:
            record = json.loads(line_text) if line_text.strip() else None
        except json.JSONDecodeError:
            if number < len(lines):
                raise BadInput(f"metrics file {path} line {number} is not JSON: fix or delete "
                               "that line") from None
            record = None
        if isinstance(record, dict):
            records.append(record)
    if not records:
        raise BadInput(f"metrics file {path} holds no records: pass the metrics.jsonl of a "
                       "run that has logged at least one step")
    return records


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def loss_points(records: list, key: str) -> list:
    """(step, value) pairs, in step order, of the records with a step and a finite `key`."""
    return sorted((record["step"], record[key]) for record in records
                  if is_number(record.get("step")) and is_number(record.get(key)))


def held_out_from_tuning_json(metrics_path: str, records: list) -> list:
    """Eval records for the held-out losses that only the run's tuning.json (prompt.json from
    earlier versions) holds: before training (step 0) and after the last step (which
    --eval_every need not divide), and a record {"eval_loss_untuned": …}, the model's held-out
    loss without the tuning. Only from a file that finished at the metrics' last step, so one
    left by another run is not drawn into this one's chart."""
    folder = Path(metrics_path).parent
    path = next((folder / name for name in ("tuning.json", "prompt.json")
                 if (folder / name).is_file()), None)
    if path is None:
        return []
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        print(f"note: {path} cannot be read as JSON; the chart shows metrics.jsonl only")
        return []
    losses = info.get("losses") if isinstance(info, dict) else None
    steps = [record["step"] for record in records if is_number(record.get("step"))]
    if not isinstance(losses, dict) or not steps or info.get("steps") != max(steps):
        return []
    evaluated = {step for step, _ in loss_points(records, "eval_loss")}
    found = [(0, losses.get("eval_loss_init")), (info["steps"], losses.get("eval_loss"))]
    untuned = losses.get("eval_loss_no_prompt")
    return [{"step": step, "eval_loss": value} for step, value in found
            if is_number(value) and step not in evaluated] + \
        [{"eval_loss_untuned": untuned}] * is_number(untuned)

