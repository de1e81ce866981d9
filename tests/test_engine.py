"""The one generation engine: rows of every tuning (none, soft prompt, prefix, adapter, two
different LoRAs) share a batch, join at different steps and each generates what it generates
alone, greedy and sampled; on one process and on two stages; the static (CUDA-graph) decode
mode gives the same ids.
Run: python3 -m pytest -q tests/test_engine.py
"""
import json
import os

import pytest

import split_model
from launch import check_all_ok, launch
from llama.errors import BadInput
from llama.formats.checkpoint import load_model
from llama.parallel.distributed import DistContext
from llama.parallel.pipeline import Stage
from llama.serving.engine import Engine
from llama.serving.scheduler import Batcher, Request
from workers.engine_worker import ROWS, mixed_and_alone, run_alone, run_rows, tunings


@pytest.fixture(scope="module")
def single(model_bin):
    model = load_model(model_bin)
    return mixed_and_alone(Stage(model, DistContext()), tunings(model, DistContext()))


def test_a_mixed_batch_with_rows_joining_late_equals_each_row_alone(single):
    assert single["mixed"] == single["alone"]
    assert all(single["alone"]), "every row generates something"


def test_tunings_change_what_a_row_says(model_bin):
    model = load_model(model_bin)
    stage, named = Stage(model, DistContext()), tunings(model, DistContext())
    names = (None, "prompt", "prefix", "adapter", "lora", "lora2")
    rows = [(name, [1, 300, 400], 0.0, 0) for name in names]
    outs, _ = run_rows(stage, named, rows, max_rows=6)
    assert len({tuple(o) for o in outs}) == len(names), outs


def test_static_decode_mode_gives_the_same_ids_and_captures_per_batch_and_adapters(model_bin,
                                                                                 single):
    model = load_model(model_bin)
    stage, named = Stage(model, DistContext()), tunings(model, DistContext())
    outs, engine = run_rows(stage, named, ROWS, max_rows=4, cuda_graph=True)
    assert outs == single["mixed"]
    keys = set(engine.graphs.steps)
    assert any("adapter" in gated for _, gated in keys) and any("lora" in gated for _, gated in keys)
    assert any(gated == () for _, gated in keys), keys


def test_rows_of_two_loras_in_one_batch_each_generate_what_they_generate_alone(model_bin):
    """Two different LoRAs (ranks 4 and 2, both on q) and the plain model in one batch, in
    prefill and in every decode step: each row its own A and B, none another's."""
    model = load_model(model_bin)
    stage, named = Stage(model, DistContext()), tunings(model, DistContext())
    rows = [("lora", [1, 300, 400], 0.0, 0), ("lora2", [1, 300, 400], 0.0, 0),
            (None, [1, 300, 400], 0.0, 0), ("lora2", [1, 403], 0.8, 2)]
    outs, engine = run_rows(stage, named, rows, max_rows=4, cuda_graph=True)
    assert any(set(gated) == {"lora", "lora2"} for _, gated in engine.graphs.steps)
    assert outs == [run_alone(stage, named, row, seed=i) for i, row in enumerate(rows)]
    assert len({tuple(out) for out in outs[:3]}) == 3, "the same ids: each LoRA changes them"


@pytest.mark.parametrize("n_stages", [2, 4])
def test_stages_generate_what_one_process_generates(model_bin, single, tmp_path, n_stages):
    split_model.main(str(model_bin), n_stages, out_dir=str(tmp_path / "split"))
    out = tmp_path / "ids.json"
    argv = [os.path.join("tests", "workers", "engine_worker.py"), "--ckpt", str(tmp_path / "split"),
            "--out", str(out)]
    check_all_ok(launch(argv, n_stages, timeout_s=300))
    assert json.loads(out.read_text()) == single


def test_a_request_that_cannot_fit_is_refused_in_one_line(model_bin):
    stage = Stage(load_model(model_bin), DistContext())
    engine = Engine(stage, max_rows=1, length=8)
    try:
        with pytest.raises(BadInput, match="do not fit 8 positions: shorten the prompt"):
            Batcher(engine).submit(Request(list(range(1, 9)), 4))
    finally:
        engine.close()


def test_rows_whose_padding_would_not_fit_are_prefilled_one_by_one(model_bin):
    """A prefix row (text after its 3 positions) joining with a longer plain row in a cache of
    10 positions: padded together they would write past the end, so each goes alone."""
    model = load_model(model_bin)
    stage, named = Stage(model, DistContext()), tunings(model, DistContext())

    def run(rows):
        engine = Engine(stage, named, max_rows=2, length=10)
        try:
            requests = [Request(ids, 8, tuning) for tuning, ids in rows]
            batcher = Batcher(engine)
            for request in requests:
                batcher.submit(request)
            batcher.run()
        finally:
            engine.close()
        return [r.new for r in requests]

    rows = [("prefix", [1, 403]), (None, [1, 403, 407, 261, 280, 300, 290, 310])]
    together = run(rows)
    assert together == [run([row])[0] for row in rows]
    assert len(together[1]) == 2  # at positions 8 and 9: the cache is full then
