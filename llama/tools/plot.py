"""Draw a pipeline trace as an SVG timeline, or training losses as an SVG line chart, by hand.

  python -m llama.tools.plot schedule runs/x/trace.json --out docs/img/schedule.svg [--title T] [--step N]
  python -m llama.tools.plot losses runs/x/metrics.jsonl --out docs/img/loss.svg [--title T]
"""
import json
import math
from collections import Counter
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from llama.cli import run_cli
from llama.errors import BadInput
from llama.formats.files import atomic_write_text
from llama.parallel.trace import bubble_fraction, events_by_stage, ideal_bubble_fraction, stage_name

FONT = "sans-serif"
CHAR_WIDTH = 7  # about the width of one 12px sans-serif character, for fitting text into boxes
TRAIN_COLOUR = "#4c78a8"
EVAL_COLOUR = "#e45756"
# category: (legend label, fill)
SPAN_STYLES = {
    "forward": ("forward", "#4c78a8"),
    "backward": ("backward", "#f58518"),
    "optimizer": ("optimizer step", "#54a24b"),
    "eval": ("eval", "#b279a2"),
    "recv_wait": ("waiting for a peer (lane below)", "url(#hatch)"),
    "send": ("send", "#444444"),
}
# Drawn in a lane of their own beneath each stage's compute boxes: the trainer records a wait
# inside the forward or backward it holds up, so on the same lane it would cover that box.
WAIT_CATEGORIES = ("recv_wait", "send")
MIN_OPTIMIZER_WIDTH = 6.0  # px: a step of a few microseconds stays visible beside 900 px of step
OTHER_STYLE = ("other", "#bbbbbb")
HATCH = ('<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
         'patternTransform="rotate(45)"><rect width="6" height="6" fill="#dddddd"/>'
         '<line x1="0" y1="0" x2="0" y2="6" stroke="#888888" stroke-width="2"/></pattern></defs>')


# SVG text building


def element(tag: str, content: str = None, **attributes) -> str:
    """One XML element. `font_size` is written font-size, `class_` class; None leaves it out.

    `content` is inserted as given (already escaped markup); attribute values are escaped here.
    """
    written = "".join(f" {name.rstrip('_').replace('_', '-')}={quoteattr(_attribute(value))}"
                      for name, value in attributes.items() if value is not None)
    if content is None:
        return f"<{tag}{written}/>"
    return f"<{tag}{written}>{content}</{tag}>"


def _attribute(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def text(x: float, y: float, words, **attributes) -> str:
    """A 12px label at (x, y); `words` is escaped."""
    style = {"font_family": FONT, "font_size": 12, "fill": "#222222", **attributes}
    return element("text", escape(str(words)), x=float(x), y=float(y), **style)


def svg_document(width: float, height: float, body: list) -> str:
    header = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" '
              f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">')
    background = element("rect", width="100%", height="100%", fill="white")
    return "\n".join([header, background, *body, "</svg>"]) + "\n"


def legend(entries: list, x: float, y: float) -> list:
    """Colour squares with labels, left to right from (x, y); entries are (label, fill) pairs."""
    shapes = []
    for label, fill in entries:
        shapes.append(element("rect", x=float(x), y=y - 10.0, width=12, height=12, fill=fill,
                              stroke="#666666", stroke_width=0.5))
        shapes.append(text(x + 17, y, label))
        x += 17 + CHAR_WIDTH * len(label) + 18
    return shapes


# Axes


def nice_axis(low: float, high: float, target_ticks: int = 6, min_spacing: float = 0.0):
    """(low, high, ticks): the range widened to whole multiples of a 1-2-5 tick spacing."""
    if not high > low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    spacing = max(_tick_spacing((high - low) / target_ticks), min_spacing)
    first = math.floor(low / spacing + 1e-9)
    last = math.ceil(high / spacing - 1e-9)
    ticks = [index * spacing for index in range(first, last + 1)]
    return ticks[0], ticks[-1], ticks


def _tick_spacing(rough: float) -> float:
    magnitude = 10 ** math.floor(math.log10(rough))
    for multiple in (1, 2, 5):
        if multiple * magnitude >= rough * 0.999:
            return multiple * magnitude
    return 10 * magnitude


def format_tick(value: float, spacing: float) -> str:
    """The tick's value with as many decimals as the spacing needs (0.25 -> 2, 200 -> 0)."""
    decimals = max(0, -math.floor(math.log10(spacing) + 1e-9))
    return f"{value:.{decimals}f}"


# The schedule timeline


def load_trace(path: str) -> dict:
    """A Chrome trace as a dict with "traceEvents"; BadInput if it is unreadable or has no spans."""
    try:
        with open(path, encoding="utf-8") as file:
            trace = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadInput(f"trace {path} cannot be read as JSON ({error}): pass the trace.json "
                       "that a traced training run wrote") from None
    if isinstance(trace, list):  # Chrome's other layout: a bare array of events
        trace = {"traceEvents": trace}
    events = trace.get("traceEvents") if isinstance(trace, dict) else None
    if not isinstance(events, list) or not any(_is_span(event) for event in events):
        raise BadInput(f"trace {path} holds no spans (\"ph\": \"X\" events in \"traceEvents\"): "
                       "pass the trace.json that a traced training run wrote")
    return trace


def _is_span(event) -> bool:
    return isinstance(event, dict) and event.get("ph") == "X"


def _step_of(span: dict):
    return (span.get("args") or {}).get("step")


def steps_in(spans: list) -> list:
    return sorted({_step_of(span) for span in spans if _step_of(span) is not None})


def complete_steps(spans: list) -> list:
    """The steps in which every stage of the trace ran as many backwards as forwards (and some)."""
    counts = Counter((_step_of(span), span.get("pid", 0), span.get("cat")) for span in spans)
    stages = {span.get("pid", 0) for span in spans}
    return [step for step in steps_in(spans)
            if all(0 < counts[step, stage, "forward"] == counts[step, stage, "backward"]
                   for stage in stages)]


def select_step(spans: list, step=None):
    """(the spans of one step, that step): the asked step, else the last complete one.

    A trace without step numbers is drawn whole (step None).
    """
    steps = steps_in(spans)
    if not steps:
        if step is not None:
            raise BadInput(f"--step {step} was asked but the spans carry no step numbers: "
                           "leave --step out to draw the whole trace")
        return spans, None
    if step is None:
        step = (complete_steps(spans) or steps)[-1]
    elif step not in steps:
        raise BadInput(f"the trace holds steps {steps[0]}..{steps[-1]} ({len(steps)} in all), "
                       f"not step {step}: pass --step with one of them")
    return [span for span in spans if _step_of(span) == step], step


def stage_labels(trace: dict, n_stages: int) -> list:
    """The trace's own process names where it has them, else "stage s"."""
    names = {event.get("pid"): (event.get("args") or {}).get("name")
             for event in trace["traceEvents"]
             if isinstance(event, dict) and event.get("ph") == "M"
             and event.get("name") == "process_name"}
    return [names.get(stage) or stage_name(stage) for stage in range(n_stages)]


def infer_micro_batches(per_stage: list) -> int:
    """Micro-batches in the step: distinct micro_batch args of the first busy stage's forwards."""
    for events in per_stage:
        forwards = [event for event in events if event.get("cat") == "forward"]
        if forwards:
            numbers = {(event.get("args") or {}).get("micro_batch") for event in forwards}
            return len(numbers) if None not in numbers else len(forwards)
    return 0


def bubble_caption(per_stage: list, n_micro_batches: int) -> str:
    parts = [f"measured bubble {bubble_fraction(per_stage):.1%}"]
    if n_micro_batches:
        p, m = len(per_stage), n_micro_batches
        ideal = ideal_bubble_fraction(p, m)
        parts.append(f"ideal (p−1)/(m+p−1) = {p - 1}/{m + p - 1} = {ideal:.1%} "
                     f"for p={p} stages, m={m} micro-batches")
    return "   ·   ".join(parts)


class TimelineLayout:
    """Where things go: one row per stage (a compute lane over a wait lane), the time axis
    below, then the legend and caption."""
    compute_height = 28
    lane_gap = 2
    wait_height = 8
    row_height = compute_height + lane_gap + wait_height
    row_gap = 10
    plot_width = 900

    def __init__(self, labels: list, origin_us: float, end_us: float):
        self.left = 24 + CHAR_WIDTH * max(len(label) for label in labels)
        self.top = 44
        self.origin_us = origin_us
        # The axis ends where the step ends, not at the next round tick, to keep the boxes wide.
        self.axis_end_ms = max(end_us - origin_us, 1.0) / 1000
        self.ticks = [tick for tick in nice_axis(0.0, self.axis_end_ms)[2]
                      if tick <= self.axis_end_ms * 1.0001]
        self.axis_y = self.row_top(len(labels)) - self.row_gap + 6
        # Room on the right for a minimum-width box that starts at the very end of the step.
        self.width = self.left + self.plot_width + MIN_OPTIMIZER_WIDTH + 24
        self.height = self.axis_y + 100

    def x(self, ts_us: float) -> float:
        return self.left + (ts_us - self.origin_us) / 1000 / self.axis_end_ms * self.plot_width

    def row_top(self, stage: int) -> float:
        return self.top + stage * (self.row_height + self.row_gap)

    def wait_lane_top(self, stage: int) -> float:
        return self.row_top(stage) + self.compute_height + self.lane_gap


def _rows(labels: list, layout: TimelineLayout) -> list:
    shapes = []
    for stage, label in enumerate(labels):
        top = layout.row_top(stage)
        shapes.append(element("rect", x=float(layout.left), y=float(top),
                              width=layout.plot_width, height=layout.compute_height,
                              fill="#f4f4f4"))
        shapes.append(element("rect", x=float(layout.left), y=layout.wait_lane_top(stage),
                              width=layout.plot_width, height=layout.wait_height, fill="#fafafa"))
        shapes.append(text(layout.left - 8, top + layout.compute_height / 2 + 4, label,
                           text_anchor="end", class_="stage-label"))
    return shapes


def _time_axis(layout: TimelineLayout) -> list:
    spacing = layout.ticks[1] - layout.ticks[0]
    bottom = layout.axis_y
    shapes = [element("line", x1=float(layout.left), y1=float(bottom),
                      x2=float(layout.left + layout.plot_width), y2=float(bottom),
                      stroke="#222222")]
    for tick in layout.ticks:
        x = layout.x(layout.origin_us + tick * 1000)
        shapes.append(element("line", x1=x, y1=float(layout.top), x2=x, y2=float(bottom),
                              stroke="#dddddd", stroke_width=0.5))
        shapes.append(element("line", x1=x, y1=float(bottom), x2=x, y2=bottom + 5.0,
                              stroke="#222222"))
        shapes.append(text(x, bottom + 18, format_tick(tick, spacing), text_anchor="middle"))
    shapes.append(text(layout.left + layout.plot_width / 2, bottom + 36, "time (ms)",
                       text_anchor="middle"))
    return shapes


def compute_pieces(span: dict, waits: list) -> list:
    """The (start, end) parts of a compute span that no wait of its stage covers: the time the
    stage really computed, as bubble_fraction counts it."""
    pieces = [(span["ts"], span["ts"] + span.get("dur", 0))]
    for wait_start, wait_end in waits:
        cut = []
        for start, end in pieces:
            if wait_end <= start or wait_start >= end:
                cut.append((start, end))
                continue
            cut += [piece for piece in ((start, wait_start), (wait_end, end)) if piece[1] > piece[0]]
        pieces = cut
    return pieces


def _box(span: dict, x: float, y: float, width: float, height: float, fill: str) -> str:
    category = span.get("cat", "")
    tooltip = element("title", escape(f"{span.get('name', '')} ({category}): "
                                      f"{span.get('dur', 0) / 1000:.3f} ms"))
    return element("rect", tooltip, x=x, y=y, width=width, height=height, fill=fill,
                   stroke="white", stroke_width=0.5, class_=f"span {category}")


def _wait_shapes(span: dict, layout: TimelineLayout) -> list:
    fill = SPAN_STYLES.get(span.get("cat"), OTHER_STYLE)[1]
    x = layout.x(span["ts"])
    width = max(layout.x(span["ts"] + span.get("dur", 0)) - x, 0.5)
    return [_box(span, x, layout.wait_lane_top(span.get("pid", 0)), width, layout.wait_height,
                 fill)]


def _compute_shapes(span: dict, waits: list, layout: TimelineLayout) -> list:
    """A compute span's boxes (the parts outside its waits) and its micro-batch number in the
    widest one, when the number fits; the optimizer step keeps a visible minimum width."""
    category = span.get("cat", "")
    fill = SPAN_STYLES.get(category, OTHER_STYLE)[1]
    minimum = MIN_OPTIMIZER_WIDTH if category == "optimizer" else 0.5
    y = layout.row_top(span.get("pid", 0))
    boxes = []
    for start, end in compute_pieces(span, waits):
        x = layout.x(start)
        boxes.append((x, max(layout.x(end) - x, minimum)))
    shapes = [_box(span, x, y, width, layout.compute_height, fill) for x, width in boxes]
    number = (span.get("args") or {}).get("micro_batch")
    if boxes and number is not None:
        x, width = max(boxes, key=lambda box: box[1])
        if width >= CHAR_WIDTH * len(str(number)) + 4:
            shapes.append(text(x + width / 2, y + layout.compute_height / 2 + 4, number,
                               text_anchor="middle", fill="white", class_="micro-batch"))
    return shapes


def _span_legend(spans: list) -> list:
    present = {span.get("cat") for span in spans}
    entries = [(label, fill) for category, (label, fill) in SPAN_STYLES.items()
               if category in present]
    if present - set(SPAN_STYLES):
        entries.append(OTHER_STYLE)
    return entries


def _default_schedule_title(metadata: dict, step) -> str:
    name = metadata.get("schedule")
    title = f"{name} pipeline schedule" if name else "pipeline schedule"
    return title if step is None else f"{title}, step {step}"


def schedule_svg(trace: dict, title: str = None, step: int = None) -> str:
    """The SVG timeline of one step of a loaded trace (see select_step for which one)."""
    metadata = trace.get("metadata") or {}
    spans, step = select_step([e for e in trace["traceEvents"] if _is_span(e)], step)
    n_stages = int(metadata.get("n_stages") or 1 + max(span.get("pid", 0) for span in spans))
    per_stage = events_by_stage(spans, n_stages)
    labels = stage_labels(trace, n_stages)
    n_micro_batches = int(metadata.get("n_micro_batches") or infer_micro_batches(per_stage))
    title = str(title) if title is not None else _default_schedule_title(metadata, step)
    spans = [span for events in per_stage for span in events]
    if not spans:
        raise BadInput(f"no spans belong to stages 0..{n_stages - 1} (metadata n_stages): "
                       "pass a trace whose metadata matches its events")
    origin = min(span["ts"] for span in spans)
    end = max(span["ts"] + span.get("dur", 0) for span in spans)
    layout = TimelineLayout(labels, origin, end)
    shapes = []
    for events in per_stage:
        waits = [(span["ts"], span["ts"] + span.get("dur", 0)) for span in events
                 if span.get("cat") in WAIT_CATEGORIES]
        for span in events:
            shapes += _wait_shapes(span, layout) if span.get("cat") in WAIT_CATEGORIES else \
                _compute_shapes(span, waits, layout)
    body = [HATCH, text(layout.left, 26, title, font_size=16, font_weight="bold"),
            *_rows(labels, layout), *_time_axis(layout), *shapes,
            *legend(_span_legend(spans), layout.left, layout.axis_y + 62),
            text(layout.left, layout.axis_y + 88, bubble_caption(per_stage, n_micro_batches),
                 class_="caption")]
    return svg_document(layout.width, layout.height, body)


# The loss chart


def read_metrics(path: str) -> list:
    """The JSON objects of a metrics JSONL file; BadInput if it is unreadable or empty.

    A last line that is not valid JSON is skipped: the trainer may be writing it right now.
    """
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise BadInput(f"metrics file {path} cannot be read ({error}): pass the metrics.jsonl "
                       "that a training run wrote") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise BadInput(f"metrics file {path} line {number} is not JSON: fix or delete "
                           "that line") from None
        if isinstance(record, dict):
            records.append(record)
    if not records:
        raise BadInput(f"metrics file {path} holds no records: pass the metrics.jsonl of a "
                       "run that has logged at least one step")
    return records


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def loss_points(records: list, key: str) -> list:
    """(step, value) pairs, in step order, of the records that have a step and a finite number
    under `key`."""
    return sorted(((record["step"], record[key]) for record in records
                   if _is_number(record.get("step")) and _is_number(record.get(key))),
                  key=lambda point: point[0])


class ChartLayout:
    """Maps (step, loss) to SVG coordinates inside fixed margins."""
    width, height = 800, 460
    left, right, top, bottom = 72, 24, 60, 56

    def __init__(self, points: list):
        steps = [step for step, _ in points]
        values = [value for _, value in points]
        self.x_low, self.x_high, self.x_ticks = nice_axis(min(steps), max(steps), min_spacing=1)
        self.y_low, self.y_high, self.y_ticks = nice_axis(min(values), max(values))
        self.plot_width = self.width - self.left - self.right
        self.plot_height = self.height - self.top - self.bottom

    def x(self, step: float) -> float:
        return self.left + (step - self.x_low) / (self.x_high - self.x_low) * self.plot_width

    def y(self, value: float) -> float:
        share = (value - self.y_low) / (self.y_high - self.y_low)
        return self.top + (1 - share) * self.plot_height


def _chart_axes(layout: ChartLayout) -> list:
    bottom, right = layout.top + layout.plot_height, layout.left + layout.plot_width
    shapes = []
    y_spacing = layout.y_ticks[1] - layout.y_ticks[0]
    for tick in layout.y_ticks:
        y = layout.y(tick)
        shapes.append(element("line", x1=float(layout.left), y1=y, x2=float(right), y2=y,
                              stroke="#e4e4e4"))
        shapes.append(text(layout.left - 8, y + 4, format_tick(tick, y_spacing),
                           text_anchor="end"))
    x_spacing = layout.x_ticks[1] - layout.x_ticks[0]
    for tick in layout.x_ticks:
        x = layout.x(tick)
        shapes.append(element("line", x1=x, y1=float(bottom), x2=x, y2=bottom + 5.0,
                              stroke="#222222"))
        shapes.append(text(x, bottom + 18, format_tick(tick, x_spacing), text_anchor="middle"))
    shapes.append(element("polyline", points=f"{layout.left},{layout.top} {layout.left},{bottom} "
                          f"{right},{bottom}", fill="none", stroke="#222222"))
    return shapes + _chart_axis_labels(layout)


def _chart_axis_labels(layout: ChartLayout) -> list:
    middle_y = layout.top + layout.plot_height / 2
    return [text(layout.left + layout.plot_width / 2, layout.height - 12, "step",
                 text_anchor="middle"),
            text(18, middle_y, "loss (nats/token)", text_anchor="middle",
                 transform=f"rotate(-90 18 {middle_y:.1f})")]


def _series(points: list, layout: ChartLayout, colour: str, name: str, dots: bool) -> list:
    """A polyline through the points, with a dot on each when asked (or when there is one)."""
    coordinates = " ".join(f"{layout.x(step):.1f},{layout.y(value):.1f}"
                           for step, value in points)
    shapes = [element("polyline", points=coordinates, fill="none", stroke=colour,
                      stroke_width=1.5, class_=name)]
    if dots or len(points) == 1:
        shapes += [element("circle", cx=layout.x(step), cy=layout.y(value), r=3, fill=colour,
                           class_=name)
                   for step, value in points]
    return shapes


def _last_value_label(points: list, layout: ChartLayout, colour: str) -> list:
    """The last point's value written beside it: the number a run ends with. Below the point,
    since a falling loss reaches it from above."""
    step, value = max(points)
    x, y = layout.x(step), layout.y(value)
    anchor = "end" if x > layout.left + layout.plot_width * 0.8 else "start"
    return [text(x + (-6 if anchor == "end" else 6), y + 18, f"{value:.3f}", fill=colour,
                 text_anchor=anchor, stroke="white", stroke_width=3, paint_order="stroke",
                 class_="last-value")]


def losses_svg(records: list, title: str = None) -> str:
    """An SVG chart of "loss" (line) and "eval_loss" (line with dots) against "step"."""
    train, evaluation = loss_points(records, "loss"), loss_points(records, "eval_loss")
    if not train and not evaluation:
        raise BadInput("no line has a \"step\" and a finite \"loss\" or \"eval_loss\": pass the "
                       "metrics.jsonl of a run that has logged at least one step")
    layout = ChartLayout(train + evaluation)
    entries = [(label, colour) for label, colour, points in
               [("train loss", TRAIN_COLOUR, train), ("eval loss", EVAL_COLOUR, evaluation)]
               if points]
    body = [text(layout.left, 26, "training loss" if title is None else str(title), font_size=16,
                 font_weight="bold"),
            *_chart_axes(layout),
            *(_series(train, layout, TRAIN_COLOUR, "train-loss", dots=False) if train else []),
            *(_series(evaluation, layout, EVAL_COLOUR, "eval-loss", dots=True)
              + _last_value_label(evaluation, layout, EVAL_COLOUR) if evaluation else []),
            *legend(entries, layout.left, 48)]
    return svg_document(layout.width, layout.height, body)


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


def held_out_from_tuning_json(metrics_path: str, records: list) -> list:
    """Eval records for the held-out losses that only the run's tuning.json (prompt.json from
    earlier versions) holds: before training (step 0) and after the last step (which
    --eval_every need not divide).

    Used only when that file sits beside metrics.jsonl and finished at the metrics' last
    step, so one left by another run is not drawn into this one's chart.
    """
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
    steps = [record["step"] for record in records if _is_number(record.get("step"))]
    if not isinstance(losses, dict) or not steps or info.get("steps") != max(steps):
        return []
    evaluated = {step for step, _ in loss_points(records, "eval_loss")}
    found = [(0, losses.get("eval_loss_init")), (info["steps"], losses.get("eval_loss"))]
    return [{"step": step, "eval_loss": value} for step, value in found
            if _is_number(value) and step not in evaluated]


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
