"""Draw a pipeline trace as an SVG timeline, or training losses as an SVG line chart, by hand.

  python -m llama.tools.plot schedule runs/x/trace.json --out docs/img/schedule.svg [--title T] [--step N]
  python -m llama.tools.plot losses runs/x/metrics.jsonl --out docs/img/loss.svg [--title T]
"""
from llama.cli import run_cli
from llama.errors import BadInput
from llama.formats.files import atomic_write_text
from llama.parallel.trace import events_by_stage, ideal_bubble_fraction, idle_shares
from llama.tools.plot_inputs import (count_micro_batches, held_out_from_tuning_json, is_span,
                                     load_trace, loss_points, modelled_bubble_fraction,
                                     read_metrics, select_step, stage_labels)
from llama.tools.svg import (CHAR_WIDTH, HATCH, SMALL_CHAR_WIDTH, document, element, legend,
                             line, nice_ticks, rect, text, tick_labels, x_axis)

# category: (legend label, fill); n is the number written in or above each box
STYLES = {"forward": ("forward of micro-batch n", "#4c78a8"),
          "backward": ("backward of micro-batch n", "#f58518"),
          "optimizer": ("optimizer step", "#54a24b"), "eval": ("eval of micro-batch n", "#b279a2"),
          "recv_wait": ("waiting for a peer (lane below)", "url(#hatch)"),
          "send": ("send", "#444444"),
          "all_reduce": ("TP all-reduce", "#e45756")}
OTHER = ("other", "#bbbbbb")
# The trainer records a wait inside the forward or backward it holds up; on the same lane it would
# cover that box, so waits get a thin lane of their own beneath each stage's compute lane.
WAITS = ("recv_wait", "send", "all_reduce")
# px: numbers too wide for their box (label lane, above), compute lane, wait lane (2 px below
# it), one stage's row
LABEL_LANE, BOX, WAIT_LANE, ROW = 12, 28, 8, 60
TIME_WIDTH = 900  # px of the time axis
MIN_OPTIMIZER_WIDTH = 6.0  # px: a step of a few microseconds stays visible beside 900 px of step
TRAIN_COLOUR, EVAL_COLOUR, UNTUNED_COLOUR = "#4c78a8", "#e45756", "#666666"
SCHEDULE_NAMES = {"1f1b": "1F1B", "gpipe": "GPipe"}


# The schedule timeline


def bubble_caption(per_stage: list, m: int, schedule: str = None, tp: int = 1) -> list:
    """The caption's lines: the measured bubble and each stage's idle share; the bubble of
    stages of equal cost; the bubble these stages' own mean times would leave. per_stage: a row
    per rank, tp rows a stage (its TP ranks)."""
    idle = idle_shares(per_stage)
    p = len(per_stage) // tp
    rows = "the stages" if tp == 1 else "the ranks"
    lines = [f"measured bubble {sum(idle) / len(idle):.1%}: the idle share of the step, averaged "
             f"over {rows} ({', '.join(f'{share:.1%}' for share in idle)})"]
    if m:
        lines.append(f"ideal for {p} stages of equal cost and m={m} micro-batches: "
                     f"(p−1)/(m+p−1) = {p - 1}/{m + p - 1} = {ideal_bubble_fraction(p, m):.1%}")
    modelled = modelled_bubble_fraction(per_stage[::tp], schedule, m)  # TP rank 0 of each
    if modelled is not None:
        lines.append(f"ideal for these stages' own costs (each stage's mean forward and "
                     f"backward as measured, transfers free): {modelled:.1%}")
    return lines


def compute_pieces(start: float, end: float, waits: list) -> list:
    """The (start, end) parts of a compute span that no wait of its stage covers: the time the
    stage really computed, as bubble_fraction counts it."""
    pieces = [(start, end)]
    for wait_start, wait_end in waits:
        pieces = [piece for start, end in pieces
                  for piece in ((start, min(end, wait_start)), (max(start, wait_end), end))
                  if piece[1] > piece[0]]
    return pieces


def span_shapes(span: dict, waits: list, x, top: float):
    """(shapes, label left over): a wait's box in the thin lane; a compute span's boxes in the
    upper lane, cut around the waits inside it, its micro-batch number in every box it fits in.
    When it fits in none, (x of the widest box's middle, number) is left for the label lane."""
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
    if category in WAITS or not boxes or number is None:
        return shapes, None
    fitting = [(left, width) for left, width in boxes
               if width >= CHAR_WIDTH * len(str(number)) + 4]
    shapes += [text(left + width / 2, top + BOX / 2 + 4, number, text_anchor="middle",
                    fill="white", class_="micro-batch") for left, width in fitting]
    if fitting:
        return shapes, None
    left, width = max(boxes, key=lambda box: box[1])
    return shapes, (left + width / 2, number)


def lane_labels(pending: list, top: float) -> list:
    """The numbers of boxes too narrow for them, in the lane above the boxes, left to right; a
    number pushed right of its box by the one before it gets a line down to its box."""
    shapes, free_from = [], float("-inf")
    for middle, number in sorted(pending, key=lambda label: label[0]):
        width = SMALL_CHAR_WIDTH * len(str(number))
        at = max(middle, free_from + width / 2 + 3)
        shapes.append(text(at, top + LABEL_LANE - 2, number, text_anchor="middle", font_size=10,
                           class_="micro-batch above"))
        if at - middle > width / 2:
            shapes.append(line(at, top + LABEL_LANE - 1, middle, top + LABEL_LANE + 2,
                               stroke="#888888", stroke_width=0.5))
        free_from = at + width / 2
    return shapes


def schedule_title(metadata: dict, n_stages: int, m: int, step, tp: int = 1) -> str:
    """What the picture shows: the schedule, its size, and which step of the run."""
    name = metadata.get("schedule")
    kind = f"{SCHEDULE_NAMES.get(name, name)} pipeline schedule" if name else "pipeline schedule"
    stages = f"{n_stages} stages" + (f" (TP {tp} each)" if tp > 1 else "")
    size = f"{stages} × {m} micro-batches" if m else stages
    when = "as traced" if step is None else f"training step {step} as traced"
    return f"{kind}: {size}, {when}"


def stage_rows(labels: list, left: float) -> list:
    """Each stage's background lanes and its name."""
    shapes = []
    for stage, label in enumerate(labels):
        top = 44 + ROW * stage + LABEL_LANE
        shapes += [rect(left, top, TIME_WIDTH, BOX, "#f4f4f4"),
                   rect(left, top + BOX + 2, TIME_WIDTH, WAIT_LANE, "#fafafa"),
                   text(left - 8, top + BOX / 2 + 4, label, text_anchor="end",
                        class_="stage-label")]
    return shapes


def schedule_svg(trace: dict, title: str = None, step: int = None) -> str:
    """The SVG timeline of one step of a loaded trace (see select_step for which one): a row per
    stage, the time axis, a legend, and the measured and the ideal bubbles."""
    metadata = trace.get("metadata") or {}
    spans, step = select_step([event for event in trace["traceEvents"] if is_span(event)], step)
    tp = int(metadata.get("tp") or 1)  # a row per rank: a stage's TP ranks are its rows
    n_stages = int(metadata.get("n_stages") or
                   (1 + max(span.get("pid", 0) for span in spans)) // tp)
    per_stage = events_by_stage(spans, n_stages * tp)
    spans = [span for events in per_stage for span in events]
    if not spans:
        raise BadInput(f"no spans belong to ranks 0..{n_stages * tp - 1} (metadata n_stages): "
                       "pass a trace whose metadata matches its events")
    m = int(metadata.get("n_micro_batches") or count_micro_batches(per_stage))
    title = schedule_title(metadata, n_stages, m, step, tp) if title is None else title
    labels = stage_labels(trace, n_stages * tp, tp)
    left, axis_y = 24 + CHAR_WIDTH * max(map(len, labels)), 40 + ROW * n_stages * tp
    origin = min(span["ts"] for span in spans)
    # The axis ends where the step ends, not at the next round tick, to keep the boxes wide.
    length_ms = max(max(span["ts"] + span.get("dur", 0) for span in spans) - origin, 1.0) / 1000

    def x(ts_us: float) -> float:
        return left + (ts_us - origin) / 1000 / length_ms * TIME_WIDTH

    shapes = [HATCH, text(left, 26, title, font_size=16, font_weight="bold", class_="title")]
    shapes += stage_rows(labels, left)
    ticks = [tick for tick in nice_ticks(0.0, length_ms) if tick <= length_ms * 1.0001]
    shapes += x_axis(ticks, lambda ms: x(origin + ms * 1000), axis_y, grid_top=44 + LABEL_LANE)
    shapes += [line(left, axis_y, left + TIME_WIDTH, axis_y),
               text(left + TIME_WIDTH / 2, axis_y + 36, "time (ms)", text_anchor="middle")]
    for stage, events in enumerate(per_stage):
        waits = [(s["ts"], s["ts"] + s.get("dur", 0)) for s in events if s.get("cat") in WAITS]
        pending = []
        for span in events:
            drawn, label = span_shapes(span, waits, x, 44 + ROW * stage + LABEL_LANE)
            shapes += drawn
            pending += [label] if label else []
        shapes += lane_labels(pending, 44 + ROW * stage)
    present = {span.get("cat") for span in spans}
    entries = [style for category, style in STYLES.items() if category in present]
    shapes += legend(entries + [OTHER] * bool(present - set(STYLES)), left, axis_y + 62)
    caption = bubble_caption(per_stage, m, metadata.get("schedule"), tp)
    shapes += [text(left, axis_y + 88 + 18 * row, words, class_="caption")
               for row, words in enumerate(caption)]
    # Room on the right for a minimum-width box that starts at the very end of the step.
    return document(left + TIME_WIDTH + MIN_OPTIMIZER_WIDTH + 24, axis_y + 82 + 18 * len(caption),
                    shapes)


# The loss chart


def loss_title(train: list, held_out: list) -> str:
    return {(True, True): "training loss and held-out loss", (True, False): "training loss",
            (False, True): "held-out loss"}[bool(train), bool(held_out)]


def losses_svg(records: list, title: str = None) -> str:
    """An SVG chart of "loss" (a line) and "eval_loss" (a line with a dot on each point, the
    last one's value written below it: a falling loss reaches it from above) against "step",
    and, when a record holds "eval_loss_untuned", that held-out loss of the model without the
    tuning as a dashed line across, its value at its right end: the baseline to beat."""
    train, held_out = loss_points(records, "loss"), loss_points(records, "eval_loss")
    if not train and not held_out:
        raise BadInput("no line has a \"step\" and a finite \"loss\" or \"eval_loss\": pass the "
                       "metrics.jsonl of a run that has logged at least one step")
    untuned = next((record["eval_loss_untuned"] for record in records
                    if "eval_loss_untuned" in record), None)
    steps, values = zip(*(train + held_out))
    x_ticks = nice_ticks(min(steps), max(steps), min_spacing=1)
    y_ticks = nice_ticks(min(values + (untuned,) * (untuned is not None)),
                         max(values + (untuned,) * (untuned is not None)))
    left, top, width, height = 72, 60, 704, 344  # px: the plot area inside an 800 x 460 picture

    def x(step: float) -> float:
        return left + (step - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * width

    def y(value: float) -> float:
        return top + (y_ticks[-1] - value) / (y_ticks[-1] - y_ticks[0]) * height

    shapes = [text(left, 26, loss_title(train, held_out) if title is None else title,
                   font_size=16, font_weight="bold", class_="title")]
    for tick, label in zip(y_ticks, tick_labels(y_ticks)):
        shapes += [line(left, y(tick), left + width, y(tick), stroke="#e4e4e4"),
                   text(left - 8, y(tick) + 4, label, text_anchor="end")]
    shapes += x_axis(x_ticks, x, top + height)
    shapes += [element("polyline", points=f"{left},{top} {left},{top + height} "
                       f"{left + width},{top + height}", fill="none", stroke="#222222"),
               text(left + width / 2, 448, "step", text_anchor="middle"),
               text(18, top + height / 2, "loss (nats/token)", text_anchor="middle",
                    transform=f"rotate(-90 18 {top + height / 2})")]
    if untuned is not None:
        shapes += [line(left, y(untuned), left + width, y(untuned), stroke=UNTUNED_COLOUR,
                        stroke_dasharray="6 4", class_="untuned-loss"),
                   *outlined_value(left + width - 6, y(untuned) - 6, f"{untuned:.3f}", "end",
                                   UNTUNED_COLOUR, "untuned-value")]
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
        shapes += outlined_value(x(step) + (-6 if anchor == "end" else 6), y(value) + 18,
                                 f"{value:.3f}", anchor, EVAL_COLOUR, "last-value")
    entries = [("training loss", TRAIN_COLOUR)] * bool(train) + \
        [("held-out loss", EVAL_COLOUR)] * bool(held_out) + \
        [("held-out loss of the untuned model", UNTUNED_COLOUR, "dashed")] * \
        (untuned is not None)
    return document(800, 460, shapes + legend(entries, left, 48))


def outlined_value(x: float, y: float, words: str, anchor: str, colour: str, class_: str):
    """A number written twice, first with a wide white outline, to stay legible over a line."""
    at = dict(x=x, y=y, words=words, text_anchor=anchor)
    return [text(**at, stroke="white", stroke_width=3, fill="white"),
            text(**at, fill=colour, class_=class_)]


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
    """Draw the training loss and the held-out loss of a metrics.jsonl as an SVG line chart.

    The held-out losses before and after training, and that of the untuned model (the
    baseline, a dashed line), come from the tuning.json beside it, if any.

    metrics_path: the metrics.jsonl of a training run (ft_main.py's --out)
    out: the SVG file to write
    title: the chart's title (default: says which losses are drawn)
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
