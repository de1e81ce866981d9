"""The benchmarks still run: each once on the CPU with the tiny shape, its JSON lines checked.

Not a timing test: no speed or memory figure is asserted, only that the lines parse and carry
their fields (and that the arithmetic of bench.memory_estimate matches what autograd saves).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--shape", "tiny", "--device", "cpu"]
ENVIRONMENT = ("device", "device_name", "torch", "date")


def run_bench(module, *argv, expect_rc=0, timeout=120):
    """`python -m bench.<module> argv` from the repository; its JSON lines and its output."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", f"bench.{module}", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == expect_rc, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return lines, done


def table_after_json(stdout):
    """The lines printed after the last JSON line: the table's header and its rows."""
    lines = stdout.splitlines()
    last_json = max(i for i, line in enumerate(lines) if line.startswith("{"))
    return [line for line in lines[last_json + 1:] if line.strip()]


def has_fields(record, fields):
    missing = [f for f in fields if f not in record]
    assert not missing, f"{record} lacks {missing}"


def test_train_bench_two_stages_then_one_stage_and_hf():
    lines, done = run_bench("train_bench", *TINY, "--n_stages", "2", "--seq_len", "12",
                            "--n_virtual_tokens", "4", "--global_batch", "4", "--micro_batch", "2",
                            "--recompute", "True", "--steps", "1", "--warmup_steps", "1",
                            "--compare_single_stage", "--compare_hf")
    ours = [r for r in lines if r.get("bench") == "train" and r.get("impl") == "ours"]
    assert [r["n_stages"] for r in ours] == [2, 1]
    for record in ours:
        has_fields(record, ["tokens_per_s", "step_time_s", "peak_mem_gib", "bubble_measured",
                            "bubble_ideal", "weight_bytes", "loss", "n_micro", *ENVIRONMENT])
        assert len(record["peak_mem_gib"]) == record["n_stages"]
        assert record["tokens_per_s"] > 0 and 0 <= record["bubble_measured"] <= 1
    assert ours[0]["backend"] == "gloo" and ours[0]["stage_layers"] == [[0, 2], [2, 4]]
    assert ours[0]["bubble_ideal"] == pytest.approx(1 / 3)  # (p-1)/(m+p-1), p = m = 2
    assert abs(ours[0]["loss"] - ours[1]["loss"]) < 1e-3  # same weights, same batch, same step
    ratios = [r for r in lines if r.get("bench") == "train_ratio"]
    assert ratios and all(r["tokens_per_s_ratio"] > 0 for r in ratios)
    hf = [r for r in lines if r.get("impl") == "hf_peft"]
    assert hf, "the HF comparison must either run or say it was skipped"
    assert "skipped" in hf[0] or "tokens_per_s" in hf[0]
    assert "tokens_per_s" in table_after_json(done.stdout)[0]


def test_decode_bench_two_stages_then_one_stage():
    lines, done = run_bench("decode_bench", *TINY, "--n_stages", "2", "--batch", "1,2",
                            "--prompt_len", "4", "--gen_len", "4", "--repeats", "1",
                            "--copy_mib", "4", "--compare_single_stage")
    ours = [r for r in lines if r.get("bench") == "decode"]
    assert [(r["n_stages"], r["batch"]) for r in ours] == [(2, 1), (2, 2), (1, 1), (1, 2)]
    for record in ours:
        has_fields(record, ["decode_tokens_per_s", "end_to_end_tokens_per_s", "model_bytes",
                            "copy_bandwidth_gb_s", "bandwidth_limit_tokens_per_s",
                            "bandwidth_share", "peak_mem_gib", *ENVIRONMENT])
        assert record["mode"] == "eager" and record["model_bytes"] == ours[0]["model_bytes"]
    assert len([r for r in lines if r.get("bench") == "decode_ratio"]) == 2
    header, *rows = table_after_json(done.stdout)
    assert "decode_tokens_per_s" in header and len(rows) == 4


def test_decode_bench_quantized_variants_in_alternation():
    """--quantize: float, int8 with its int8 head and int4 through its int8 copy (generation's
    defaults), int8 with the float head, in one process; a decode step reads no embedding table,
    and int8 blocks read fewer bytes than float ones."""
    names = ["none", "int8", "int4", "int8_float_head"]
    lines, done = run_bench("decode_bench", *TINY, "--batch", "1", "--prompt_len", "4",
                            "--gen_len", "3", "--repeats", "2", "--quantize", ",".join(names))
    records = [r for r in lines if r.get("bench") == "decode_variants"]
    assert [r["variant"] for r in records] == names
    for record in records:
        has_fields(record, ["decode_tokens_per_s_median", "decode_tokens_per_s_min", "path",
                            "decode_tokens_per_s_max", "vs_first_median", "step_read_gb",
                            "bandwidth_share_median", "copy_gb_s_median", *ENVIRONMENT])
        assert record["step_read_gb"] < record["model_gb"]
    read = [r["step_read_gb"] for r in records]
    assert read[1] == read[2] < read[3] < read[0]  # int4 reads its int8 copy
    assert "decode_tokens_per_s_median" in table_after_json(done.stdout)[0]


def test_decode_bench_static_cache_path_with_compiled_blocks():
    """--cuda_graph runs the product's static decode (captured only on a GPU); --compile aot_eager
    traces the blocks without building kernels, so the rehearsal stays quick on a CPU."""
    lines, done = run_bench("decode_bench", *TINY, "--batch", "1", "--prompt_len", "4",
                            "--gen_len", "4", "--repeats", "1", "--copy_mib", "4", "--cuda_graph",
                            "--compile", "aot_eager")
    (record,) = [r for r in lines if r.get("bench") == "decode"]
    assert record["mode"] == "static" and record["compile"] == "aot_eager"
    assert record["decode_tokens_per_s"] > 0
    assert "static" in table_after_json(done.stdout)[1]


def test_train_bench_selective_recompute_compiled_and_fused():
    lines, _ = run_bench("train_bench", *TINY, "--seq_len", "12", "--n_virtual_tokens", "4",
                         "--global_batch", "2", "--micro_batch", "1", "--recompute", "True",
                         "--recompute_mode", "selective", "--compile", "aot_eager", "--fused",
                         "--steps", "1", "--warmup_steps", "1")
    (record,) = [r for r in lines if r.get("bench") == "train"]
    assert (record["mode"], record["compile"], record["fused"]) == ("selective", "aot_eager", True)
    assert record["tokens_per_s"] > 0 and record["loss"] > 0


def test_memory_estimate_formula_matches_what_autograd_saves():
    lines, _ = run_bench("memory_estimate", "--shape", "tiny", "--n_stages", "2",
                         "--micro_batch", "1,2", "--global_batch", "4", "--seq_len", "12",
                         "--n_virtual_tokens", "4", "--check", "--device", "cpu")
    rows = [r for r in lines if r["bench"] == "memory_estimate"]
    assert [(r["micro_batch"], r["stage"]) for r in rows] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for row in rows:
        has_fields(row, ["weights_gib", "kept_plain_gib", "kept_recompute_gib", "peak_plain_gib",
                         "peak_recompute_gib", "peak_offload_gib", "in_flight"])
        assert row["kept_offload_gib"] < row["kept_recompute_gib"] < row["kept_plain_gib"]
    assert [r["in_flight"] for r in rows] == [2, 1, 2, 1]  # 1F1B: p - stage
    # offloaded, a micro-batch keeps on the device what Stage.in_flight holds: the stage's input
    # and, but on the last stage, its output
    for first, last in (rows[:2], rows[2:]):
        assert first["kept_offload_gib"] == pytest.approx(2 * last["kept_offload_gib"])
    check = next(r for r in lines if r["bench"] == "memory_check")
    assert check["measured_bytes_per_token_per_layer"] == check["formula_bytes_per_token_per_layer"]


def test_synthetic_batches_train_the_same_positions_as_hf_labels(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from bench.train_bench import synthetic_batches
    ours, theirs = synthetic_batches(512, 4, 2, 10, 0.5, seed=0)
    for batch, (input_ids, labels) in zip(ours, theirs):
        assert (batch.tokens == input_ids).all()
        # HF predicts labels[t + 1] at position t; ours stores that target at t itself
        assert (batch.targets[:, :-1] == labels[:, 1:]).all() and (batch.targets[:, -1] == -100).all()
        assert batch.n_targets == int((labels != -100).sum()) == 2 * 4


def test_train_bench_quantized_stages_hold_fewer_weight_bytes():
    """--quantize gives each stage random int8 / int4 codes of a real quantized stage's size (the
    GPU check runs 7B int4 on 2 stages and int8 on 4 under --memory_cap_gib, a no-op on a CPU)."""
    weight_bytes = {}
    for scheme in (None, "int8", "int4"):
        argv = [*TINY, "--seq_len", "8", "--n_virtual_tokens", "2", "--global_batch", "2",
                "--micro_batch", "1", "--steps", "1", "--warmup_steps", "1",
                "--memory_cap_gib", "4"]
        lines, done = run_bench("train_bench", *argv, *(["--quantize", scheme] if scheme else []))
        (record,) = [r for r in lines if r.get("bench") == "train"]
        assert record["quantize"] == scheme and record["loss"] > 0
        weight_bytes[scheme] = record["weight_bytes"][0]
        assert "applies to GPUs only" in done.stdout
    assert weight_bytes[None] > weight_bytes["int8"] > weight_bytes["int4"]


def test_serve_bench_goes_through_the_projects_command_line(model_bin):
    """One CLI path (llama.cli.run_cli): --help from the docstring, a misspelt flag refused
    before any work, then a short run of both ways of serving, their clients in another
    process, every request answered and timed."""
    _, done = run_bench("serve_bench", "--help")
    assert done.stdout.startswith("Continuous against static batching in serve.py's server") \
        and not done.stderr
    assert "--concurrency" in done.stdout and "--requests_per_client INT (default 8)" in done.stdout
    _, done = run_bench("serve_bench", "--ckpt_dir", str(model_bin), "--concurency", "2",
                        expect_rc=2)
    assert done.stderr == ("error: unknown flag --concurency (did you mean --concurrency?); "
                           "python -m bench.serve_bench --help lists the flags\n")
    lines, done = run_bench("serve_bench", "--ckpt_dir", str(model_bin), "--concurrency", "2",
                            "--requests_per_client", "2", "--max_tokens", "4", "--repeats", "1")
    machine, *runs = lines
    assert machine["machine"].startswith("CPU") and machine["date"]
    assert [(r["concurrency"], r["batching"], r["requests"]) for r in runs] == \
        [(2, "continuous", 4), (2, "static", 4)]
    assert runs[0]["tokens"] == runs[1]["tokens"] > 0  # greedy: the same replies either way
    assert all(0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] for r in runs)
    assert "TTFT p99 ms" in table_after_json(done.stdout)[1]


def test_train_bench_trains_lora_pairs_on_each_stage_of_an_int4_base(monkeypatch):
    """--method lora (gpu_check.sh's QLoRA memory part, rehearsed on the tiny shape): each stage
    trains the LoRA pairs of its own layers, every one of them, and nothing else."""
    monkeypatch.syspath_prepend(str(REPO))
    from bench.shapes import model_args
    from llama.tuning.lora import expected_lora_shapes
    lines, _ = run_bench("train_bench", *TINY, "--n_stages", "2", "--seq_len", "12",
                         "--global_batch", "4", "--micro_batch", "2", "--recompute", "True",
                         "--steps", "1", "--warmup_steps", "1", "--quantize", "int4",
                         "--method", "lora", "--lora_r", "4", "--lora_targets", "q,v,down")
    (record,) = [r for r in lines if r.get("bench") == "train"]
    assert record["method"] == "lora" and record["quantize"] == "int4" and record["loss"] > 0
    shapes = expected_lora_shapes(model_args("tiny"), 4, ("q", "v", "down"))
    per_layer = sum(a * b for a, b in shapes.values()) // model_args("tiny").n_layers
    assert record["trainable_floats"] == [2 * per_layer, 2 * per_layer]  # 4 layers, 2 a stage
    assert record["n_virtual_tokens"] == 0


def test_grid_bench_times_one_process_pp2_and_tp2_side_by_side():
    lines, done = run_bench("grid_bench", *TINY, "--prompt_len", "4", "--gen_len", "4",
                            "--repeats", "1", timeout=240)
    assert [r["layout"] for r in lines] == ["one process", "2 stages (PP 2)", "TP 2"]
    for record in lines:
        has_fields(record, ["ms_per_token_median", "ms_per_token_min", "ms_per_token_max",
                            "vs_one_process", "backend", *ENVIRONMENT])
        assert record["ms_per_token_median"] > 0 and record["backend"] == "gloo"
    assert "ms_per_token_median" in table_after_json(done.stdout)[0]
