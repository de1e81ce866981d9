"""Soft-prompt training: the pipeline's prompt gradient equals one process's on the full batch
(2 and 4 real gloo stages, GPipe and 1F1B); ft_main.py through 2 stages trains exactly like one
process; the prompt really helps on Alpaca; resume is exact; fp16 overflow skips a step on every
stage; recompute and offload change nothing; bad input stops with a clear error, losing nothing.
Run: python3 -m pytest -q tests/test_train.py
"""
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import ft_main
import split_model
from launch import REPO, check_all_ok, launch
from llama.training import train
from llama.formats.checkpoint import load_model
from llama.training.data import load_dataset, make_micro_batch
from llama.parallel.distributed import DistContext
from llama.errors import BadInput
from llama.model.rotary import rotary_tables
from llama.prepare.offload import apply_recompute, apply_weight_streaming, optimizer_device
from llama.parallel.pipeline import Stage, loss_sum
from llama.training.precision import ScaledAdamW
from llama.tuning.prompt import SoftPrompt, init_prompt_weight
from llama.model.tokenizer import Tokenizer

TIMING_FIELDS = ("tokens_per_s", "peak_mem_gib")  # the only metrics allowed to differ between runs


@pytest.fixture(scope="module")
def tokenizer(assets):
    return Tokenizer(str(assets / "stories260K" / "tok512.model"))


@pytest.fixture(scope="module")
def alpaca_small(alpaca_file):
    """The first 120 real Alpaca records, in a file of our own."""
    return alpaca_file(120)


def run_args(model_bin, data, out, **overrides):
    """A short float32 run on CPU: 6 steps of 2 micro-batches of 2 examples."""
    args = dict(ckpt_dir=str(model_bin), data=str(data), out=str(out), template="plain",
                n_virtual_tokens=8, max_seq_len=128, global_batch_size=4, micro_batch_size=2,
                steps=6, lr=0.1, warmup_steps=2, eval_fraction=0.05, eval_every=3,
                save_every=3, log_every=100, device="cpu", dtype="float32")
    args.update(overrides)
    return args


def as_cli(args):
    argv = []
    for name, value in args.items():
        if isinstance(value, (tuple, list)):
            value = ",".join(str(v) for v in value)
        argv += [f"--{name}", str(value)]
    return argv


def saved_losses(out):
    """The "losses" of tuning.json: held-out loss without a prompt, with the initial and the
    trained prompt, last training loss."""
    return json.loads((out / "tuning.json").read_text())["losses"]


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_timing(metrics):
    return [{k: v for k, v in line.items() if k not in TIMING_FIELDS} for line in metrics]


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(model_bin, alpaca_small, tmp_path_factory):
    """The uninterrupted, plain run that resume, recompute and offload must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    ft_main.main(**run_args(model_bin, alpaca_small, out))
    return out


# ---- the pipeline's prompt gradient is the full model's, on the full batch ----

@pytest.fixture(scope="module")
def gradient_examples(alpaca_small, tokenizer, tmp_path_factory):
    """10 real examples with response-only targets, their responses cut to different lengths so
    that micro-batches differ in length and rows within them are padded."""
    folder = tmp_path_factory.mktemp("grad")
    dataset = load_dataset(alpaca_small, tokenizer, "none", max_len=96, cache_dir=folder,
                           log=lambda *_: None)
    examples = []
    for i in range(10):
        ids, first_target = dataset[i]
        examples.append((ids[:first_target + 3 + 5 * (i % 4)].tolist(), first_target))
    path = folder / "examples.json"
    path.write_text(json.dumps(examples))
    return path, examples


def reference_gradient(model_bin, examples, pad_id, n_virtual=4):
    model = load_model(model_bin)
    weight = init_prompt_weight("random", n_virtual, model.tok_embeddings.weight, seed=1)
    prompt = SoftPrompt(weight)
    stage = Stage(model, DistContext(), prompt, n_virtual)
    full_batch = make_micro_batch(examples, pad_id)
    loss, n_targets = stage.train_step([full_batch], "gpipe")
    return prompt.weight.grad.clone(), loss, n_targets


def relative_error(actual, expected):
    return float((actual - expected).norm() / expected.norm())


def test_the_stage_trains_on_the_loss_it_is_given(model_bin, tokenizer, gradient_examples):
    """The loss is an argument of the Stage: a loss that weighs each target token by 3 (summed,
    as loss_sum is) gives 3x the default's loss and prompt gradient, and the mean held-out loss."""
    _, examples = gradient_examples
    model = load_model(model_bin)
    weight = init_prompt_weight("random", 4, model.tok_embeddings.weight, seed=1)
    results = []
    for loss_fn in (loss_sum, lambda stage_model, h, targets: 3 * loss_sum(stage_model, h, targets)):
        prompt = SoftPrompt(weight.clone())
        stage = Stage(model, DistContext(), prompt, 4, loss_fn=loss_fn)
        batch = make_micro_batch(examples, tokenizer.pad_id)
        loss, _ = stage.train_step([batch], "gpipe")
        results.append((loss, prompt.weight.grad.clone(), stage.mean_loss([batch])))
    (loss, grad, mean), (tripled_loss, tripled_grad, tripled_mean) = results
    assert tripled_loss == pytest.approx(3 * loss, rel=1e-5)
    assert tripled_mean == pytest.approx(3 * mean, rel=1e-5)
    assert relative_error(tripled_grad, 3 * grad) < 1e-5


@pytest.mark.parametrize("n_stages", [2, 4])
def test_pipeline_prompt_gradient_equals_one_process_on_the_full_batch(
        model_bin, tokenizer, gradient_examples, n_stages, tmp_path):
    path, examples = gradient_examples
    micro_batch_size = 3  # 10 examples -> micro-batches of 3, 3, 3 and 1
    micro_lengths = [max(len(ids) for ids, _ in examples[i:i + 3]) for i in range(0, 10, 3)]
    assert len(set(micro_lengths)) > 1, "micro-batches should differ in length"
    assert any(len(ids) < max(micro_lengths) for ids, _ in examples), "some rows must be padded"
    assert all(first > 1 for _, first in examples), "targets are the responses only"

    expected, expected_loss, n_targets = reference_gradient(model_bin, examples, tokenizer.pad_id)
    out = tmp_path / "grads.pt"
    argv = [os.path.join("tests", "workers", "prompt_grad.py"), "--ckpt", str(model_bin),
            "--out", str(out), "--schedules", "gpipe,1f1b", "--examples", str(path),
            "--micro_batch_size", str(micro_batch_size), "--pad_id", str(tokenizer.pad_id),
            "--n_virtual", "4"]  # and init "random" with seed 1, as reference_gradient
    check_all_ok(launch(argv, n_stages, timeout_s=120))
    results = torch.load(out, weights_only=True)
    assert sorted(results) == ["1f1b", "gpipe"]
    for schedule, result in results.items():
        assert result["n_targets"] == n_targets
        error = relative_error(result["grad"], expected)
        assert error <= 1e-5, f"{n_stages} stages, {schedule}: relative error {error:.2e}"
        assert result["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert float(expected.norm()) > 0


# ---- ft_main.py through 2 stages trains exactly like one process ----

def test_two_stage_training_gives_the_losses_and_prompt_of_one_process(
        model_bin, alpaca_small, reference, tmp_path):
    split = tmp_path / "pp2"
    split_model.main(str(model_bin), 2, out_dir=str(split))
    out = tmp_path / "pp2_run"
    args = run_args(split, alpaca_small, out, log_every=1)
    results = launch(["ft_main.py", *as_cli(args)], 2, timeout_s=150)
    check_all_ok(results)
    assert "step 6/6" in results[0][1] and results[1][1] == ""  # rank 0 alone reports

    # the reference run has the same settings, on the unsplit .bin in this process
    pipelined, single = read_metrics(out), read_metrics(reference)
    assert [m["step"] for m in pipelined] == list(range(1, 7))
    assert len(pipelined[0]["peak_mem_gib"]) == 2  # one slot per stage
    for p, s in zip(pipelined, single):
        assert p["loss"] == pytest.approx(s["loss"], rel=1e-5)
        assert p["lr"] == s["lr"] and p["skipped"] is s["skipped"] is False
    assert [m.get("eval_loss") is not None for m in pipelined] == [False, False, True] * 2
    assert pipelined[2]["eval_loss"] == pytest.approx(single[2]["eval_loss"], rel=1e-5)
    prompt_pp = torch.load(out / "tuning.pt", weights_only=True)["prompt"]
    prompt_single = torch.load(reference / "tuning.pt", weights_only=True)["prompt"]
    torch.testing.assert_close(prompt_pp, prompt_single, rtol=1e-5, atol=1e-7)
    info_pp = json.loads((out / "tuning.json").read_text())
    info_single = json.loads((reference / "tuning.json").read_text())
    assert info_pp["params_digest"] == info_single["params_digest"]
    for name, value in info_single["losses"].items():
        assert info_pp["losses"][name] == pytest.approx(value, rel=1e-5)


# ---- the prompt works on real targets: Alpaca outputs, a domain shift for a story model ----

ALPACA_SETTINGS = dict(template="plain", n_virtual_tokens=16, max_seq_len=256, lr=0.3,
                       warmup_steps=0, steps=60, global_batch_size=8, micro_batch_size=4,
                       eval_fraction=0.05, eval_every=0, save_every=0)


def test_trained_prompt_lowers_held_out_alpaca_loss_by_8_percent(model_bin, assets, tmp_path):
    """Response-only loss on the 49 held-out examples of the 1k Alpaca file (4.511 without a
    prompt, 3.964 with the trained one: 12.1% lower when written)."""
    data = tmp_path / "alpaca_data_1k.json"  # a copy, so the run reads nothing beside the assets
    data.write_bytes((assets / "alpaca" / "alpaca_data_1k.json").read_bytes())
    out = tmp_path / "run"
    ft_main.main(**run_args(model_bin, data, out, **ALPACA_SETTINGS))
    losses = saved_losses(out)
    improvement = 1 - losses["eval_loss"] / losses["eval_loss_no_prompt"]
    assert improvement >= 0.08, f"held-out loss {losses}: only {improvement:.1%} lower"
    assert losses["eval_loss"] < losses["eval_loss_init"]


# ---- resume after an interruption is exact ----

def interrupt_at(monkeypatch, step, action):
    """Run `action` at the start of training step `step` (counted from 1), inside the loop."""
    real_step = train.run_train_step

    def run_train_step(stage, batches, cfg, scale, ctx):
        if stage.step + 1 == step:
            action()
        return real_step(stage, batches, cfg, scale, ctx)
    monkeypatch.setattr(train, "run_train_step", run_train_step)


def test_resume_after_sigterm_ends_bitwise_equal(model_bin, alpaca_small, reference,
                                                 tmp_path, monkeypatch):
    """SIGTERM during step 2: the step finishes, a checkpoint is written, the run stops."""
    out = tmp_path / "run"
    args = run_args(model_bin, alpaca_small, out)
    handler_before = signal.getsignal(signal.SIGTERM)
    interrupt_at(monkeypatch, 2, lambda: signal.raise_signal(signal.SIGTERM))
    assert ft_main.main(**args) is None
    monkeypatch.undo()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and not (out / "tuning.pt").exists()
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    assert signal.getsignal(signal.SIGTERM) == handler_before  # handed back after training

    ft_main.main(**args, resume=True)
    assert torch.equal(torch.load(out / "tuning.pt", weights_only=True)["prompt"],
                       torch.load(reference / "tuning.pt", weights_only=True)["prompt"])
    assert without_timing(read_metrics(out)) == without_timing(read_metrics(reference))
    assert saved_losses(out) == saved_losses(reference)


def test_resume_after_a_crash_ends_bitwise_equal(model_bin, alpaca_small, reference,
                                                 tmp_path, monkeypatch):
    """A crash in step 5 (checkpoint of step 3 on disk, step 4 already logged): --resume goes
    on from step 3, and metrics.jsonl ends with each step once, as in an uninterrupted run."""
    out = tmp_path / "run"
    args = run_args(model_bin, alpaca_small, out)

    def crash():
        raise RuntimeError("simulated crash")
    interrupt_at(monkeypatch, 5, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ft_main.main(**args)
    monkeypatch.undo()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4]

    ft_main.main(**args, resume=str(out / "checkpoint.pt"))
    assert torch.equal(torch.load(out / "tuning.pt", weights_only=True)["prompt"],
                       torch.load(reference / "tuning.pt", weights_only=True)["prompt"])
    assert without_timing(read_metrics(out)) == without_timing(read_metrics(reference))
    assert saved_losses(out) == saved_losses(reference)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 6


# ---- fp16: an injected overflow skips the step on every stage, the scale backs off ----

def test_fp16_overflow_skips_the_step_on_every_stage_and_training_goes_on(
        model_bin, alpaca_small, tmp_path):
    out, probe = tmp_path / "run", tmp_path / "probe"
    probe.mkdir()
    args = run_args(model_bin, alpaca_small, out, dtype="float16", steps=4, eval_fraction=0,
                    save_every=0, debug_overflow_steps=2)
    argv = [os.path.join("tests", "workers", "train_probe.py"), "--probe_dir", str(probe),
            *as_cli(args)]
    check_all_ok(launch(argv, 2, timeout_s=150))

    metrics = read_metrics(out)
    assert [m["skipped"] for m in metrics] == [False, True, False, False]
    assert metrics[1]["loss"] is None and metrics[1]["grad_norm"] is None
    assert all(math.isfinite(m["loss"]) for m in metrics if not m["skipped"])
    assert [m["loss_scale"] for m in metrics] == [65536.0, 65536.0, 32768.0, 32768.0]
    # Every stage was handed the same scale for each step (inf: the forced overflow) and holds
    # the same scale after each update: halved once by the skipped step, on both stages.
    scales = [json.loads((probe / f"scales.{rank}.json").read_text()) for rank in (0, 1)]
    assert scales[0] == scales[1]
    assert scales[0]["used"] == ["65536.0", "inf", "32768.0", "32768.0"]
    assert scales[0]["held"] == [65536.0, 32768.0, 32768.0, 32768.0]
    prompt = torch.load(out / "tuning.pt", weights_only=True)["prompt"]
    assert prompt.dtype == torch.float32 and torch.isfinite(prompt).all()


# ---- recompute and offload: each switch alone changes no loss, and moves what it claims ----

MEMORY_SWITCHES = {"recompute": {"recompute": True}, "selective": {"recompute_mode": "selective"},
                   "activations": {"offload": "activations"}, "optimizer": {"offload": "optimizer"},
                   "weights": {"offload": "weights"}}


@pytest.mark.parametrize("switch", MEMORY_SWITCHES.values(), ids=MEMORY_SWITCHES.keys())
def test_recompute_and_offload_give_the_plain_runs_losses(model_bin, alpaca_small, reference,
                                                          tmp_path, switch):
    out = tmp_path / "run"
    ft_main.main(**run_args(model_bin, alpaca_small, out, save_every=0, **switch))
    assert len(read_metrics(out)) == len(read_metrics(reference))
    for got, expected in zip(read_metrics(out), read_metrics(reference)):
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)
        # Held-out loss only on eval steps; pytest >= 9 refuses approx(None), so compare
        # presence first, then the value.
        assert ("eval_loss" in got) == ("eval_loss" in expected)
        if "eval_loss" in expected:
            assert got["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
    torch.testing.assert_close(torch.load(out / "tuning.pt", weights_only=True)["prompt"],
                               torch.load(reference / "tuning.pt", weights_only=True)["prompt"])


def block_inputs_and_outputs(model, h):
    """Run h through the model's blocks one by one: [(input, output)] per block."""
    args = model.args
    turns = rotary_tables(args.head_dim, args.rope_theta, 0, h.shape[1], h.device)
    steps = []
    for block in model.layers.values():
        out = block(h, turns, 0)
        steps.append((h, out))
        h = out
    return steps


def count_saved_tensors(run):
    """How many tensors autograd saves for the backward pass while run() goes forward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        result = run()
    return result, len(saved)


@pytest.mark.parametrize("offload", [False, True], ids=["recompute", "activations"])
def test_a_recomputed_block_keeps_only_its_input_and_offload_keeps_a_cpu_copy(model_bin, offload):
    """The block's ctx (its grad_fn) holds the input and nothing autograd saved; with activation
    offload the input it holds is its own copy in (pinned) CPU memory, not the block's input
    tensor, which is free to go. The gradient is the plain model's."""
    plain, model = load_model(model_bin), load_model(model_bin)
    h = torch.randn(2, 12, plain.args.dim, generator=torch.Generator().manual_seed(0))
    h_plain, h_recomputed = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    plain_steps, plain_saved = count_saved_tensors(lambda: block_inputs_and_outputs(plain, h_plain))
    assert plain_saved > 10 * len(plain_steps)  # what recompute exists to avoid
    apply_recompute(model, offload_activations=offload)
    steps, saved = count_saved_tensors(lambda: block_inputs_and_outputs(model, h_recomputed))
    assert saved == 0
    for block_input, out in steps:
        kept = out.grad_fn.saved_input
        assert not kept.requires_grad and torch.equal(kept, block_input)
        assert kept.device == torch.device("cpu")
        if offload:
            assert kept.untyped_storage().data_ptr() != block_input.untyped_storage().data_ptr()
            assert kept.is_pinned() == torch.cuda.is_available()
        else:
            assert kept.untyped_storage().data_ptr() == block_input.untyped_storage().data_ptr()
    plain_steps[-1][1].square().sum().backward()
    steps[-1][1].square().sum().backward()
    assert all(not hasattr(out.grad_fn, "saved_input") for _, out in steps)  # freed in backward
    torch.testing.assert_close(h_recomputed.grad, h_plain.grad, rtol=0, atol=0)


def test_optimizer_offload_keeps_the_master_copy_and_adamw_state_apart_from_the_prompt():
    """optimizer_device puts the optimizer on the CPU when the prompt lives elsewhere (a meta
    tensor stands in for one on a GPU); ScaledAdamW then keeps its fp32 master copy, the
    unscaled gradient and AdamW's moments there, apart from the prompt, and copies only the new
    value back: the same value plain AdamW gives the prompt itself."""
    on_gpu = torch.empty(4, 8, device="meta")
    assert optimizer_device(on_gpu, offload=True) == torch.device("cpu")
    assert optimizer_device(on_gpu, offload=False) == torch.device("meta")

    generator = torch.Generator().manual_seed(0)
    prompt = torch.nn.Parameter(torch.randn(4, 8, generator=generator))
    expected = torch.nn.Parameter(prompt.detach().clone())
    adamw = torch.optim.AdamW([expected], lr=0.1, weight_decay=0.01, betas=(0.9, 0.999))
    optimizer = ScaledAdamW(prompt, 0.1, 0.01, (0.9, 0.999), torch.device("cpu"))
    assert optimizer.master is not prompt
    for _ in range(3):
        grad = torch.randn(4, 8, generator=generator)
        prompt.grad, expected.grad = grad * 1024.0, grad.clone()
        norm = optimizer.unscale(loss_scale=1024.0) ** 0.5  # before the step's all-reduce
        optimizer.step(lr=0.1, grad_norm=norm, max_grad_norm=0.0)
        adamw.step()
        assert prompt.grad is None
        moments = optimizer.optimizer.state[optimizer.master]
        for tensor in (optimizer.master, moments["exp_avg"], moments["exp_avg_sq"]):
            assert tensor.device == torch.device("cpu")
            assert tensor.untyped_storage().data_ptr() != prompt.untyped_storage().data_ptr()
        assert prompt not in optimizer.optimizer.state
        torch.testing.assert_close(prompt.detach(), optimizer.master.detach(), rtol=0, atol=0)
        torch.testing.assert_close(prompt.detach(), expected.detach(), rtol=0, atol=0)


def test_weight_streaming_holds_a_blocks_weights_only_while_it_runs(model_bin):
    """Between uses every block's weights are empty; each block has them while it runs, in the
    forward pass (in order) and its recompute in the backward pass (in reverse), and no other
    block has any then. The gradient is the plain model's."""
    plain, model = load_model(model_bin), load_model(model_bin)
    apply_weight_streaming(apply_recompute(model), torch.device("cpu"))
    blocks = [wrapper.block for wrapper in model.layers.values()]

    def weights_held():
        return [sum(p.numel() for p in block.parameters()) for block in blocks]
    full = [sum(p.numel() for p in block.parameters()) for block in plain.layers.values()]
    assert weights_held() == [0] * len(blocks)
    assert model.tok_embeddings.weight.numel() > 0 and model.output.weight.numel() > 0
    seen = []  # (block index, weights every block held while it ran)
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda module, inputs, i=i: seen.append((i, weights_held())))

    h = torch.randn(2, 12, plain.args.dim, generator=torch.Generator().manual_seed(0))
    h_plain, h_streamed = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    plain.run_layers(h_plain).square().sum().backward()
    out = model.run_layers(h_streamed)
    assert weights_held() == [0] * len(blocks)
    out.square().sum().backward()
    assert weights_held() == [0] * len(blocks)

    order = list(range(len(blocks)))
    assert [i for i, _ in seen] == order + order[::-1]
    for i, held in seen:
        assert held == [full[j] if j == i else 0 for j in order]
    torch.testing.assert_close(h_streamed.grad, h_plain.grad, rtol=0, atol=0)


# ---- bad input: a clear error naming the record or file, nothing lost ----

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def alpaca_records(assets):
    return json.loads((assets / "alpaca" / "alpaca_data_1k.json").read_text())[:40]


def test_malformed_jsonl_names_the_line_and_the_cli_exits_non_zero(model_bin, alpaca_records,
                                                                   tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", alpaca_records[:10])
    lines = data.read_text().splitlines()
    lines[6] = lines[6][:-5]  # line 7 cut short
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = run_args(model_bin, data, out)
    with pytest.raises(BadInput, match=r"data\.jsonl line 7: not valid JSON"):
        ft_main.main(**args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    run = subprocess.run([sys.executable, "ft_main.py", *as_cli(args)], cwd=REPO, env=env,
                         text=True, capture_output=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("error: data file ") and "data.jsonl line 7" in run.stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "tuning.pt").exists()


def test_malformed_json_list_names_line_and_column(model_bin, alpaca_records, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(alpaca_records[:5], indent=1)[:-3])
    with pytest.raises(BadInput, match=r"data\.json:\d+:\d+: not valid JSON"):
        ft_main.main(**run_args(model_bin, data, tmp_path / "out"))


def test_record_missing_a_field_is_skipped_and_counted_or_refused_with_strict(
        model_bin, alpaca_records, tmp_path, capsys):
    records = [dict(r) for r in alpaca_records[:12]]
    del records[4]["output"]
    data = write_jsonl(tmp_path / "data.jsonl", records)
    with pytest.raises(BadInput, match=r"data\.jsonl, line 5: field 'output' is missing; fix or "
                                       r"remove that record"):
        ft_main.main(**run_args(model_bin, data, tmp_path / "strict", strict=True))
    assert not (tmp_path / "strict" / "metrics.jsonl").exists()
    capsys.readouterr()
    ft_main.main(**run_args(model_bin, data, tmp_path / "lenient", steps=1, eval_fraction=0))
    out = capsys.readouterr().out
    assert ("note: 1 record skipped (line 5: field 'output' is missing); pass --strict to refuse "
            "the file instead") in out
    assert re.search(r"note: \d+ records longer than --max_seq_len 128 minus the 8 virtual "
                     r"tokens, truncated to 120 tokens \(line 1: \d+ tokens; ", out), out
    assert (tmp_path / "lenient" / "tuning.pt").exists()


def test_empty_dataset_after_filtering(model_bin, alpaca_records, tmp_path):
    no_output = write_jsonl(tmp_path / "no_output.jsonl",
                            [{"instruction": r["instruction"], "output": " "}
                             for r in alpaca_records[:5]])
    with pytest.raises(BadInput, match=r"no_output\.jsonl holds no usable records"):
        ft_main.main(**run_args(model_bin, no_output, tmp_path / "out"))
    too_long = write_jsonl(tmp_path / "too_long.jsonl",
                           [{"instruction": "tell me a story " * 40, "output": "no"}] * 5)
    with pytest.raises(BadInput, match=r"every example of \S*too_long\.jsonl is longer than "
                                       r"max_len 120 before its response starts"):
        ft_main.main(**run_args(model_bin, too_long, tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("overrides, message", [
    ({"micro_batch_size": 3}, r"--micro_batch_size=3 does not divide --global_batch_size=4"),
    ({"n_virtual_tokens": 0}, r"--n_virtual_tokens=0 must be a positive integer"),
    ({"n_virtual_tokens": -2}, r"--n_virtual_tokens=-2 must be a positive integer"),
    ({"n_virtual_tokens": 128}, r"--n_virtual_tokens=128 leaves no room for text in "
                                r"max_seq_len=128"),
    ({"n_virtual_tokens": 500}, r"--n_virtual_tokens=500 leaves no room"),
    ({"offload": "optimizer,gpu"}, r"--offload 'gpu' is not one of optimizer, activations, "
                                   r"weights"),
    ({"max_skipped_steps": 0}, r"--max_skipped_steps=0 must be a positive integer"),
    ({"recompute_mode": "partial"}, r"--recompute_mode 'partial' must be one of full, selective"),
    ({"recompute_mode": "selective", "offload": "activations"},
     r"--recompute_mode selective keeps activations on the device, so it cannot go with "
     r"--offload activations: use --recompute_mode full with offload, or leave offload out"),
])
def test_bad_settings_are_refused_before_anything_is_written(model_bin, alpaca_small, tmp_path,
                                                             overrides, message):
    with pytest.raises(BadInput, match=message):
        ft_main.main(**run_args(model_bin, alpaca_small, tmp_path / "out", **overrides))
    assert not (tmp_path / "out").exists()


def test_resume_pointing_at_nothing(model_bin, alpaca_small, tmp_path):
    missing = tmp_path / "nowhere" / "checkpoint.pt"
    with pytest.raises(BadInput, match=rf"--resume {missing}: no training checkpoint there"):
        ft_main.main(**run_args(model_bin, alpaca_small, tmp_path / "out", resume=str(missing)))
    with pytest.raises(BadInput, match=r"/fresh/checkpoint\.pt: no training checkpoint there"):
        ft_main.main(**run_args(model_bin, alpaca_small, tmp_path / "fresh", resume=True))
    assert not (tmp_path / "fresh" / "metrics.jsonl").exists()


def test_resume_pointing_at_nothing_stops_every_rank(model_bin, alpaca_small, tmp_path):
    missing = tmp_path / "nowhere" / "checkpoint.pt"
    args = run_args(model_bin, alpaca_small, tmp_path / "out", resume=str(missing))
    started = time.monotonic()
    results = launch(["ft_main.py", *as_cli(args)], 2, timeout_s=120)
    assert time.monotonic() - started < 60  # no rank waits for the timeout
    (code0, _, err0), (code1, _, err1) = results
    assert code0 == 2 and err0.strip() == (f"error: --resume {missing}: no training checkpoint "
                                           "there (it is written every --save_every steps as "
                                           "<out>/checkpoint.pt)")
    assert code1 != 0 and "Traceback" not in err1 and "another stage has probably died" in err1


@pytest.mark.parametrize("change, named", [({"n_virtual_tokens": 16}, "n_virtual_tokens"),
                                           ({"data": "other"}, "data")], ids=["n_virtual", "data"])
def test_resume_of_another_run_is_refused_and_its_checkpoint_kept(
        model_bin, alpaca_small, reference, tmp_path, change, named):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pt", "metrics.jsonl"):
        (out / name).write_bytes((reference / name).read_bytes())
    before = {name: sha256(out / name) for name in ("checkpoint.pt", "metrics.jsonl")}
    data = alpaca_small
    if change.pop("data", None) == "other":  # the same records under another name
        data = tmp_path / "other.json"
        data.write_bytes(alpaca_small.read_bytes())
    with pytest.raises(BadInput, match=rf"checkpoint\.pt belongs to another run: it had "
                                       rf"--{named}=.*resume with the same settings"):
        ft_main.main(**run_args(model_bin, data, out, resume=True, **change))
    assert {name: sha256(out / name) for name in before} == before
    assert not (out / "tuning.pt").exists()


def test_nan_loss_that_does_not_recover_stops_and_keeps_the_last_good_checkpoint(
        model_bin, alpaca_small, tmp_path):
    """Steps 2, 3, 4 overflow (float32: a NaN/inf gradient is skipped the same way); the third in a
    row stops the run before step 4 writes anything; the checkpoint of step 3 is intact."""
    out = tmp_path / "run"
    args = run_args(model_bin, alpaca_small, out, save_every=1, eval_every=0,
                    max_skipped_steps=3)
    with pytest.raises(BadInput, match=rf"overflowed or been NaN for 3 steps in a row \(step 4\); "
                                       rf"stopped\. The last good checkpoint is "
                                       rf"{out / 'checkpoint.pt'}; lower --lr"):
        ft_main.main(**args, debug_overflow_steps=(2, 3, 4, 5, 6))
    metrics = read_metrics(out)
    assert [m["skipped"] for m in metrics] == [False, True, True, True]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and torch.isfinite(state["trainable"]["prompt"]).all()
    assert not (out / "tuning.pt").exists()
    # Intact: the same run resumes from it (without the injected overflows) and finishes.
    ft_main.main(**args, resume=True)
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert math.isfinite(saved_losses(out)["train_loss"])


# ---- the token cache: never beside the data; unwritable is a note ----

def test_read_only_data_folder_trains_and_nothing_is_written_beside_it(
        model_bin, alpaca_records, tmp_path, capsys):
    data_folder = tmp_path / "shared_data"
    data_folder.mkdir()
    data = write_jsonl(data_folder / "data.jsonl", alpaca_records[:12])
    data_folder.chmod(0o555)  # read-only (root writes anyway: the listing below checks that)
    try:
        ft_main.main(**run_args(model_bin, data, tmp_path / "one", steps=1, eval_fraction=0,
                                cache_dir=str(tmp_path / "cache")))
        assert "tokens from cache" not in capsys.readouterr().out
        ft_main.main(**run_args(model_bin, data, tmp_path / "two", steps=1, eval_fraction=0,
                                cache_dir=str(tmp_path / "cache")))
        assert "tokens from cache" in capsys.readouterr().out  # reused: same key
        assert [p.name for p in data_folder.iterdir()] == ["data.jsonl"]
        assert len(list((tmp_path / "cache").glob("data.*.npz"))) == 1

        (tmp_path / "a_file").write_text("")  # a cache folder that cannot be made, even by root
        ft_main.main(**run_args(model_bin, data, tmp_path / "three", steps=1, eval_fraction=0,
                                cache_dir=str(tmp_path / "a_file" / "cache")))
        notes = [line for line in capsys.readouterr().out.splitlines() if "token cache" in line]
        assert len(notes) == 1 and notes[0].startswith("note: could not write the token cache")
        assert (tmp_path / "three" / "tuning.pt").exists()
        assert [p.name for p in data_folder.iterdir()] == ["data.jsonl"]
    finally:
        data_folder.chmod(0o755)


# ---- --out: one run at a time; a used folder needs --resume or --overwrite ----

RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "tuning.json", "tuning.pt")


def test_used_out_needs_resume_or_overwrite_and_overwrite_keeps_other_files(
        model_bin, alpaca_small, reference, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in RUN_FILES:
        (out / name).write_bytes((reference / name).read_bytes())
    (out / "notes.txt").write_text("my notes")
    before = {name: sha256(out / name) for name in (*RUN_FILES, "notes.txt")}
    with pytest.raises(BadInput, match=rf"^--out {out} already holds a training run "
                                       r"\(checkpoint\.pt, metrics\.jsonl, tuning\.json, "
                                       r"tuning\.pt\): pass --resume to continue it, --overwrite "
                                       r"to replace it, or pick another --out$"):
        ft_main.main(**run_args(model_bin, alpaca_small, out))
    assert {name: sha256(out / name) for name in before} == before
    with pytest.raises(BadInput, match=r"--resume and --overwrite contradict each other"):
        ft_main.main(**run_args(model_bin, alpaca_small, out), resume=True, overwrite=True)

    ft_main.main(**run_args(model_bin, alpaca_small, out, steps=2), overwrite=True)
    assert [m["step"] for m in read_metrics(out)] == [1, 2]  # not appended to the old run's
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert (out / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in out.iterdir()) == sorted([*RUN_FILES, "notes.txt", "peft"])


def test_out_holding_only_other_files_is_used_and_they_are_kept(model_bin, alpaca_small,
                                                                tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    ft_main.main(**run_args(model_bin, alpaca_small, out, steps=1, eval_fraction=0))
    assert (out / "notes.txt").read_text() == "my notes" and (out / "tuning.pt").exists()


HOLD_OUT = """
import sys
from pathlib import Path
from llama.training.run_folder import claim_out
with claim_out(Path(sys.argv[1]), resume=None, overwrite=False, log=print):
    print("holding", flush=True)
    sys.stdin.read()
"""


def test_out_in_use_is_refused_at_once_and_a_crashed_run_leaves_no_stuck_lock(
        model_bin, alpaca_small, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": REPO}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_OUT, str(out)], cwd=REPO, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        args = run_args(model_bin, alpaca_small, out, steps=1, eval_fraction=0)
        started = time.monotonic()
        with pytest.raises(BadInput, match=rf"^--out {out} is in use by another training run "
                                           r"\(it holds the folder's lock\): wait for it to end, "
                                           r"or pick another --out$"):
            ft_main.main(**args)
        assert time.monotonic() - started < 10  # at once: no data, no training
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()  # a crash: the kernel drops the lock with the process
        holder.wait()
    ft_main.main(**args)
    assert (out / "tuning.pt").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([*RUN_FILES, "peft"])


def test_held_out_fraction_that_leaves_less_than_a_batch_names_both_fixes(
        model_bin, alpaca_records, tmp_path):
    data = write_jsonl(tmp_path / "ten.jsonl", alpaca_records[:10])
    with pytest.raises(BadInput, match=r"^the dataset has 1 examples, fewer than one global batch "
                                       r"of 4, once --eval_fraction 0\.95 holds out 9 of its 10: "
                                       r"lower --global_batch_size or --eval_fraction, or add "
                                       r"data$"):
        ft_main.main(**run_args(model_bin, data, tmp_path / "out", eval_fraction=0.95))


# ---- a sense of time: every logged step says how long the run has taken and has left ----

def test_log_lines_carry_elapsed_time_and_an_eta(model_bin, alpaca_small, tmp_path, capsys):
    ft_main.main(**run_args(model_bin, alpaca_small, tmp_path / "run", steps=3, log_every=1,
                            eval_every=0, save_every=0))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 3
    for line in lines:
        assert re.search(r" \| elapsed \d+s, ETA \d+s$", line), line
    assert lines[-1].endswith("ETA 0s")


def test_durations_read_at_a_glance():
    from llama.progress import elapsed_and_eta, format_duration
    assert [format_duration(s) for s in (0, 59.4, 65, 3599, 7620)] == \
        ["0s", "59s", "1m05s", "59m59s", "2h07m"]
    assert elapsed_and_eta(40, 10, 30) == "elapsed 40s, ETA 1m20s"
    assert elapsed_and_eta(5, 0, 30) == "elapsed 5s"


# ---- the end-of-text target is the model's own stop token ----

@pytest.fixture(scope="module")
def story_rows(assets, tmp_path_factory):
    """Short stories in TinyStories' style, as plain-text rows."""
    sentences = json.loads((assets / "stories260K" / "reference_outputs.json").read_text())[
        "cross_entropy"]["tinystories_like_sentences"]
    stories = [" ".join(sentences[i:i + 2]) for i in range(len(sentences) - 1)] * 2
    return write_jsonl(tmp_path_factory.mktemp("stories") / "stories.jsonl",
                       [{"text": story} for story in stories])


@pytest.mark.parametrize("eos_target, expected", [("auto", "bos"), ("eos", "eos"),
                                                  ("none", "none")])
def test_end_target_follows_the_models_stop_token(model_bin, story_rows, tokenizer, tmp_path,
                                                  monkeypatch, capsys, eos_target, expected):
    """stories260K ends a story with BOS and gives EOS almost no probability: auto picks BOS."""
    seen = []
    real_load = train.load_dataset

    def load_and_keep(*args, **kwargs):
        seen.append(real_load(*args, **kwargs))
        return seen[-1]
    monkeypatch.setattr(train, "load_dataset", load_and_keep)
    out = tmp_path / "run"
    ft_main.main(**run_args(model_bin, story_rows, out, template="none", steps=1,
                            eval_fraction=0), eos_target=eos_target)
    end = {"bos": [tokenizer.bos_id], "eos": [tokenizer.eos_id], "none": []}[expected]
    for i in range(len(seen[0])):
        ids = seen[0][i][0].tolist()
        assert ids[len(ids) - len(end):] == end and tokenizer.eos_id not in ids[1:len(ids) - len(end)]
    assert json.loads((out / "tuning.json").read_text())["eos_target"] == expected
    if eos_target == "auto":
        assert "end-of-text target: BOS (the model's stop token" in capsys.readouterr().out


# ---- issue 18, item 11: a failed run leaves no empty --out; one example is not held out silently

def test_failed_run_removes_the_out_it_created_while_empty(model_bin, alpaca_records, tmp_path):
    data = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "word " * 400, "output": "x"}])
    with pytest.raises(BadInput, match="longer than max_len"):
        ft_main.main(**run_args(model_bin, data, tmp_path / "new" / "out"))
    assert not (tmp_path / "new" / "out").exists()
    (tmp_path / "mine").mkdir()  # a folder the user made is theirs: it stays, empty or not
    with pytest.raises(BadInput, match="longer than max_len"):
        ft_main.main(**run_args(model_bin, data, tmp_path / "mine"))
    assert (tmp_path / "mine").is_dir()


def test_eval_fraction_on_one_example_says_nothing_is_held_out(model_bin, alpaca_records,
                                                               tmp_path, capsys):
    data = write_jsonl(tmp_path / "one.jsonl", alpaca_records[:1])
    ft_main.main(**run_args(model_bin, data, tmp_path / "out", eval_fraction=0.5, steps=1,
                            global_batch_size=1, micro_batch_size=1, save_every=0))
    assert re.search(r"note: --eval_fraction 0\.5 holds out nothing: \S+one\.jsonl has only 1 "
                     r"usable example, which is kept for training, so no held-out loss is "
                     r"reported; add data for one, or pass --eval_fraction 0",
                     capsys.readouterr().out)


def test_out_inside_the_checkpoint_read_is_refused(model_bin, alpaca_small, tmp_path):
    from llama.formats.checkpoint import open_source, write_split
    split = tmp_path / "pp2"
    write_split(open_source(model_bin), split, 2, log=lambda *_: None)
    before = sorted(p.name for p in split.iterdir())
    with pytest.raises(BadInput, match=r"--out \S+pp2/run lies inside the checkpoint \S+pp2 that "
                                       r"this run reads: pick an --out outside it"):
        ft_main.main(**run_args(split, alpaca_small, split / "run"),
                     tokenizer_path=str(model_bin.parent / "tok512.model"))
    assert sorted(p.name for p in split.iterdir()) == before
