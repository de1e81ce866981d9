"""Tensor parallelism (llama/model/tensor_shards.py, llama/parallel/tensor_parallel.py): TP 2, TP 4
and a grid of 2 stages x TP 2 on real gloo ranks compute what one process computes (logits,
greedy ids, every method's gradient, int8 weights too); a Meta 2-shard checkpoint loads as TP 2
ranks; a shard read from files equals the loaded stage cut in memory; bad grids are refused.
stories260K has 8 heads and 4 kv heads, so TP 2 and TP 4 split real grouped-query attention.
Run: python3 -m pytest -q tests/test_tp.py
"""
import json
import os

import pytest
import torch

import example
import ft_main
import split_model
from launch import check_all_ok, launch
from llama.errors import BadInput
from llama.formats.checkpoint import load_model, open_source, read_split
from llama.formats.files import sha256_of
from llama.formats.layouts import save_meta
from llama.formats.tp_files import tp_fetch
from llama.model.partition import stage_weight_bytes
from llama.model.tensor_shards import check_tp, shard_stage
from llama.parallel.distributed import DistContext, check_grid
from llama.parallel.pipeline import Stage
from llama.parallel.trace import write_chrome_trace
from llama.serving.generation import generate
from llama.tools import plan
from llama.tools.plot import schedule_svg
from llama.tuning.methods import apply_prompt
from llama.tuning.prompt import SoftPrompt, init_prompt_weight
from llama.tuning.sharding import tuning_shard_dim
from test_lora_train import lora_args
from test_methods import as_cli, metrics, stop_before_step_3, with_tuning
from workers.prompt_grad import make_micro_batches

PROMPTS = [[1, 20, 30, 40], [1, 7, 8]]  # tests/workers/tp_worker.py's
WORKER = os.path.join("tests", "workers", "tp_worker.py")


@pytest.fixture(scope="module")
def meta_two_shards(source, tmp_path_factory):
    """stories260K in Meta's layout as 2 model-parallel shards (column-parallel tensors cut on
    dim 0, row-parallel on dim 1, the embeddings on dim 1, as Meta's 13B files are)."""
    folder = tmp_path_factory.mktemp("meta") / "stories260K_mp2"
    save_meta({name: source.load(name) for name in source.names()}, source.args, folder, 2)
    return folder


@pytest.fixture(scope="module")
def split_pp2_tp2(model_bin, tmp_path_factory):
    """split_model.py --n_stages 2 --tp 2: four files, one per (stage, TP rank)."""
    folder = tmp_path_factory.mktemp("split") / "pp2_tp2"
    split_model.main(str(model_bin), 2, out_dir=str(folder), tp=2)
    return folder


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(5))


def method_on(model, method: str):
    """The tuning tests/workers/method_grad.py's build_tuning gives the ranks (same seeds)."""
    if method != "prompt":
        return with_tuning(model, method)
    weight = init_prompt_weight("random", 4, model.tok_embeddings.weight, seed=1)
    return apply_prompt(SoftPrompt(weight), 4)


def one_process(model_bin, tokens, quantize, methods):
    """(logits, greedy ids, {method: {key: gradient}}) of the whole model in this process."""
    model = load_model(model_bin, quantize=quantize)
    with torch.no_grad():
        logits = model(tokens)
    ids = generate(Stage(model, DistContext()), PROMPTS, max_gen_len=12) if not quantize else None
    grads = {}
    for method in methods:  # "lora+recompute", "lora+fused" must give "lora"'s gradient
        model = load_model(model_bin, quantize=quantize)
        tuning = method_on(model, method.split("+")[0])
        Stage(model, DistContext(), tuning=tuning).train_step(
            make_micro_batches(model.args.vocab_size, 4, 2), "1f1b")
        grads[method] = {key: t.grad for key, t in tuning.trainable.items()}
    return logits, ids, grads


def relative_error(found, expected) -> float:
    return float((found - expected).norm() / expected.norm())


def assert_same_logits(by_rank, expected, what):
    found = [logits for logits in by_rank if logits is not None]  # the last stage's ranks
    assert found and all(torch.equal(f, found[0]) for f in found), what
    assert relative_error(found[0], expected) <= 1e-5, what


def assert_replicated_grads_agree(parts, tp: int, what):
    """A tensor whole on every TP rank of a stage (the soft prompt, a LoRA's uncut half, an
    adapter's prompt and gate) has the same gradient on each of them."""
    checked = 0
    for first in range(0, len(parts), tp):
        for key, grad in parts[first].items():
            if tuning_shard_dim(key, grad) is None:
                for other in parts[first + 1:first + tp]:
                    assert torch.equal(other[key], grad), f"{what}: {key}"
                checked += 1
    return checked


@pytest.mark.parametrize("n_procs, tp", [(2, 2), (4, 4), (4, 2)], ids=["tp2", "tp4", "2x2"])
def test_grid_computes_what_one_process_computes(model_bin, meta_two_shards, split_pp2_tp2, tokens,
                                                 n_procs, tp, tmp_path):
    out = tmp_path / "grid.pt"
    ckpt = split_pp2_tp2 if n_procs != tp else model_bin  # the grid reads its own 4 files
    argv = [WORKER, "--ckpt", str(ckpt), "--out", str(out), "--tp", str(tp)]
    if n_procs == tp:  # the Meta shards as TP 2 ranks (TP 4 cuts each of them again)
        argv += ["--meta", str(meta_two_shards)]
    check_all_ok(launch(argv, n_procs, timeout_s=240))
    results = torch.load(out, weights_only=True)
    for quantize in (None, "int8"):
        found = results[quantize or "float"]
        what = f"{n_procs} ranks, tp {tp}, {quantize or 'float'}"
        logits, ids, grads = one_process(model_bin, tokens, quantize, found["grads"])
        assert_same_logits(found["logits"], logits, what)
        if ids is not None:
            assert found["ids"] == ids, what
        replicated = 0
        for method, expected in grads.items():
            assert sorted(found["grads"][method]) == sorted(expected), (what, method)
            for key, grad in expected.items():
                error = relative_error(found["grads"][method][key], grad)
                assert error <= 1e-5, f"{what}, {method}, {key}: {error:.2e}"
            replicated += assert_replicated_grads_agree(found["parts"][method], tp,
                                                        f"{what}, {method}")
        assert replicated > 0
    if n_procs == tp:
        merged = load_model(meta_two_shards)
        with torch.no_grad():
            assert_same_logits(results["meta_logits"], merged(tokens), "Meta 2 shards as TP")


# ---- shards from files == the loaded stage cut in memory ----

@pytest.mark.parametrize("quantize", [None, "int8"])
def test_a_shard_loaded_from_any_source_equals_the_loaded_stage_cut(model_bin, meta_two_shards,
                                                                     quantize):
    for tp_rank in range(2):
        cut = shard_stage(load_model(model_bin, quantize=quantize), tp_rank, 2).state_dict()
        for ckpt in (model_bin, meta_two_shards):
            loaded = load_model(ckpt, quantize=quantize, tp_rank=tp_rank, tp_size=2).state_dict()
            assert sorted(loaded) == sorted(cut)
            for name, tensor in cut.items():
                assert torch.equal(loaded[name], tensor), (ckpt, quantize, tp_rank, name)


def test_tp_split_writes_a_file_per_stage_and_rank_each_a_quarter_of_the_blocks(
        model_bin, split_pp2_tp2):
    args, manifest = read_split(split_pp2_tp2)
    assert manifest["format"] == 3 and manifest["tp"] == 2 and manifest["n_stages"] == 2
    on_disk = sorted(p.name for p in split_pp2_tp2.glob("stage.*.pth"))
    assert on_disk == ["stage.00.tp0.pth", "stage.00.tp1.pth", "stage.01.tp0.pth",
                       "stage.01.tp1.pth"]
    whole = load_model(model_bin).state_dict()
    for index, stage in enumerate(manifest["stages"]):
        assert [f["file"] for f in stage["files"]] == on_disk[2 * index:2 * index + 2]
        assert stage["bytes"] == sum(f["bytes"] for f in stage["files"])
        first, end = stage["layers"]
        in_blocks = sum(t.numel() for name, t in whole.items() if name.startswith("layers.")
                        and first <= int(name.split(".")[1]) < end and t.dim() == 2)
        for tp_rank, entry in enumerate(stage["files"]):
            assert sha256_of(split_pp2_tp2 / entry["file"]) == entry["sha256"]
            held = torch.load(split_pp2_tp2 / entry["file"], weights_only=True)
            assert sum(t.numel() for name, t in held.items() if name.startswith("layers.")
                       and t.dim() == 2) * 2 == in_blocks  # half the stage's block weights
            loaded = load_model(split_pp2_tp2, index, 2, tp_rank=tp_rank, tp_size=2)
            cut = load_model(model_bin, index, 2, tp_rank=tp_rank, tp_size=2)
            assert all(torch.equal(t, cut.state_dict()[n]) for n, t in loaded.state_dict().items())
    # one process runs the TP split too: its shards joined
    joined = load_model(split_pp2_tp2).state_dict()
    assert sorted(joined) == sorted(whole) and all(torch.equal(joined[n], t)
                                                   for n, t in whole.items())


def test_a_changed_tp_shard_file_is_refused_by_its_sha256(split_pp2_tp2, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in split_pp2_tp2.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    tensors = torch.load(copy / "stage.01.tp1.pth", weights_only=True)
    tensors["norm.weight"] = tensors["norm.weight"] * 2
    torch.save(tensors, copy / "stage.01.tp1.pth")
    with pytest.raises(BadInput, match=r"stage.01.tp1.pth does not match the sha256 in "
                                       r"split.json"):
        load_model(copy, 1, 2, tp_rank=1, tp_size=2)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_quantized_tp_split_holds_the_cut_of_the_quantized_model(model_bin, tmp_path, scheme):
    """Quantized whole, then cut: an int8 row's scale spans both shards of a row-parallel
    layer, an int4 group stays inside one."""
    folder = tmp_path / f"tp2_{scheme}"
    split_model.main(str(model_bin), 1, out_dir=str(folder), tp=2, quantize=scheme)
    group_size = read_split(folder)[1]["quantization"].get("group_size")
    for tp_rank in range(2):
        cut = shard_stage(load_model(model_bin, quantize=scheme, group_size=group_size),
                          tp_rank, 2).state_dict()
        loaded = load_model(folder, tp_rank=tp_rank, tp_size=2).state_dict()
        assert sorted(loaded) == sorted(cut)
        assert all(torch.equal(loaded[name], t) for name, t in cut.items()), (scheme, tp_rank)


def test_meta_shards_load_as_tp_ranks_without_merging(meta_two_shards):
    source = open_source(meta_two_shards)
    fetch = tp_fetch(source, source.load, 1, 2, quantizing=False)
    for name in ("layers.0.attention.wq.weight", "layers.3.feed_forward.w2.weight"):
        assert fetch(name) is source.shards[1][name]  # shard 1's own tensor, as it lies
    whole = source.load("tok_embeddings.weight")  # replicated: joined from both shards
    assert torch.equal(fetch("tok_embeddings.weight"), whole) and whole.shape == (512, 64)


# ---- refusals ----

def test_tp_that_does_not_divide_the_heads_is_refused_naming_the_valid_sizes(source):
    for bad in (3, 8):
        with pytest.raises(BadInput, match=rf"--tp {bad} does not divide .* 4 kv heads.*use "
                                           r"--tp 1 or 2 or 4$"):
            check_tp(source.args, bad)
    with pytest.raises(BadInput, match="positive integer"):
        check_tp(source.args, 0)


def test_a_world_that_is_not_stages_times_tp_is_refused_naming_both():
    with pytest.raises(BadInput, match=r"started 3 processes, .* --tp 2"):
        check_grid(3, 2)
    with pytest.raises(BadInput, match=r"6 processes = 3 stages x --tp 2, .* split into 2 "
                                       r"stages: use --nproc_per_node 4"):
        check_grid(6, 2, expected_stages=2)
    assert check_grid(4, 2, expected_stages=2) == 2 and check_grid(4, 2) == 2


def test_one_process_asked_for_tp_is_refused_in_one_line(model_bin):
    with pytest.raises(BadInput, match=r"--tp 2 needs 2 processes per stage, but this is one "
                                       r"process: start it with torchrun --nproc_per_node 2"):
        example.main(str(model_bin), tp=2, device="cpu")


def test_int4_groups_that_straddle_a_tp_shard_are_refused(model_bin):
    # 172 FFN rows / 2 ranks = 86 inputs of w2 a rank: groups of 4 would straddle the cut
    with pytest.raises(BadInput, match=r"--group_size 4 does not divide the width 86 of a TP "
                                       r"rank's share \(--tp 2\)"):
        load_model(model_bin, quantize="int4", group_size=4, tp_rank=0, tp_size=2)


# ---- training: a run resumed on another grid ends as one process ends ----

@pytest.fixture(scope="module")
def alpaca_small(alpaca_file):
    return alpaca_file(60)


def test_lora_stopped_in_one_process_resumed_on_tp2_ends_as_one_process(
        model_bin, alpaca_small, tmp_path, monkeypatch):
    """Steps 1-2 in one process, 3-4 on TP 2 (the checkpoint's whole tensors cut on load, the
    global norm counting a replicated tensor once, the parts joined on save): the files equal
    an uninterrupted one-process run's."""
    single, split_run = tmp_path / "single", tmp_path / "resumed"
    ft_main.main(**lora_args(model_bin, alpaca_small, single))
    stop_before_step_3(monkeypatch, lora_args(model_bin, alpaca_small, split_run))
    check_all_ok(launch(["ft_main.py", *as_cli(lora_args(model_bin, alpaca_small, split_run)),
                         "--tp", "2", "--resume", "True"], 2, timeout_s=240))
    for s, r in zip(metrics(single)[-2:], metrics(split_run)[-2:]):
        assert r["step"] == s["step"] and r["loss"] == pytest.approx(s["loss"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-5)  # counted once
        assert r["grad_norm"] > 0.05  # the clip by that norm shaped the step
    for name in ("tuning.pt", "checkpoint.pt"):
        expected = torch.load(single / name, weights_only=True)
        found = torch.load(split_run / name, weights_only=True)
        expected, found = (d["trainable"] if name == "checkpoint.pt" else d
                           for d in (expected, found))
        assert sorted(found) == sorted(expected) and len(found) == 70
        for key, tensor in expected.items():  # per tensor: AdamW magnifies the rounding of a
            # gradient near zero into an element's step, not the tensor's
            assert relative_error(found[key], tensor) <= 1e-5, (name, key)


# ---- the planner ----

@pytest.mark.parametrize("scheme, group_size", [(None, None), ("int8", None), ("int4", 2)])
def test_planner_weights_per_tp_rank_are_what_a_shard_holds(model_bin, scheme, group_size):
    quantization = {"scheme": scheme, "group_size": group_size} if scheme else None
    for tp_rank in range(2):
        model = load_model(model_bin, quantize=scheme, group_size=group_size, tp_rank=tp_rank,
                           tp_size=2)
        held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        assert held == stage_weight_bytes(model.args, ((0, 5), True, True), 4, quantization, 2)


def test_planner_prints_per_card_peaks_and_the_all_reduce_bytes_of_a_grid(capsys):
    fits = plan.main("7B", gpus=(4, 4), global_batch=32, seq_len=512, tp=2, top=3)
    out = capsys.readouterr().out
    # 7B: 16 layers a stage, 2 all-reduces of 4096 fp16 values a layer, half of each sent by
    # each of 2 ranks (ring), forward and backward
    assert "2 stages x TP 2" in out and "512.0 KiB sent per token of a training step" in out
    alone = plan.configurations(plan.model_args_for("7B"), [4.0, 4.0], 32, 512, 32, "float16",
                                "1f1b", 0.5)
    halved = {(c["quantization"], c["micro_batch"], c["mode"]): c for c in fits}
    for config in alone:
        key = (config["quantization"], config["micro_batch"], config["mode"])
        if key in halved:  # each TP card holds less than the stage's one card would
            assert max(halved[key]["peaks"]) < max(config["peaks"])
    with pytest.raises(BadInput, match=r"--tp 3 does not divide"):
        plan.main("7B", gpus=(4, 4), tp=3)


# ---- the trace of a grid ----

def test_a_grid_trace_draws_a_row_per_rank_with_its_all_reduces(tmp_path):
    """Rows named by stage and TP rank, the all-reduces in the lane below, the ideal bubble of
    the stages (not of the ranks)."""
    def span(name, category, ts, dur, micro_batch=None):
        args = {"step": 0, **({"micro_batch": micro_batch} if micro_batch is not None else {})}
        return {"name": name, "cat": category, "ph": "X", "ts": ts, "dur": dur, "args": args}
    ranks = [[span("F0", "forward", 100 * stage, 80, 0), span("all-reduce", "all_reduce",
                                                              100 * stage + 30, 10),
              span("B0", "backward", 300 - 100 * stage, 80, 0)]
             for stage in (0, 0, 1, 1)]
    path = tmp_path / "trace.json"
    write_chrome_trace(str(path), ranks, {"n_stages": 2, "tp": 2, "n_micro_batches": 1,
                                          "schedule": "1f1b"})
    svg = schedule_svg(json.loads(path.read_text()))
    for label in ("stage 0 TP 0", "stage 0 TP 1", "stage 1 TP 0", "stage 1 TP 1",
                  "TP all-reduce", "ideal for 2 stages of equal cost and m=1 micro-batches"):
        assert label in svg, label
    assert svg.count('class="span all_reduce"') == 4
