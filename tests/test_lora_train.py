"""LoRA trained through the pipeline stages (llama/tuning/lora.py), on float or quantized weights.

The gradient of every A and B through 2 real gloo stages equals one process's on the full batch
(plain, with recomputation and activation offload, on int8 and int4 weights); a fresh LoRA is the base
model; ft_main --method lora through 2 stages trains like one process and resumes bitwise; the
PEFT export merges with convert --lora into a model of the same logits, and loads in peft onto
the HF export with the same logits (when peft is installed); bad settings are refused in one line.
Run: python3 -m pytest -q tests/test_lora_train.py
"""
import json
import os

import pytest
import torch

import example_ft
import ft_main
import split_model
from launch import check_all_ok, launch
from llama.errors import BadInput
from llama.formats import convert
from llama.formats.checkpoint import load_model
from llama.model.fused import apply_fused_projections
from llama.parallel.distributed import DistContext
from llama.parallel.pipeline import Stage
from llama.serving.generation import generate
from llama.tuning.files import load_tuning, save_tuning
from llama.tuning.lora import apply_lora, lora_settings
from llama.tuning.methods import apply_saved
from workers.lora_setup import opened_lora
from workers.prompt_grad import make_micro_batches
from test_methods import as_cli, full_batch, metrics, run_args, stop_before_step_3

TOKENS = torch.tensor([[1, 403, 407, 261, 378, 432, 383, 286]])


def lora_args(model_bin, data, out, **overrides):
    """A short float32 LoRA run: every projection, rank 4, rsLoRA; lr high enough for 4 steps
    to change the model, and a clip low enough that the global norm is what bounds the step."""
    return run_args(model_bin, data, out, **{
        "method": "lora", "lora_r": 4, "lora_alpha": 8, "lora_targets": "all",
        "use_rslora": True, "lr": 0.02, "max_grad_norm": 0.05, **overrides})


@pytest.fixture(scope="module")
def alpaca_small(alpaca_file):
    return alpaca_file(60)


def logits_with(model, tuning):
    stage = Stage(model, DistContext(), tuning=tuning)
    with torch.no_grad():
        return stage.model.logits(stage.run_layers(stage.hidden_in(TOKENS, True), True))


# ---- the method itself ----

@pytest.mark.parametrize("variant", ["float", "fused", "int8"])
def test_a_fresh_lora_is_the_base_model(model_bin, variant):
    model = load_model(model_bin, quantize="int8" if variant == "int8" else None)
    if variant == "fused":
        apply_fused_projections(model)
    with torch.no_grad():
        base = model(TOKENS)
    tuning = apply_lora(model, lora_settings(targets="all"), seed=0)
    assert len(tuning.trainable) == 5 * 7 * 2
    assert torch.equal(logits_with(model, tuning), base)


def test_fused_projections_get_the_unfused_update_and_gradient(model_bin):
    """example_ft fuses q/k/v and w1/w3: each part's rows of the fused output get their own
    update, the same as on the separate linears."""
    results = []
    for fused in (False, True):
        model = load_model(model_bin)
        if fused:
            apply_fused_projections(model)
        tuning = opened_lora(model)
        Stage(model, DistContext(), tuning=tuning).train_step(
            make_micro_batches(model.args.vocab_size, 2, 2), "1f1b")
        results.append((logits_with(model, tuning), {k: t.grad for k, t in tuning.trainable.items()}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-4, rtol=0)
    for key, grad in results[0][1].items():
        assert float((results[1][1][key] - grad).norm() / grad.norm()) <= 1e-4, key


@pytest.mark.parametrize("variant", ["plain", "recompute", "int8", "int4"])
def test_lora_gradient_through_two_stages_equals_one_process(model_bin, variant, tmp_path):
    quantize = variant if variant.startswith("int") else None
    model = load_model(model_bin, quantize=quantize)
    tuning = opened_lora(model)
    micro = make_micro_batches(model.args.vocab_size, 4, 2)
    expected_loss, _ = Stage(model, DistContext(), tuning=tuning).train_step(
        [full_batch(micro)], "gpipe")
    expected = {k: t.grad.clone() for k, t in tuning.trainable.items()}
    assert len(expected) == 70 and all(float(g.norm()) > 0 for g in expected.values())

    out = tmp_path / "grads.pt"
    argv = [os.path.join("tests", "workers", "method_grad.py"), "--ckpt", str(model_bin),
            "--out", str(out), "--method", "lora", "--schedules", "gpipe,1f1b",
            "--recompute", str(variant == "recompute"), "--quantize", str(quantize)]
    check_all_ok(launch(argv, 2, timeout_s=150))
    for schedule, result in torch.load(out, weights_only=True).items():
        assert sorted(result["grads"]) == sorted(expected)
        for key, grad in result["grads"].items():
            error = float((grad - expected[key]).norm() / expected[key].norm())
            assert error <= 1e-5, f"{variant}, {schedule}, {key}: {error:.2e}"
        assert result["loss"] == pytest.approx(expected_loss, rel=1e-6)


# ---- training: 2 stages == 1 process; resume is bitwise ----

@pytest.fixture(scope="module")
def single_run(model_bin, alpaca_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_single") / "run"
    ft_main.main(**lora_args(model_bin, alpaca_small, out))
    return out


@pytest.fixture(scope="module")
def two_stage_run(model_bin, alpaca_small, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora_pp2")
    split_model.main(str(model_bin), 2, out_dir=str(folder / "split"))
    out = folder / "run"
    check_all_ok(launch(["ft_main.py", *as_cli(lora_args(folder / "split", alpaca_small, out))],
                        2, timeout_s=150))
    return out


def test_lora_training_through_two_stages_equals_one_process(single_run, two_stage_run):
    pipelined, single = metrics(two_stage_run), metrics(single_run)
    assert [m["step"] for m in pipelined] == [1, 2, 3, 4]
    for p, s in zip(pipelined, single):
        assert p["loss"] == pytest.approx(s["loss"], rel=1e-5)
        assert p["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-5)  # the GLOBAL norm
        assert p["grad_norm"] > 0.05  # so the clip, by that norm, shaped every step
    saved = [torch.load(run / "tuning.pt", weights_only=True) for run in (two_stage_run, single_run)]
    assert len(saved[0]) == 70 and sorted(saved[0]) == sorted(saved[1])
    for key, tensor in saved[1].items():
        torch.testing.assert_close(saved[0][key], tensor, rtol=1e-5, atol=1e-7)
    info = json.loads((two_stage_run / "tuning.json").read_text())
    assert info["method"] == "lora" and info["lora"] == {
        "r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q", "k", "v", "o", "gate", "up", "down"],
        "use_rslora": True}
    assert info["losses"]["eval_loss"] < info["losses"]["eval_loss_init"]
    assert info["losses"]["eval_loss_init"] == info["losses"]["eval_loss_no_prompt"]  # B = 0


def test_lora_resume_ends_bitwise_equal(model_bin, alpaca_small, single_run, tmp_path,
                                        monkeypatch):
    out = tmp_path / "run"
    args = lora_args(model_bin, alpaca_small, out)
    stop_before_step_3(monkeypatch, args)
    ft_main.main(**args, resume=True)
    resumed = torch.load(out / "tuning.pt", weights_only=True)
    for key, tensor in torch.load(single_run / "tuning.pt", weights_only=True).items():
        assert torch.equal(resumed[key], tensor), key
    assert metrics(out)[-2:] == metrics(single_run)[-2:]


def test_resume_with_other_lora_settings_is_refused(model_bin, alpaca_small, single_run,
                                                    tmp_path):
    with pytest.raises(BadInput, match=r"belongs to another run: it had --lora_r=4, this run has "
                                       r"8; resume with the same settings"):
        ft_main.main(**lora_args(model_bin, alpaca_small, tmp_path / "run", lora_r=8),
                     resume=str(single_run / "checkpoint.pt"))


# ---- the files: any split, example_ft, the PEFT export merged by convert --lora ----

def test_lora_folder_loads_onto_any_split(model_bin, two_stage_run):
    model = load_model(model_bin)
    method, tensors, info = load_tuning(two_stage_run, model.args)
    middle = load_model(model_bin, 1, 3)
    tuning = apply_saved(middle, method, tensors, False, info)
    layers = {key.split(".")[1] for key in tuning.trainable}
    assert layers == set(middle.layers) and middle.layer_range != (0, 5)


def test_example_ft_generates_with_the_lora_as_the_unfused_model(model_bin, two_stage_run,
                                                                 monkeypatch):
    calls = []

    def recording_generate(stage, ids, *args, **kwargs):
        calls.append((stage, ids, args, kwargs, generate(stage, ids, *args, **kwargs)))
        return calls[-1][-1]
    monkeypatch.setattr(example_ft, "generate", recording_generate)
    example_ft.main(ckpt_dir=str(model_bin), prompt=str(two_stage_run), max_gen_len=12,
                    compare=True, template="none")
    (stage, ids, args, kwargs, tuned), (*_, base) = calls
    assert stage.model.layers["0"].attention.wqkv is not None  # example_ft fuses
    model = load_model(model_bin)
    method, tensors, info = load_tuning(two_stage_run, model.args)
    reference = Stage(model, DistContext(), tuning=apply_saved(model, method, tensors, True, info))
    assert tuned == generate(reference, ids, *args, **kwargs)
    assert tuned != base, "the trained LoRA should change what the model says"


def test_peft_export_merged_by_convert_gives_the_lora_models_logits(model_bin, two_stage_run,
                                                                    tmp_path):
    config = json.loads((two_stage_run / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["use_rslora"] is True
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj"]
    convert.main(str(model_bin), str(tmp_path / "merged"), lora=str(two_stage_run / "peft"))
    model = load_model(model_bin)
    method, tensors, info = load_tuning(two_stage_run, model.args)
    tuned = logits_with(model, apply_saved(model, method, tensors, True, info))
    with torch.no_grad():
        merged = load_model(tmp_path / "merged")(TOKENS)
        base = load_model(model_bin)(TOKENS)
    torch.testing.assert_close(merged, tuned, atol=1e-4, rtol=0)
    assert (tuned - base).abs().max() > 0.05, "the trained LoRA should change the logits"


def test_peft_export_imports_back_the_same_tensors(model_bin, two_stage_run):
    model = load_model(model_bin)
    ours = load_tuning(two_stage_run, model.args)
    theirs = load_tuning(two_stage_run / "peft", model.args)
    assert theirs[0] == "lora" and sorted(theirs[1]) == sorted(ours[1])
    for key, tensor in ours[1].items():
        assert torch.equal(theirs[1][key], tensor), key
    assert {k: theirs[2]["lora"][k] for k in ("r", "alpha", "use_rslora")} == \
        {k: ours[2]["lora"][k] for k in ("r", "alpha", "use_rslora")}


def test_peft_loads_the_export_onto_the_hf_model_with_the_same_logits(model_bin, two_stage_run,
                                                                      tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    convert.main(str(model_bin), str(tmp_path / "hf"), to="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, two_stage_run / "peft").eval()
    model = load_model(model_bin)
    method, tensors, info = load_tuning(two_stage_run, model.args)
    ours = logits_with(model, apply_saved(model, method, tensors, True, info))
    with torch.no_grad():
        peft_logits = theirs(input_ids=TOKENS, attention_mask=torch.ones_like(TOKENS)).logits
    torch.testing.assert_close(peft_logits, ours, atol=1e-4, rtol=0)


# ---- bad input ----

@pytest.mark.parametrize("change, message", [
    ({"lora_r": 0}, r"--lora_r=0 must be a positive integer"),
    ({"lora_alpha": -1.0}, r"--lora_alpha=-1.0 must be a positive number"),
    ({"lora_dropout": 1.0}, r"--lora_dropout=1.0 must be a number in \[0, 1\)"),
    ({"lora_targets": "q,x"}, r"--lora_targets names 'x': use a comma-separated list of q, k, "
                              r"v, o, gate, up, down, or attention, mlp or all"),
    ({"lora_dropout": 0.1, "recompute": True}, r"--lora_dropout 0.1 cannot go with full "
                                               r"recomputation"),
])
def test_bad_lora_settings_are_refused_in_one_line(model_bin, alpaca_small, tmp_path, change,
                                                   message):
    with pytest.raises(BadInput, match=message) as caught:
        ft_main.main(**lora_args(model_bin, alpaca_small, tmp_path / "run", **change))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_lora_described_with_another_rank_is_refused(model_bin, tmp_path):
    model = load_model(model_bin)
    tensors = {k: t.detach().clone() for k, t in opened_lora(model).trainable.items()}
    save_tuning(tmp_path, "lora", tensors, model.args,
                {"lora": {"r": 8, "alpha": 8, "use_rslora": False}})
    with pytest.raises(BadInput, match=r"tuning\.pt: the tensors are of rank 4 but the "
                                       r"description says r=8"):
        load_tuning(tmp_path, model.args)


def test_lora_made_by_peft_runs_here_as_in_peft(model_bin, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    convert.main(str(model_bin), str(tmp_path / "hf"), to="hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    torch.manual_seed(0)  # init_lora_weights=False: B is random too, so every update counts
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "k_proj", "down_proj"],
                             init_lora_weights=False)
    theirs = peft.get_peft_model(hf, config).eval()
    theirs.save_pretrained(tmp_path / "peft")
    model = load_model(model_bin)
    method, tensors, info = load_tuning(tmp_path / "peft", model.args)
    assert method == "lora" and len(tensors) == 5 * 3 * 2
    ours = logits_with(model, apply_saved(model, method, tensors, True, info))
    with torch.no_grad():
        peft_logits = theirs(input_ids=TOKENS, attention_mask=torch.ones_like(TOKENS)).logits
        base = load_model(model_bin)(TOKENS)
    torch.testing.assert_close(peft_logits, ours, atol=1e-4, rtol=0)
    assert (ours - base).abs().max() > 0.05


# ---- the planner ----

def test_the_planner_counts_loras_parameters_state_and_kept_inputs():
    from llama.formats.checkpoint import stage_plan
    from llama.model.partition import GIB
    from llama.model.named_shapes import NAMED_SHAPES
    from llama.model.transformer import ModelArgs
    from llama.training.memory import (lora_parameters, lora_saved_bytes_per_token,
                                       stage_estimates)
    args = ModelArgs(**NAMED_SHAPES["7B"])
    assert lora_parameters(args, 32, 8, ("q", "v")) == 32 * 2 * 8 * (4096 + 4096)  # 4.2 M
    lora = lora_settings(r=8, targets="all")
    # fp16: q/k/v's and gate/up's normed inputs, down's 11008-wide input, A x of 7 targets
    assert lora_saved_bytes_per_token(args, 2, 8, lora.targets) == 2 * (2 * 4096 + 11008 + 56)
    plan = stage_plan(args, 2)
    without = stage_estimates(args, plan, 32, 2, 512, 0, 2, "1f1b", 1.0)
    with_lora = stage_estimates(args, plan, 32, 2, 512, 0, 2, "1f1b", 1.0, lora=lora)
    for plain, tuned in zip(without, with_lora):
        n_layers = tuned["layers"][1] - tuned["layers"][0]
        assert tuned["trainable"] == lora_parameters(args, n_layers, 8, lora.targets)
        assert tuned["trainable_state_gib"] == tuned["trainable"] * 20 / GIB
        # offload keeps one layer's saved tensors at a time: the state and one layer's extra
        extra = 2 * 512 * lora_saved_bytes_per_token(args, 2, 8, lora.targets) / GIB
        assert tuned["peak_offload_gib"] - plain["peak_offload_gib"] == pytest.approx(
            tuned["trainable_state_gib"] + extra)


def test_lora_dropout_run_on_two_stages_resumes_bitwise(model_bin, alpaca_small, tmp_path):
    """Dropout draws from the random state of the rank a layer runs on: checkpoint.pt keeps
    every rank's, and each takes its own back."""
    split = tmp_path / "split"
    split_model.main(str(model_bin), 2, out_dir=str(split))
    runs = {}
    for name in ("reference", "stopped"):
        runs[name] = tmp_path / name
        cli = as_cli(lora_args(split, alpaca_small, runs[name], lora_dropout=0.2))
        script = "ft_main.py" if name == "reference" else os.path.join("tests", "workers",
                                                                          "stop_before_step.py")
        results = launch([script, *cli], 2, timeout_s=150, extra_env={"STOP_BEFORE_STEP": "3"})
        if name == "reference":
            check_all_ok(results)
    assert not (runs["stopped"] / "tuning.pt").exists()
    assert torch.load(runs["stopped"] / "checkpoint.pt", weights_only=True)["step"] == 2
    check_all_ok(launch(["ft_main.py", *as_cli(lora_args(split, alpaca_small, runs["stopped"],
                                                         lora_dropout=0.2)), "--resume", "True"],
                        2, timeout_s=150))
    resumed = torch.load(runs["stopped"] / "tuning.pt", weights_only=True)
    for key, tensor in torch.load(runs["reference"] / "tuning.pt", weights_only=True).items():
        assert torch.equal(resumed[key], tensor), key
    assert metrics(runs["stopped"])[-2:] == metrics(runs["reference"])[-2:]


# ---- generation: cache == recomputation, static decode == eager ----

def test_lora_generation_cached_static_and_recomputed_agree(model_bin):
    model = load_model(model_bin)
    tuning = opened_lora(model)
    with torch.no_grad():  # an update large enough to change what is said
        for key, tensor in tuning.trainable.items():
            tensor.mul_(10 if key.endswith("lora_B") else 1)
    stage = Stage(model, DistContext(), tuning=tuning)
    prompts = [[1, 403, 407, 261], [1, 403]]  # unequal lengths
    cached = generate(stage, prompts, 10)
    assert cached != generate(stage, prompts, 10, use_prompt=False)
    static = Stage(model, DistContext(), tuning=stage.tuning, cuda_graph=True)
    for use_prompt in (True, False):  # --cuda_graph's static decode (uncaptured on a CPU)
        assert generate(static, prompts, 10, use_prompt=use_prompt) == \
            generate(stage, prompts, 10, use_prompt=use_prompt)
    for prompt, new in zip(prompts, cached):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(len(new)):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert ids[len(prompt):] == new


def test_a_peft_lora_this_method_cannot_run_is_refused_with_the_merge_advice(model_bin,
                                                                              single_run, tmp_path):
    import shutil
    folder = tmp_path / "peft"
    shutil.copytree(single_run / "peft", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"q_proj": 2}}))
    with pytest.raises(BadInput, match=r"adapter_config\.json: rank_pattern=\{'q_proj': 2\} is not "
                                       r"run here .* merge it into the weights with python -m "
                                       r"llama\.formats\.convert --lora instead"):
        load_tuning(folder, load_model(model_bin).args)
