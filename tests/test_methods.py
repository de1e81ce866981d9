"""Deep soft prompts (llama/tuning/methods.py): prefix tuning and LLaMA-Adapter through the pipeline.

Each method's gradient through 2 and 4 real gloo stages (GPipe and 1F1B) equals one process's
on the full batch; ft_main --method prefix through 2 stages trains like one process and its
files generate the same on 1 and 3 stages; KV-cache generation equals recomputation; resume is
bitwise; PEFT export/import round trips; bad input is refused in one line.
Run: python3 -m pytest -q tests/test_methods.py
"""
import json
import os

import pytest
import torch

import example_ft
import ft_main
import split_model
from launch import check_all_ok, launch
from llama.training import train
from llama.formats.checkpoint import load_model
from llama.parallel.distributed import DistContext
from llama.errors import BadInput
from llama.serving.generation import generate
from llama.tuning.peft import export_peft
from llama.tuning.files import load_tuning, save_tuning
from llama.tuning.methods import apply_adapter, apply_prefix, apply_saved
from llama.parallel.pipeline import Stage
from llama.prepare.offload import apply_recompute
from llama.prepare.stage import Preparation
from llama.training.run_folder import LOCK_FILE, claim_out
from workers.lora_setup import opened_lora
from workers.prompt_grad import Batch, make_micro_batches

METHODS = ("prefix", "adapter")


@pytest.fixture(scope="module")
def alpaca_small(alpaca_file):
    return alpaca_file(60)


def run_args(model_bin, data, out, **overrides):
    """A short float32 prefix run on CPU: 4 steps of 2 micro-batches of 2 examples."""
    args = dict(ckpt_dir=str(model_bin), data=str(data), out=str(out), template="plain",
                method="prefix", n_virtual_tokens=4, max_seq_len=96, global_batch_size=4,
                micro_batch_size=2, steps=4, lr=0.05, warmup_steps=1, eval_fraction=0.1,
                eval_every=2, save_every=2, log_every=100, device="cpu", dtype="float32")
    args.update(overrides)
    return args


def as_cli(args):
    return [part for name, value in args.items() for part in (f"--{name}", str(value))]


def metrics(out):
    return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "peak_mem_gib")}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def with_tuning(model, method, seed=3, gate=0.5):
    """A method on the model, its adapter gates opened (zero would hide the prompts' gradient),
    a LoRA's B drawn (zero would hide A's)."""
    if method == "lora":
        return opened_lora(model)
    if method == "prefix":
        return apply_prefix(model, 4, seed=seed)
    tuning = apply_adapter(model, 4, adapter_layers=3, seed=seed)
    with torch.no_grad():
        for key, tensor in tuning.trainable.items():
            if key.endswith("gate"):
                tensor.fill_(gate)
    return tuning


# ---- gradient equality ----

def full_batch(micro_batches):
    """One micro-batch of every row, right-padded (padding has no target and, causal, no effect)."""
    length = max(b.tokens.shape[1] for b in micro_batches)
    tokens = torch.cat([torch.nn.functional.pad(b.tokens, (0, length - b.tokens.shape[1]))
                        for b in micro_batches])
    targets = torch.cat([torch.nn.functional.pad(b.targets, (0, length - b.targets.shape[1]),
                                                 value=-100) for b in micro_batches])
    return Batch(tokens, targets)


def one_process_gradient(model, tuning):
    """(the summed loss, each trainable tensor's gradient) of one full batch in one process."""
    micro = make_micro_batches(model.args.vocab_size, 4, 2)
    loss, _ = Stage(model, DistContext(), tuning=tuning).train_step([full_batch(micro)], "gpipe")
    grads = {k: t.grad.clone() for k, t in tuning.trainable.items()}
    assert all(float(g.norm()) > 0 for g in grads.values())
    return loss, grads


def assert_stages_give(ckpt, method, n_stages, expected_loss, expected, out, schedules, what):
    """method_grad.py on n_stages ranks gives every gradient within 1e-5 and the same loss."""
    argv = [os.path.join("tests", "workers", "method_grad.py"), "--ckpt", str(ckpt), "--out",
            str(out), "--method", method, "--schedules", schedules]
    check_all_ok(launch(argv, n_stages, timeout_s=120))
    for schedule, result in torch.load(out, weights_only=True).items():
        assert sorted(result["grads"]) == sorted(expected)
        for key, grad in result["grads"].items():
            error = float((grad - expected[key]).norm() / expected[key].norm())
            assert error <= 1e-5, f"{what}, {n_stages} stages, {schedule}, {key}: {error:.2e}"
        assert result["loss"] == pytest.approx(expected_loss, rel=1e-6)


@pytest.mark.parametrize("n_stages", [2, 4])
def test_each_methods_gradient_through_stages_equals_one_process_on_the_full_batch(
        model_bin, n_stages, tmp_path):
    for method in METHODS:
        model = load_model(model_bin)
        loss, grads = one_process_gradient(model, with_tuning(model, method))
        assert_stages_give(model_bin, method, n_stages, loss, grads, tmp_path / f"{method}.pt",
                           "gpipe,1f1b", method)


@pytest.mark.parametrize("method, quantize", [("prefix", None), ("adapter", None),
                                              ("lora", "int8")])
def test_recompute_and_activation_offload_give_the_same_gradient(model_bin, method, quantize):
    """Stage 0 has no prompt to ask for a gradient: the recomputed blocks still pass one back
    (LoRA on int8 weights: a recomputed block must take the exact product its forward took)."""
    grads = []
    for recompute in (False, True):
        model = load_model(model_bin, quantize=quantize)
        tuning = with_tuning(model, method)
        if recompute:
            apply_recompute(model, offload_activations=True)
        Stage(model, DistContext(), tuning=tuning).train_step(
            make_micro_batches(model.args.vocab_size, 2, 2), "1f1b")
        grads.append({k: t.grad for k, t in tuning.trainable.items()})
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, rtol=0, atol=0)


# ---- training: 2 stages == 1 process; resume is bitwise; generation across splits ----

@pytest.fixture(scope="module")
def single_run(model_bin, alpaca_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    ft_main.main(**run_args(model_bin, alpaca_small, out))
    return out


@pytest.fixture(scope="module")
def two_stage_run(model_bin, alpaca_small, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pp2")
    split_model.main(str(model_bin), 2, out_dir=str(folder / "split"))
    out = folder / "run"
    check_all_ok(launch(["ft_main.py", *as_cli(run_args(folder / "split", alpaca_small, out))],
                        2, timeout_s=150))
    return out


def test_prefix_training_through_two_stages_equals_one_process(single_run, two_stage_run):
    pipelined, single = metrics(two_stage_run), metrics(single_run)
    assert [m["step"] for m in pipelined] == [1, 2, 3, 4]
    for p, s in zip(pipelined, single):
        assert p["loss"] == pytest.approx(s["loss"], rel=1e-5)
        assert p["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-5)  # the GLOBAL norm
    saved = [torch.load(run / "tuning.pt", weights_only=True) for run in (two_stage_run, single_run)]
    assert sorted(saved[0]) == [f"layers.{i}.prefix" for i in range(5)]  # every stage's layers
    for key, tensor in saved[1].items():
        torch.testing.assert_close(saved[0][key], tensor, rtol=1e-5, atol=1e-7)
    info = json.loads((two_stage_run / "tuning.json").read_text())
    assert info["method"] == "prefix" and info["losses"]["eval_loss"] < info["losses"]["eval_loss_init"]


def stop_before_step_3(monkeypatch, args):
    """Run ft_main with args and stop it (as Ctrl+C would) before its third step, after the
    checkpoint of step 2: what a resume test then continues."""
    real_step = train.run_train_step

    def stop_at_step_3(stage, batches, cfg, scale, ctx):
        if stage.step + 1 == 3:
            raise KeyboardInterrupt
        return real_step(stage, batches, cfg, scale, ctx)
    monkeypatch.setattr(train, "run_train_step", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        ft_main.main(**args)
    monkeypatch.undo()


def test_prefix_resume_ends_bitwise_equal(model_bin, alpaca_small, single_run, tmp_path,
                                          monkeypatch):
    out = tmp_path / "run"
    args = run_args(model_bin, alpaca_small, out)
    stop_before_step_3(monkeypatch, args)
    ft_main.main(**args, resume=True)
    resumed = torch.load(out / "tuning.pt", weights_only=True)
    for key, tensor in torch.load(single_run / "tuning.pt", weights_only=True).items():
        assert torch.equal(resumed[key], tensor), key
    assert metrics(out)[-2:] == metrics(single_run)[-2:]


def test_prefix_trained_on_two_stages_generates_the_same_on_one_and_three(
        model_bin, two_stage_run, tmp_path, capsys):
    split3 = tmp_path / "pp3"
    split_model.main(str(model_bin), 3, out_dir=str(split3))
    capsys.readouterr()
    args = ["--prompts", "Once upon a time", "--max_gen_len", "12", "--template", "none",
            "--compare", "True"]
    example_ft.main(str(model_bin), str(two_stage_run), prompts="Once upon a time",
                    max_gen_len=12, template="none", compare=True)
    single = capsys.readouterr().out
    results = launch(["example_ft.py", "--ckpt_dir", str(split3), "--prompt",
                      str(two_stage_run), *args], 3, timeout_s=120)
    check_all_ok(results)
    assert results[0][1] == single and "[with prompt]" in single


@pytest.fixture(scope="module")
def adapter_run(model_bin, alpaca_small, tmp_path_factory):
    """A short adapter run, its lr high enough that the opened gates change what is said."""
    out = tmp_path_factory.mktemp("adapter") / "run"
    ft_main.main(**run_args(model_bin, alpaca_small, out, method="adapter", adapter_layers=2,
                            lr=0.5))
    return out


@pytest.mark.parametrize("fused", [True, False])
def test_adapter_run_generates_the_unfused_ids_with_example_ft_fused_or_not(
        model_bin, adapter_run, fused, monkeypatch):
    """example_ft fuses q/k/v by default: the adapter then has no wq/wk/wv to call, and must
    project its prompt the way the attention does."""
    monkeypatch.setattr(example_ft, "Preparation",
                        lambda **k: Preparation(**{**k, "fuse_projections": fused}))
    calls = []

    def recording_generate(stage, ids, *args, **kwargs):
        calls.append((stage, ids, args, kwargs, generate(stage, ids, *args, **kwargs)))
        return calls[-1][-1]
    monkeypatch.setattr(example_ft, "generate", recording_generate)
    example_ft.main(ckpt_dir=str(model_bin), prompt=str(adapter_run), max_gen_len=12,
                    compare=True)

    (stage, ids, args, kwargs, tuned), (*_, base) = calls
    assert (stage.model.layers["4"].attention.wqkv is not None) == fused
    model = load_model(model_bin)
    method, tensors, _ = load_tuning(adapter_run, model.args)
    reference = Stage(model, DistContext(), tuning=apply_saved(model, method, tensors, True))
    assert method == "adapter" and tuned == generate(reference, ids, *args, **kwargs)
    assert tuned != base, "the trained adapter should change what the model says"


def test_overwrite_with_another_method_leaves_no_file_of_the_old_run(model_bin, alpaca_small,
                                                                     tmp_path):
    """load_tuning prefers tuning.pt, then an earlier version's prompt.pt: whatever an old run
    left would be what example_ft reads, so --overwrite removes every method's files."""
    out = tmp_path / "run"
    ft_main.main(**run_args(model_bin, alpaca_small, out, steps=1, eval_fraction=0))
    torch.save(torch.zeros(4, 64), out / "prompt.pt")  # as an earlier version wrote a prompt
    (out / "prompt.json").write_text(json.dumps({"n_virtual_tokens": 4}))
    (out / "notes.txt").write_text("my notes")
    (out / "peft" / "README.md").write_text("my notes on the export")
    ft_main.main(**run_args(model_bin, alpaca_small, out, method="prompt", steps=1,
                            eval_fraction=0), overwrite=True)
    method, tensors, info = load_tuning(out, load_model(model_bin).args)
    assert method == "prompt" and sorted(tensors) == ["prompt"] and "peft" not in info
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt", "metrics.jsonl", "notes.txt", "peft", "tuning.json", "tuning.pt"]
    assert sorted(p.name for p in (out / "peft").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.bin", "llama_prompt.json"]
    assert json.loads((out / "peft" / "adapter_config.json").read_text())["peft_type"] == \
        "PROMPT_TUNING"


@pytest.mark.parametrize("method", ["prompt", *METHODS, "lora"])
def test_overwrite_knows_every_file_a_run_of_each_method_writes(model_bin, alpaca_small,
                                                                method, tmp_path):
    out = tmp_path / "run"
    ft_main.main(**run_args(model_bin, alpaca_small, out, method=method, steps=1,
                            eval_fraction=0))
    with claim_out(out, resume=None, overwrite=True, log=print):
        assert list(out.rglob("*")) == [out / LOCK_FILE]  # the run's own, while it holds --out


# ---- generation with a prefix or an adapter: cache == recomputation ----

@pytest.mark.parametrize("method", METHODS)
def test_cached_generation_equals_recomputing_the_whole_sequence(model_bin, method):
    model = load_model(model_bin)
    tuning = with_tuning(model, method, gate=2.0)
    stage = Stage(model, DistContext(), tuning=tuning)
    prompts = [[1, 403, 407, 261], [1, 403]]  # unequal lengths
    cached = generate(stage, prompts, 10)
    base = generate(stage, prompts, 10, use_prompt=False)
    assert cached != base, "the method should change what the model says"
    for prompt, new in zip(prompts, cached):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(len(new)):
                h = stage.run_layers(model.embed(torch.tensor([ids])), with_prompt=True)
                ids.append(int(model.logits(h[0, -1]).argmax()))
        assert ids[len(prompt):] == new


@pytest.mark.parametrize("method", METHODS)
def test_static_decode_with_the_method_generates_the_eager_ids(model_bin, method):
    """--cuda_graph's static decode (uncaptured on a CPU) with a prefix or adapter, and then
    without it (tests/test_engine.py checks which steps were captured)."""
    model = load_model(model_bin)
    tuning = with_tuning(model, method, gate=2.0)
    eager = Stage(model, DistContext(), tuning=tuning)
    static = Stage(model, DistContext(), tuning=tuning, cuda_graph=True)
    prompts = [[1, 403, 407, 261], [1, 403]]
    for use_prompt in (True, False):
        assert generate(static, prompts, 10, use_prompt=use_prompt) == \
            generate(eager, prompts, 10, use_prompt=use_prompt)


# ---- files: a different split, PEFT round trip ----

@pytest.mark.parametrize("method", METHODS)
def test_peft_export_imports_back_the_same_tensors_and_ids(model_bin, method, tmp_path):
    model = load_model(model_bin)
    tensors = {k: t.detach().clone() for k, t in with_tuning(model, method, gate=2.0).trainable.items()}
    export_peft(tmp_path, method, tensors, model.args, {"template": "none"})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    if method == "prefix":  # GQA: PEFT's token_dim and heads are the kv heads'
        assert config["num_attention_heads"] == model.args.n_kv_heads == 4
        assert config["token_dim"] == 4 * model.args.head_dim
        saved = torch.load(tmp_path / "adapter_model.bin", weights_only=True)["prompt_embeddings"]
        assert saved.shape == (4, model.args.n_layers * 2 * config["token_dim"])
    loaded_method, loaded, _ = load_tuning(tmp_path, model.args)
    assert loaded_method == method and sorted(loaded) == sorted(tensors)
    for key, tensor in tensors.items():
        assert torch.equal(loaded[key], tensor)
    ids = []
    for source in (tensors, loaded):
        fresh = load_model(model_bin)
        stage = Stage(fresh, DistContext(), tuning=apply_saved(fresh, method, source, True))
        ids.append(generate(stage, [[1, 403, 407]], 8))
    assert ids[0] == ids[1]


def test_tuning_folder_loads_onto_any_split(model_bin, tmp_path):
    model = load_model(model_bin)
    tensors = {k: t.detach().clone() for k, t in apply_prefix(model, 4, seed=1).trainable.items()}
    save_tuning(tmp_path, "prefix", tensors, model.args, {})
    method, loaded, _ = load_tuning(tmp_path, model.args)
    stage1 = load_model(model_bin, 1, 3)  # the middle of three stages
    tuning = apply_saved(stage1, method, loaded, False)
    assert sorted(tuning.trainable) == [f"layers.{i}.prefix" for i in range(*stage1.layer_range)]
    assert stage1.layer_range != (0, 5)


# ---- bad input ----

def test_tuning_of_another_model_is_refused_naming_the_file(model_bin, tmp_path):
    model = load_model(model_bin)
    tensors = {k: t.detach().clone() for k, t in apply_prefix(model, 4).trainable.items()}
    tensors["layers.0.prefix"] = torch.zeros(2, 4, 8, 8)
    save_tuning(tmp_path, "prefix", tensors, model.args, {})
    with pytest.raises(BadInput, match=r"tuning\.pt: layers\.0\.prefix has shape \(2, 4, 8, 8\), "
                                       r"but this model \(dim=64, n_kv_heads=4\) needs \(2, 4, 4, 8\)"):
        load_tuning(tmp_path, model.args)


def test_tuning_of_another_method_is_refused_naming_the_file(model_bin, tmp_path):
    model = load_model(model_bin)
    tensors = {k: t.detach().clone() for k, t in apply_prefix(model, 4).trainable.items()}
    save_tuning(tmp_path, "adapter", tensors, model.args, {})
    with pytest.raises(BadInput, match=r"tuning\.pt holds 'layers\.0\.prefix', not a tensor of "
                                       r"the adapter method it is described as"):
        load_tuning(tmp_path, model.args)


def test_peft_folder_of_another_type_is_refused(model_bin, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(BadInput, match=r"adapter_config\.json is a PEFT 'IA3' adapter; this "
                                       r"project reads PROMPT_TUNING, PREFIX_TUNING, "
                                       r"ADAPTION_PROMPT, LORA"):
        load_tuning(tmp_path, load_model(model_bin).args)


def test_unknown_method_is_refused(model_bin, alpaca_small, tmp_path):
    with pytest.raises(BadInput, match=r"--method 'ia3' must be one of prompt, prefix, adapter, "
                                       r"lora"):
        ft_main.main(**run_args(model_bin, alpaca_small, tmp_path / "run", method="ia3"))
    assert not (tmp_path / "run").exists()


def test_resume_with_another_method_is_refused(model_bin, alpaca_small, single_run, tmp_path):
    with pytest.raises(BadInput, match=r"belongs to another run: it had --method='prefix', this "
                                       r"run has 'adapter'; resume with the same settings"):
        ft_main.main(**run_args(model_bin, alpaca_small, tmp_path / "run", method="adapter"),
                     resume=str(single_run / "checkpoint.pt"))

