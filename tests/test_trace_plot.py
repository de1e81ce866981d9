"""Tracer spans, the Chrome trace file, bubble fractions, and the hand-written SVG pictures
(llama.tools.plot, drawn from what llama.tools.plot_inputs reads, with llama.tools.svg)."""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from llama.parallel import trace
from llama.tools import plot, plot_inputs, svg
from llama.errors import BadInput
from llama.parallel.trace import Tracer, bubble_fraction, ideal_bubble_fraction, write_chrome_trace

REPO = Path(__file__).resolve().parents[1]
SVG = "{http://www.w3.org/2000/svg}"


def span(stage, name, category, start, end, **args):
    return {"name": name, "cat": category, "ph": "X", "ts": float(start),
            "dur": float(end - start), "pid": stage, "tid": 0, "args": args}


def gpipe_two_stages(step=0, offset=0.0, optimizer=False):
    """GPipe, p=2, m=2: forwards take 10 us, backwards 20 us, transfers are free.

    Each stage computes 60 us of a 90 us step, so the bubble is 1/3, the ideal (p-1)/(m+p-1).
    """
    t = offset
    stage0 = [span(0, "F0", "forward", t + 0, t + 10, micro_batch=0, step=step),
              span(0, "F1", "forward", t + 10, t + 20, micro_batch=1, step=step),
              span(0, "recv dL/dh", "recv_wait", t + 20, t + 50, micro_batch=1, step=step),
              span(0, "B1", "backward", t + 50, t + 70, micro_batch=1, step=step),
              span(0, "B0", "backward", t + 70, t + 90, micro_batch=0, step=step)]
    stage1 = [span(1, "recv h", "recv_wait", t + 0, t + 10, micro_batch=0, step=step),
              span(1, "F0", "forward", t + 10, t + 20, micro_batch=0, step=step),
              span(1, "F1", "forward", t + 20, t + 30, micro_batch=1, step=step),
              span(1, "B1", "backward", t + 30, t + 50, micro_batch=1, step=step),
              span(1, "B0", "backward", t + 50, t + 70, micro_batch=0, step=step)]
    if optimizer:
        stage0.append(span(0, "step", "optimizer", t + 90, t + 100, step=step))
    return [stage0, stage1]


def test_disabled_tracer_records_nothing_and_reads_no_clock(monkeypatch):
    def no_clock():
        raise AssertionError("a disabled tracer read the clock")
    monkeypatch.setattr(trace.time, "time_ns", no_clock)
    tracer = Tracer(stage=0, enabled=False, synchronize=no_clock)
    with tracer.span("F0", "forward", micro_batch=0):
        pass
    assert tracer.events == []


def test_enabled_spans_nest_and_keep_their_args():
    synchronized = []
    tracer = Tracer(stage=2, enabled=True, synchronize=lambda: synchronized.append(1))
    with tracer.span("step", "optimizer", step=12):
        with tracer.span("F3", "forward", micro_batch=3, step=12):
            sum(range(1000))
    outer, inner = tracer.events
    assert (outer["name"], outer["cat"], outer["args"]) == ("step", "optimizer", {"step": 12})
    assert inner["args"] == {"micro_batch": 3, "step": 12}
    assert all(event["dur"] >= 0 and event["pid"] == 2 and event["ph"] == "X"
               for event in tracer.events)
    assert outer["ts"] <= inner["ts"]
    assert inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"]
    assert len(synchronized) == 4


def test_a_span_is_kept_when_its_body_raises():
    tracer = Tracer(stage=0, enabled=True)
    with pytest.raises(RuntimeError):
        with tracer.span("B0", "backward", micro_batch=0):
            raise RuntimeError("peer died")
    assert [event["name"] for event in tracer.events] == ["B0"]


def test_events_survive_a_json_round_trip():
    tracer = Tracer(stage=1, enabled=True)
    with tracer.span("recv h", "recv_wait", micro_batch=0, step=1):
        pass
    assert json.loads(json.dumps(tracer.events)) == tracer.events


def test_write_chrome_trace_structure(tmp_path):
    stages = gpipe_two_stages(offset=1.7e15)
    path = tmp_path / "trace.json"
    write_chrome_trace(str(path), stages, {"n_micro_batches": 2, "schedule": "gpipe"})
    written = json.loads(path.read_text())
    assert written["displayTimeUnit"] == "ms"
    assert written["metadata"] == {"n_stages": 2, "n_micro_batches": 2, "schedule": "gpipe"}
    names = {event["pid"]: event["args"]["name"] for event in written["traceEvents"]
             if event["ph"] == "M" and event["name"] == "process_name"}
    assert names == {0: "stage 0", 1: "stage 1"}
    spans = [event for event in written["traceEvents"] if event["ph"] == "X"]
    assert len(spans) == 10
    assert min(event["ts"] for event in spans) == 0
    assert {"name", "cat", "ph", "ts", "dur", "pid", "tid", "args"} <= set(spans[0])
    f1_on_stage1 = [e for e in spans if e["pid"] == 1 and e["name"] == "F1"]
    assert f1_on_stage1[0]["ts"] == 20 and f1_on_stage1[0]["dur"] == 10
    assert os.listdir(tmp_path) == ["trace.json"]


def test_bubble_fraction_of_a_known_gpipe_schedule():
    assert bubble_fraction(gpipe_two_stages()) == pytest.approx(1 / 3)
    assert bubble_fraction(gpipe_two_stages()) == pytest.approx(ideal_bubble_fraction(2, 2))
    # The optimizer step lengthens the wall time to 100 us while compute stays at 60 us.
    assert bubble_fraction(gpipe_two_stages(optimizer=True)) == pytest.approx(0.4)


def test_ideal_bubble_fraction():
    assert ideal_bubble_fraction(4, 16) == 3 / 19
    assert ideal_bubble_fraction(1, 8) == 0


def written_trace(tmp_path, steps=(0,), metadata=None):
    stages = [[], []]
    for index, step in enumerate(steps):
        for stage, events in enumerate(gpipe_two_stages(step, offset=index * 200, optimizer=True)):
            stages[stage] += events
    path = tmp_path / "trace.json"
    write_chrome_trace(str(path), stages, metadata or {"n_micro_batches": 2})
    return path


def parse_svg(text):
    return ElementTree.fromstring(text.encode("utf-8"))


def test_schedule_svg_has_a_row_per_stage_and_a_caption(tmp_path):
    svg = plot.schedule_svg(plot_inputs.load_trace(str(written_trace(tmp_path))), title="p<2 & m=2")
    root = parse_svg(svg)
    labels = [node.text for node in root.iter(f"{SVG}text")
              if node.get("class") == "stage-label"]
    assert labels == ["stage 0", "stage 1"]
    rects = [node.get("class") for node in root.iter(f"{SVG}rect")]
    assert rects.count("span forward") == 4 and rects.count("span backward") == 4
    assert rects.count("span recv_wait") == 2 and rects.count("span optimizer") == 1
    caption = [node.text for node in root.iter(f"{SVG}text") if node.get("class") == "caption"]
    assert caption[0].startswith("measured bubble 40.0%")
    assert "(40.0%, 40.0%)" in caption[0]  # each stage's idle share
    assert "1/3 = 33.3%" in caption[1]
    assert "p<2 & m=2" in [node.text for node in root.iter(f"{SVG}text")]


def test_schedule_draws_the_last_complete_step_by_default(tmp_path):
    path = written_trace(tmp_path, steps=(4, 5))
    loaded = plot_inputs.load_trace(str(path))
    # Cut step 5 short: its backwards never ran on stage 0.
    loaded["traceEvents"] = [event for event in loaded["traceEvents"]
                             if not (event.get("pid") == 0 and event.get("cat") == "backward"
                                     and event["args"].get("step") == 5)]
    spans, step = plot_inputs.select_step([e for e in loaded["traceEvents"] if e["ph"] == "X"])
    assert step == 4 and len(spans) == 11
    assert plot_inputs.select_step(spans, 4)[1] == 4
    with pytest.raises(BadInput, match="step 9"):
        plot_inputs.select_step(spans, 9)


def test_micro_batches_are_inferred_without_metadata(tmp_path):
    path = written_trace(tmp_path, metadata={"schedule": "gpipe"})
    svg = plot.schedule_svg(plot_inputs.load_trace(str(path)))
    assert "m=2 micro-batches" in svg
    assert "GPipe pipeline schedule: 2 stages × 2 micro-batches, training step 0 as traced" in svg


def write_metrics(tmp_path, lines):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_loss_svg_draws_train_and_eval_series(tmp_path):
    lines = [json.dumps({"step": step, "loss": 3.0 - 0.1 * step, "lr": 1e-3})
             for step in range(1, 21)]
    lines.insert(3, json.dumps({"step": 4, "tokens_per_s": 100.0}))
    lines += [json.dumps({"step": 10, "eval_loss": 2.5}),
              json.dumps({"step": 20, "eval_loss": 1.6}),
              '{"step": 21, "lo']  # a last line still being written
    records = plot_inputs.read_metrics(str(write_metrics(tmp_path, lines)))
    root = parse_svg(plot.losses_svg(records, title="stories260K"))
    polylines = {node.get("class"): node for node in root.iter(f"{SVG}polyline")}
    assert len(polylines["train-loss"].get("points").split()) == 20
    assert len(polylines["eval-loss"].get("points").split()) == 2
    texts = [node.text for node in root.iter(f"{SVG}text")]
    assert {"step", "loss (nats/token)", "training loss", "held-out loss",
            "stories260K"} <= set(texts)


def test_metrics_without_losses_or_lines_are_refused(tmp_path):
    with pytest.raises(BadInput, match="metrics.jsonl"):
        plot_inputs.read_metrics(str(write_metrics(tmp_path, [])))
    with pytest.raises(BadInput, match="missing.jsonl"):
        plot_inputs.read_metrics(str(tmp_path / "missing.jsonl"))
    no_loss = write_metrics(tmp_path, [json.dumps({"step": 1, "lr": 0.1})])
    with pytest.raises(BadInput, match="metrics.jsonl"):
        plot.losses(str(no_loss), str(tmp_path / "loss.svg"))
    broken = write_metrics(tmp_path, ["{not json", json.dumps({"step": 1, "loss": 2.0})])
    with pytest.raises(BadInput, match="line 1"):
        plot_inputs.read_metrics(str(broken))


def test_nice_ticks_cover_the_range_with_round_ticks():
    ticks = svg.nice_ticks(0.13, 0.87)
    assert ticks[0] <= 0.13 and ticks[-1] >= 0.87
    assert svg.tick_labels(ticks) == ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]
    assert svg.nice_ticks(5, 5, min_spacing=1) == [4, 5, 6]


def run_plot(*args):
    return subprocess.run([sys.executable, "-m", "llama.tools.plot", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_command_line_writes_both_pictures(tmp_path):
    schedule_out = tmp_path / "img" / "schedule.svg"
    done = run_plot("schedule", written_trace(tmp_path, steps=(0, 1)), "--out", schedule_out,
                    "--step", 0)
    assert done.returncode == 0, done.stderr
    assert "step 0" in schedule_out.read_text()
    parse_svg(schedule_out.read_text())
    metrics = write_metrics(tmp_path, [json.dumps({"step": s, "loss": 1.0 / s})
                                       for s in range(1, 5)])
    loss_out = tmp_path / "img" / "loss.svg"
    done = run_plot("losses", metrics, "--out", loss_out, "--title", "tiny run")
    assert done.returncode == 0, done.stderr
    assert parse_svg(loss_out.read_text()).find(f"{SVG}polyline") is not None


def test_command_line_reports_an_empty_metrics_file(tmp_path):
    done = run_plot("losses", write_metrics(tmp_path, []), "--out", tmp_path / "loss.svg")
    assert done.returncode == 2
    assert done.stderr.startswith("error: metrics file") and "metrics.jsonl" in done.stderr
    assert not (tmp_path / "loss.svg").exists()


def test_waits_nested_inside_compute_spans_count_as_idle():
    """The trainer records 'recv dL/dh' inside the backward span; that wait is not compute."""
    stage0 = [span(0, "F0", "forward", 0, 10, micro_batch=0, step=0),
              span(0, "B0", "backward", 10, 40, micro_batch=0, step=0),
              span(0, "recv dL/dh", "recv_wait", 10, 30, micro_batch=0, step=0)]
    assert trace.busy_time(stage0) == pytest.approx(20)
    assert bubble_fraction([stage0]) == pytest.approx(0.5)


# ---- the pictures as a user reads them: nothing hidden, nothing too thin ----

def nested_trace(tmp_path):
    """Stage 0 of a 2-stage step as the trainer records it: each wait inside its compute span,
    and a 0.2 us optimizer step at the end of a 200 us step (a sliver at 900 px)."""
    stage0 = [span(0, "F0", "forward", 0, 10, micro_batch=0, step=0),
              span(0, "F1", "forward", 10, 20, micro_batch=1, step=0),
              span(0, "B1", "backward", 20, 110, micro_batch=1, step=0),
              span(0, "recv dL/dh", "recv_wait", 20, 80, micro_batch=1, step=0),
              span(0, "B0", "backward", 110, 180, micro_batch=0, step=0),
              span(0, "recv dL/dh", "recv_wait", 110, 140, micro_batch=0, step=0),
              span(0, "optimizer step", "optimizer", 199.8, 200, step=0)]
    stage1 = [span(1, "F0", "forward", 0, 40, micro_batch=0, step=0),
              span(1, "recv h", "recv_wait", 0, 10, micro_batch=0, step=0),
              span(1, "F1", "forward", 40, 60, micro_batch=1, step=0),
              span(1, "B1", "backward", 60, 100, micro_batch=1, step=0),
              span(1, "B0", "backward", 100, 140, micro_batch=0, step=0)]
    path = tmp_path / "trace.json"
    write_chrome_trace(str(path), [stage0, stage1], {"n_micro_batches": 2})
    return path


def rect_box(node):
    x, y = float(node.get("x")), float(node.get("y"))
    return x, y, x + float(node.get("width")), y + float(node.get("height"))


def overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def span_rects(root, category):
    return [node for node in root.iter(f"{SVG}rect") if node.get("class") == f"span {category}"]


def test_waits_are_never_drawn_over_compute_boxes(tmp_path):
    root = parse_svg(plot.schedule_svg(plot_inputs.load_trace(str(nested_trace(tmp_path)))))
    waits = [rect_box(node) for node in span_rects(root, "recv_wait")]
    compute = [rect_box(node) for category in ("forward", "backward", "optimizer")
               for node in span_rects(root, category)]
    assert len(waits) == 3 and compute
    assert not [(w, c) for w in waits for c in compute if overlap(w, c)]


def test_micro_batch_numbers_are_visible_and_not_covered(tmp_path):
    root = parse_svg(plot.schedule_svg(plot_inputs.load_trace(str(nested_trace(tmp_path)))))
    numbers = [node for node in root.iter(f"{SVG}text") if node.get("class") == "micro-batch"]
    # Every compute box of this trace is wide enough for its number: 4 per stage.
    assert sorted(node.text for node in numbers) == ["0", "0", "0", "0", "1", "1", "1", "1"]
    waits = [rect_box(node) for node in span_rects(root, "recv_wait")]
    for node in numbers:
        x, y = float(node.get("x")), float(node.get("y"))
        assert not [w for w in waits if w[0] <= x <= w[2] and w[1] <= y - 4 <= w[3]]


def test_the_optimizer_step_is_never_a_sliver(tmp_path):
    root = parse_svg(plot.schedule_svg(plot_inputs.load_trace(str(nested_trace(tmp_path)))))
    (step,) = span_rects(root, "optimizer")
    assert float(step.get("width")) >= plot.MIN_OPTIMIZER_WIDTH
    assert float(step.get("x")) + float(step.get("width")) <= float(root.get("width"))


def eval_markers(root):
    return [node for node in root.iter(f"{SVG}circle") if node.get("class") == "eval-loss"]


def test_loss_svg_shows_every_held_out_point(tmp_path):
    lines = [json.dumps({"step": step, "loss": 3.0 - 0.1 * step}) for step in range(1, 21)]
    lines += [json.dumps({"step": 10, "eval_loss": 2.5}), json.dumps({"step": 20, "eval_loss": 1.6})]
    root = parse_svg(plot.losses_svg(plot_inputs.read_metrics(str(write_metrics(tmp_path, lines)))))
    assert len(eval_markers(root)) == 2
    texts = [node.text for node in root.iter(f"{SVG}text")]
    assert "1.600" in texts  # the last held-out loss, written beside its point


def test_loss_plot_adds_the_held_out_losses_of_prompt_json(tmp_path):
    """--eval_every longer than the run: metrics.jsonl has no eval_loss, but the run's
    prompt.json has the held-out loss before (step 0) and after training (the last step)."""
    metrics = write_metrics(tmp_path, [json.dumps({"step": s, "loss": 3.0 - 0.1 * s})
                                       for s in range(1, 9)])
    (tmp_path / "prompt.json").write_text(json.dumps(
        {"steps": 8, "losses": {"eval_loss_no_prompt": 3.4, "eval_loss_init": 3.1,
                                "eval_loss": 2.2, "train_loss": 2.3}}))
    out = tmp_path / "loss.svg"
    plot.losses(str(metrics), str(out))
    root = parse_svg(out.read_text())
    markers = eval_markers(root)
    assert len(markers) == 2
    texts = [node.text for node in root.iter(f"{SVG}text")]
    assert "2.200" in texts


# ---- readable as an image: every box numbered, every colour keyed, titles that say what is drawn

def texts_of(root, class_=None):
    return [node for node in root.iter(f"{SVG}text")
            if class_ is None or (node.get("class") or "").split()[:1] == [class_]]


def narrow_trace(tmp_path):
    """1F1B on 2 stages where stage 1's forwards take 0.5 us of a 200 us step: boxes far too
    narrow for their numbers, two of them side by side."""
    stage0 = [span(0, "F0", "forward", 0, 40, micro_batch=0, step=0),
              span(0, "F1", "forward", 40, 80, micro_batch=1, step=0),
              span(0, "B0", "backward", 80, 140, micro_batch=0, step=0),
              span(0, "B1", "backward", 140, 200, micro_batch=1, step=0)]
    stage1 = [span(1, "F0", "forward", 40, 40.5, micro_batch=0, step=0),
              span(1, "B0", "backward", 40.5, 41, micro_batch=0, step=0),
              span(1, "F1", "forward", 80, 80.5, micro_batch=1, step=0),
              span(1, "B1", "backward", 80.5, 81, micro_batch=1, step=0)]
    path = tmp_path / "trace.json"
    write_chrome_trace(str(path), [stage0, stage1], {"n_micro_batches": 2, "schedule": "1f1b"})
    return path


def test_every_compute_box_is_numbered_in_it_or_in_the_lane_above(tmp_path):
    """A number is text in the picture, not a tooltip: inside the box when it fits, else in
    the label lane just above it, never on top of another such number."""
    root = parse_svg(plot.schedule_svg(plot_inputs.load_trace(str(narrow_trace(tmp_path)))))
    inside = texts_of(root, "micro-batch")
    above = [node for node in inside if "above" in node.get("class")]
    assert sorted(node.text for node in inside) == ["0", "0", "0", "0", "1", "1", "1", "1"]
    assert len(above) == 4  # stage 1's four boxes
    narrow = sorted((rect_box(node) for category in ("forward", "backward")
                     for node in span_rects(root, category) if float(node.get("width")) < 5),
                    key=lambda box: box[0])
    assert len(narrow) == 4
    centres = sorted(float(node.get("x")) for node in above)
    for (x0, y0, x1, _), node in zip(narrow, sorted(above, key=lambda n: float(n.get("x")))):
        assert float(node.get("y")) < y0  # above its box
        assert abs(float(node.get("x")) - (x0 + x1) / 2) < 20  # and beside it
    widths = [plot.SMALL_CHAR_WIDTH * len(node.text) for node in above]
    spans_x = sorted((c - w / 2, c + w / 2) for c, w in zip(centres, widths))
    assert all(a[1] < b[0] for a, b in zip(spans_x, spans_x[1:]))  # no two overlap


def test_the_title_legend_and_caption_say_what_is_drawn(tmp_path):
    root = parse_svg(plot.schedule_svg(plot_inputs.load_trace(str(narrow_trace(tmp_path)))))
    (title,) = texts_of(root, "title")
    assert title.text == ("1F1B pipeline schedule: 2 stages × 2 micro-batches, training step 0 "
                          "as traced")
    keys = [node.text for node in texts_of(root, "legend")]
    assert keys == ["forward of micro-batch n", "backward of micro-batch n"]
    caption = [node.text for node in texts_of(root, "caption")]
    assert len(caption) == 3 and caption[2].startswith("ideal for these stages' own costs")


def test_the_modelled_bubble_is_the_formula_for_equal_stages_and_above_it_for_unequal_ones():
    """The caption's third line: the schedule run with each stage's mean forward and backward
    and free transfers. Equal stages give (p-1)/(m+p-1); here stage 1 costs half of stage 0,
    so stage 1 waits for stage 0 and the bubble grows."""
    equal = gpipe_two_stages()
    assert plot_inputs.modelled_bubble_fraction(equal, "gpipe", 2) == pytest.approx(1 / 3)
    assert plot_inputs.modelled_bubble_fraction(equal, "1f1b", 2) == pytest.approx(1 / 3)
    # the optimizer step is idle time at the end, as in the measurement
    with_step = gpipe_two_stages(optimizer=True)
    assert plot_inputs.modelled_bubble_fraction(with_step, "gpipe", 2) == pytest.approx(0.4)
    half = [equal[0], [event if event["cat"] == "recv_wait" else dict(event, dur=event["dur"] / 2)
                       for event in equal[1]]]
    # stage 0: F0 0-10, F1 10-20; stage 1: F0 10-15, F1 20-25, B0 25-35, B1 35-45; stage 0:
    # B0 35-55, B1 55-75. Busy 60 and 30 of 75 us.
    modelled = plot_inputs.modelled_bubble_fraction(half, "gpipe", 2)
    assert modelled == pytest.approx(((1 - 60 / 75) + (1 - 30 / 75)) / 2) and modelled > 1 / 3
    assert plot_inputs.modelled_bubble_fraction(half, None, 2) is None


def test_waits_inside_a_span_are_not_counted_in_its_mean_time():
    stage0, _ = gpipe_two_stages()
    nested = stage0 + [span(0, "recv dL/dh", "recv_wait", 50, 60, micro_batch=1, step=0)]
    assert plot_inputs.mean_compute_times(nested) == pytest.approx((10, 15))


def untuned_run(tmp_path):
    metrics = write_metrics(tmp_path, [json.dumps({"step": s, "loss": 3.0 - 0.1 * s})
                                       for s in range(1, 9)])
    (tmp_path / "tuning.json").write_text(json.dumps(
        {"steps": 8, "losses": {"eval_loss_no_prompt": 3.4, "eval_loss_init": 3.1,
                                "eval_loss": 2.2, "train_loss": 2.3}}))
    out = tmp_path / "loss.svg"
    plot.losses(str(metrics), str(out))
    return parse_svg(out.read_text())


def test_the_loss_chart_draws_the_untuned_baseline_with_its_value_and_key(tmp_path):
    """The held-out loss without the tuning, which the pages compare the trained one against,
    is on the chart: a dashed line across at its value, the value written, a legend key."""
    root = untuned_run(tmp_path)
    (baseline,) = [node for node in root.iter(f"{SVG}line") if node.get("class") == "untuned-loss"]
    assert baseline.get("stroke-dasharray") and baseline.get("y1") == baseline.get("y2")
    markers = eval_markers(root)  # step 0 (3.1) and step 8 (2.2): the baseline lies above both
    assert float(baseline.get("y1")) < min(float(node.get("cy")) for node in markers)
    assert [node.text for node in texts_of(root, "untuned-value")] == ["3.400"]
    assert [node.text for node in texts_of(root, "legend")] == [
        "training loss", "held-out loss", "held-out loss of the untuned model"]
    assert [node.text for node in texts_of(root, "title")] == ["training loss and held-out loss"]


def test_the_loss_chart_title_names_only_what_is_drawn(tmp_path):
    train_only = [{"step": s, "loss": 2.0} for s in range(1, 4)]
    held_out_only = [{"step": s, "eval_loss": 2.0} for s in range(1, 4)]
    for records, title in ((train_only, "training loss"), (held_out_only, "held-out loss")):
        root = parse_svg(plot.losses_svg(records))
        assert [node.text for node in texts_of(root, "title")] == [title]
