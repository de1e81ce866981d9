"""Draw a pipeline trace as an SVG timeline, or training losses as an SVG line chart, by hand.

  python -m llama.tools.plot schedule runs/x/trace.json --out docs/img/schedule.svg [--title T] [--step N]
  python -m llama.tools.plot losses runs/x/metrics.jsonl --out docs/img/loss.svg [--title T]
"""
from llama.cli import run_cli
from llama.errors import BadInput
from llama.formats.files import atomic_write_text
from llama.parallel.trace import bubble_fraction, events_by_stage, ideal_bubble_fraction
from llama.tools.plot_inputs import (count_micro_batches, held_out_from_tuning_json, is_span,
                                     load_trace, loss_points, read_metrics, select_step,
                                     stage_labels)
from llama.tools.svg import (CHAR_WIDTH, HATCH, document, element, legend, line, nice_ticks, rect,
                             text, tick_labels, x_axis)

# category: (legend label, fill)
STYLES = {"forward": ("forward", "#4c78a8"), "backward": ("backward", "#f58518"),
          "optimizer": ("optimizer step", "#54a24b"), "eval": ("eval", "#b279a2"),
          "recv_wait": ("waiting for a peer (lane below)", "url(#hatch)"),
          "send": ("send", "#444444"),
          "all_reduce": ("TP all-reduce (lane below)", "#e45756")}
OTHER = ("other", "#bbbbbb")
# The trainer records a wait inside the forward or backward it holds up; on the same lane it would
# cover that box, so waits get a thin lane of their own beneath each stage's compute lane.
WAITS = ("recv_wait", "send", "all_reduce")
BOX, WAIT_LANE, ROW = 28, 8, 48  # px: compute lane, wait lane (2 px below it), one stage's row
TIME_WIDTH = 900  # px of the time axis
MIN_OPTIMIZER_WIDTH = 6.0  # px: a step of a few microseconds stays visible beside 900 px of step
TRAIN_COLOUR, EVAL_COLOUR = "#4c78a8", "#e45756"


# The schedule timeline


def bubble_caption(per_stage: list, m: int, tp: int = 1) -> str:
    caption = f"measured bubble {bubble_fraction(per_stage):.1%}"
    p = len(per_stage) // tp  # a row per rank: tp rows a stage
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
    tp = int(metadata.get("tp") or 1)  # a row per rank: a stage's TP ranks are its rows
    n_stages = int(metadata.get("n_stages") or 1 + max(span.get("pid", 0) for span in spans))
    n_stages *= tp if metadata.get("n_stages") else 1
    per_stage = events_by_stage(spans, n_stages)
    spans = [span for events in per_stage for span in events]
    if not spans:
        raise BadInput(f"no spans belong to stages 0..{n_stages - 1} (metadata n_stages): "
                       "pass a trace whose metadata matches its events")
    if title is None:
        name = metadata.get("schedule")
        title = f"{name} pipeline schedule" if name else "pipeline schedule"
        title += "" if step is None else f", step {step}"
    labels = stage_labels(trace, n_stages, tp)
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
                   text(left - 8, top + BOX / 2 + 4, label, text_anchor="end",
                        class_="stage-label")]
    ticks = [tick for tick in nice_ticks(0.0, length_ms) if tick <= length_ms * 1.0001]
    shapes += x_axis(ticks, lambda ms: x(origin + ms * 1000), axis_y, grid_top=44)
    shapes += [line(left, axis_y, left + TIME_WIDTH, axis_y),
               text(left + TIME_WIDTH / 2, axis_y + 36, "time (ms)", text_anchor="middle")]
    for stage, events in enumerate(per_stage):
        waits = [(s["ts"], s["ts"] + s.get("dur", 0)) for s in events if s.get("cat") in WAITS]
        for span in events:
            shapes += span_shapes(span, waits, x, 44 + ROW * stage)
    present = {span.get("cat") for span in spans}
    entries = [style for category, style in STYLES.items() if category in present]
    shapes += legend(entries + [OTHER] * bool(present - set(STYLES)), left, axis_y + 62)
    m = int(metadata.get("n_micro_batches") or count_micro_batches(per_stage))
    shapes.append(text(left, axis_y + 88, bubble_caption(per_stage, m, tp), class_="caption"))
    # Room on the right for a minimum-width box that starts at the very end of the step.
    return document(left + TIME_WIDTH + MIN_OPTIMIZER_WIDTH + 24, axis_y + 100, shapes)


# The loss chart


def losses_svg(records: list, title: str = None) -> str:
    """An SVG chart of "loss" (a line) and "eval_loss" (a line with a dot on each point, the
    last one's value written below it: a falling loss reaches it from above) against "step"."""
    train, held_out = loss_points(records, "loss"), loss_points(records, "eval_loss")
    if not train and not held_out:
        raise BadInput("no line has a \"step\" and a finite \"loss\" or \"eval_loss\": pass the "
                       "metrics.jsonl of a run that has logged at least one step")
    steps, values = zip(*(train + held_out))
    x_ticks = nice_ticks(min(steps), max(steps), min_spacing=1)
    y_ticks = nice_ticks(min(values), max(values))
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
            path = " ".join(f"{x(step):.1f},{y(value):.1f}" for step, value in points)
            shapes.append(element("polyline", points=path, fill="none", stroke=colour,
                                  stroke_width=1.5, class_=name))
        if name == "eval-loss" or len(points) == 1:
            shapes += [element("circle", cx=x(step), cy=y(value), r=3, fill=colour, class_=name)
                       for step, value in points]
    if held_out:
        step, value = held_out[-1]
        anchor = "end" if x(step) > left + width * 0.8 else "start"
        at = dict(x=x(step) + (-6 if anchor == "end" else 6), y=y(value) + 18,
                  words=f"{value:.3f}", text_anchor=anchor)
        # Written twice, first with a wide white outline, to stay legible over the train line.
        shapes += [text(**at, stroke="white", stroke_width=3, fill="white"),
                   text(**at, fill=EVAL_COLOUR, class_="last-value")]
    series = (("train loss", TRAIN_COLOUR, train), ("eval loss", EVAL_COLOUR, held_out))
    entries = [(label, colour) for label, colour, points in series if points]
    return document(800, 460, shapes + legend(entries, left, 48))


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
