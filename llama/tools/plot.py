"""Draw a pipeline trace as an SVG timeline, or training losses as an SVG line chart, by hand.

  python -m llama.tools.plot schedule runs/x/trace.json --out docs/img/schedule.svg [--title T] [--step N]
  python -m llama.tools.plot losses runs/x/metrics.jsonl --out docs/img/loss.svg [--title T]
"""
import json
import math
from collections import Counter
from pathlib import Path

from llama.cli import run_cli
from llama.errors import BadInput
from llama.formats.files import atomic_write_text
from llama.parallel.trace import bubble_fraction, events_by_stage, ideal_bubble_fraction, stage_name
from llama.tools.svg import (CHAR_WIDTH, HATCH, document, element, legend, line, nice_ticks, rect,
                             text, tick_labels, x_axis)

# category: (legend label, fill)
STYLES = {"forward": ("forward", "#4c78a8"), "backward": ("backward", "#f58518"),
          "optimizer": ("optimizer step", "#54a24b"), "eval": ("eval", "#b279a2"),
          "recv_wait": ("waiting for a peer (lane below)", "url(#hatch)"),
          "send": ("send", "#444444")}
OTHER = ("other", "#bbbbbb")
# The trainer records a wait inside the forward or backward it holds up; on the same lane it would
# cover that box, so waits get a thin lane of their own beneath each stage's compute lane.
WAITS = ("recv_wait", "send")
BOX, WAIT_LANE, ROW = 28, 8, 48  # px: compute lane, wait lane (2 px below it), one stage's row
TIME_WIDTH = 900  # px of the time axis
MIN_OPTIMIZER_WIDTH = 6.0  # px: a step of a few microseconds stays visible beside 900 px of step
TRAIN_COLOUR, EVAL_COLOUR = "#4c78a8", "#e45756"


# The schedule timeline


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
        raise BadInput(f"trace {path} holds no spans (\"ph\": \"X\" events in \"traceEvents\"): {fix}")
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


def stage_labels(trace: dict, n_stages: int) -> list:
    """The trace's own process names where it has them, else "stage s"."""
    names = {event.get("pid"): (event.get("args") or {}).get("name")
             for event in trace["traceEvents"] if isinstance(event, dict)
             and event.get("ph") == "M" and event.get("name") == "process_name"}
    return [names.get(stage) or stage_name(stage) for stage in range(n_stages)]


def count_micro_batches(per_stage: list) -> int:
    """Distinct micro_batch numbers of the first stage with forwards (its forwards if unnumbered)."""
    forwards = next(([span for span in events if span.get("cat") == "forward"]
                     for events in per_stage if any(s.get("cat") == "forward" for s in events)), [])
    numbers = {(span.get("args") or {}).get("micro_batch") for span in forwards}
    return len(forwards) if None in numbers else len(numbers)


def bubble_caption(per_stage: list, m: int) -> str:
    caption = f"measured bubble {bubble_fraction(per_stage):.1%}"
    p = len(per_stage)
    if m:
        caption += (f"   ·   ideal (p−1)/(m+p−1) = {p - 1}/{m + p - 1} = "
                    f"{ideal_bubble_fraction(p, m):.1%} for p={p} stages, m={m} micro-batches")
    return caption


def compute_pieces(start: float, end: float, waits: list) -> list:
    """The (start, end) parts of a compute span that no wait of its stage covers: the time the
    stage really computed, as bubble_fraction counts it."""
    pieces = [(start, end)]
    for wait_start, wait_end in waits:
        pieces = [piece for start, end in pieces
                  for piece in ((start, min(end, wait_start)), (max(start, wait_end), end))
                  if piece[1] > piece[0]]
    return pieces


def span_shapes(span: dict, waits: list, x, top: float) -> list:
    """A wait's box in the thin lane; a compute span's boxes in the upper lane, cut around the
    waits inside it, with its micro-batch number in the widest box when the number fits."""
    category = span.get("cat", "")
    start, end = span["ts"], span["ts"] + span.get("dur", 0)
    if category in WAITS:
        pieces, top, height = [(start, end)], top + BOX + 2, WAIT_LANE
    else:
        pieces, height = compute_pieces(start, end, waits), BOX
    minimum = MIN_OPTIMIZER_WIDTH if category == "optimizer" else 0.5
    boxes = [(x(a), max(x(b) - x(a), minimum)) for a, b in pieces]
    tooltip = f"{span.get('name', '')} ({category}): {span.get('dur', 0) / 1000:.3f} ms"
    shapes = [rect(left, top, width, height, STYLES.get(category, OTHER)[1], tooltip=tooltip,
                   stroke="white", stroke_width=0.5, class_=f"span {category}")
              for left, width in boxes]
    number = (span.get("args") or {}).get("micro_batch")
    if category not in WAITS and boxes and number is not None:
        left, width = max(boxes, key=lambda box: box[1])
        if width >= CHAR_WIDTH * len(str(number)) + 4:
            shapes.append(text(left + width / 2, top + BOX / 2 + 4, number, text_anchor="middle",
                               fill="white", class_="micro-batch"))
    return shapes


def schedule_svg(trace: dict, title: str = None, step: int = None) -> str:
    """The SVG timeline of one step of a loaded trace (see select_step for which one): a row per
    stage, the time axis, a legend, and the measured and the ideal bubble."""
    metadata = trace.get("metadata") or {}
    spans, step = select_step([event for event in trace["traceEvents"] if is_span(event)], step)
    n_stages = int(metadata.get("n_stages") or 1 + max(span.get("pid", 0) for span in spans))
    per_stage = events_by_stage(spans, n_stages)
    spans = [span for events in per_stage for span in events]
    if not spans:
        raise BadInput(f"no spans belong to stages 0..{n_stages - 1} (metadata n_stages): "
                       "pass a trace whose metadata matches its events")
    if title is None:
        title = " ".join(filter(None, [metadata.get("schedule"), "pipeline schedule"]))
        title += "" if step is None else f", step {step}"
    labels = stage_labels(trace, n_stages)
    left, axis_y = 24 + CHAR_WIDTH * max(map(len, labels)), 40 + ROW * n_stages
    origin = min(span["ts"] for span in spans)
    # The axis ends where the step ends, not at the next round tick, to keep the boxes wide.
    length_ms = max(max(span["ts"] + span.get("dur", 0) for span in spans) - origin, 1.0) / 1000

    def x(ts_us: float) -> float:
        return left + (ts_us - origin) / 1000 / length_ms * TIME_WIDTH

    shapes = [HATCH, text(left, 26, title, font_size=16, font_weight="bold")]
    for stage, label in enumerate(labels):
        top = 44 + ROW * stage
        shapes += [rect(left, top, TIME_WIDTH, BOX, "#f4f4f4"),
                   rect(left, top + BOX + 2, TIME_WIDTH, WAIT_LANE, "#fafafa"),
                   text(left - 8, top + BOX / 2 + 4, label, text_anchor="end", class_="stage-label")]
    ticks = [tick for tick in nice_ticks(0.0, length_ms) if tick <= length_ms * 1.0001]
    shapes += x_axis(ticks, lambda ms: x(origin + ms * 1000), axis_y, grid_top=44)
    shapes += [line(left, axis_y, left + TIME_WIDTH, axis_y),
               text(left + TIME_WIDTH / 2, axis_y + 36, "time (ms)", text_anchor="middle")]
    for stage, events in enumerate(per_stage):
        waits = [(s["ts"], s["ts"] + s.get("dur", 0)) for s in events if s.get("cat") in WAITS]
        shapes += [shape for span in events for shape in span_shapes(span, waits, x, 44 + ROW * stage)]
    present = {span.get("cat") for span in spans}
    entries = [style for category, style in STYLES.items() if category in present]
    shapes += legend(entries + [OTHER] * bool(present - set(STYLES)), left, axis_y + 62)
    m = int(metadata.get("n_micro_batches") or count_micro_batches(per_stage))
    shapes.append(text(left, axis_y + 88, bubble_caption(per_stage, m), class_="caption"))
    # Room on the right for a minimum-width box that starts at the very end of the step.
    return document(left + TIME_WIDTH + MIN_OPTIMIZER_WIDTH + 24, axis_y + 100, shapes)


# The loss chart


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


def losses_svg(records: list, title: str = None) -> str:
    """An SVG chart of "loss" (a line) and "eval_loss" (a line with a dot on each point, the
    last one's value written below it: a falling loss reaches it from above) against "step"."""
    train, held_out = loss_points(records, "loss"), loss_points(records, "eval_loss")
    if not train and not held_out:
        raise BadInput("no line has a \"step\" and a finite \"loss\" or \"eval_loss\": pass the "
                       "metrics.jsonl of a run that has logged at least one step")
    steps, values = zip(*(train + held_out))
    x_ticks, y_ticks = nice_ticks(min(steps), max(steps), min_spacing=1), nice_ticks(min(values), max(values))
    left, top, width, height = 72, 60, 704, 344  # px: the plot area inside an 800 x 460 picture

    def x(step: float) -> float:
        return left + (step - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * width

    def y(value: float) -> float:
        return top + (y_ticks[-1] - value) / (y_ticks[-1] - y_ticks[0]) * height

    shapes = [text(left, 26, "training loss" if title is None else title, font_size=16,
                   font_weight="bold")]
    for tick, label in zip(y_ticks, tick_labels(y_ticks)):
        shapes += [line(left, y(tick), left + width, y(tick), stroke="#e4e4e4"),
                   text(left - 8, y(tick) + 4, label, text_anchor="end")]
    shapes += x_axis(x_ticks, x, top + height)
    shapes += [element("polyline", points=f"{left},{top} {left},{top + height} "
                       f"{left + width},{top + height}", fill="none", stroke="#222222"),
               text(left + width / 2, 448, "step", text_anchor="middle"),
               text(18, top + height / 2, "loss (nats/token)", text_anchor="middle",
                    transform=f"rotate(-90 18 {top + height / 2})")]
    for points, colour, name in ((train, TRAIN_COLOUR, "train-loss"),
                                 (held_out, EVAL_COLOUR, "eval-loss")):
        if points:
            shapes.append(element("polyline", points=" ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points),
                                  fill="none", stroke=colour, stroke_width=1.5, class_=name))
        if name == "eval-loss" or len(points) == 1:
            shapes += [element("circle", cx=x(s), cy=y(v), r=3, fill=colour, class_=name)
                       for s, v in points]
    if held_out:
        step, value = held_out[-1]
        anchor = "end" if x(step) > left + width * 0.8 else "start"
        at = dict(x=x(step) + (-6 if anchor == "end" else 6), y=y(value) + 18, words=f"{value:.3f}",
                  text_anchor=anchor)
        # Written twice, first with a wide white outline, to stay legible over the train line.
        shapes += [text(**at, stroke="white", stroke_width=3, fill="white"),
                   text(**at, fill=EVAL_COLOUR, class_="last-value")]
    entries = [("train loss", TRAIN_COLOUR)] * bool(train) + [("eval loss", EVAL_COLOUR)] * bool(held_out)
    return document(800, 460, shapes + legend(entries, left, 48))


def held_out_from_tuning_json(metrics_path: str, records: list) -> list:
    """Eval records for the held-out losses that only the run's tuning.json (prompt.json from
    earlier versions) holds: before training (step 0) and after the last step (which
    --eval_every need not divide). Only from a file that finished at the metrics' last step,
    so one left by another run is not drawn into this one's chart."""
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
    return [{"step": step, "eval_loss": value} for step, value in found
            if is_number(value) and step not in evaluated]


# Command line


def schedule(trace_path: str, out: str, title: str = None, step: int = None):
    """Draw one step of a trace.json as an SVG timeline, one row per pipeline stage.

    trace_path: the trace.json written by ft_main.py --trace
    out: the SVG file to write
    title: the picture's title (default: from the trace's metadata)
    step: the step to draw (default: the last traced step)
    """
    trace = load_trace(trace_path)
    try:
        svg = schedule_svg(trace, title=title, step=step)
    except BadInput as error:
        raise BadInput(f"trace {trace_path}: {error}") from None
    atomic_write_text(out, svg)
    print(f"wrote {out}")


def losses(metrics_path: str, out: str, title: str = None):
    """Draw the train loss and the held-out loss of a metrics.jsonl as an SVG line chart.

    The held-out losses before and after training come from tuning.json beside it, if any.

    metrics_path: the metrics.jsonl of a training run (ft_main.py's --out)
    out: the SVG file to write
    title: the chart's title (default: training loss)
    """
    records = read_metrics(metrics_path)
    records += held_out_from_tuning_json(metrics_path, records)
    try:
        svg = losses_svg(records, title=title)
    except BadInput as error:
        raise BadInput(f"metrics file {metrics_path}: {error}") from None
    atomic_write_text(out, svg)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli({"schedule": schedule, "losses": losses})
