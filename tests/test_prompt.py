"""The soft prompt and its files: initialisation at the scale of real embeddings; the PEFT export
of a trained prompt imports back exactly (.bin and .safetensors); example_ft.py generates the
same ids from our folder and from its peft/ subfolder, and the same as a full recompute; a prompt
made for another model is refused with an error naming its file.
Run: python3 -m pytest -q tests/test_prompt.py
"""
import dataclasses
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
import torch

import example_ft
import ft_main
from launch import REPO
from llama.formats.checkpoint import load_model
from llama.model.transformer import params_digest
from llama.training.records import ALPACA_PREAMBLE, format_prompt
from llama.parallel.distributed import DistContext
from llama.errors import BadInput
from llama.formats.files import sha256_of
from llama.serving.generation import generate
from llama.parallel.pipeline import Stage
from llama.tuning.peft import export_peft, import_peft
from llama.tuning.prompt import SoftPrompt, init_prompt_weight
from llama.model.tokenizer import Tokenizer
from llama.tuning.files import load_soft_prompt, load_tuning, save_tuning

TEXTS = ["Give three tips for staying healthy.", "Once upon a time"]
HF_BASE_MODEL = "someone/stories260K-hf"  # what --base_model records for transformers + peft


@pytest.fixture(scope="module")
def model(model_bin):
    return load_model(model_bin)


@pytest.fixture(scope="module")
def tokenizer(assets):
    return Tokenizer(str(assets / "stories260K" / "tok512.model"))


@pytest.fixture(scope="module")
def trained(model_bin, assets, tmp_path_factory):
    """The --out folder of a short real ft_main.py run (tuning.pt, tuning.json, peft/)."""
    root = tmp_path_factory.mktemp("trained")
    records = json.loads((assets / "alpaca" / "alpaca_data_1k.json").read_text())[:40]
    data = root / "alpaca_40.json"
    data.write_text(json.dumps(records))
    out = root / "prompt"
    ft_main.main(ckpt_dir=str(model_bin), data=str(data), out=str(out), template="plain",
                 n_virtual_tokens=8, max_seq_len=128, global_batch_size=4, micro_batch_size=2,
                 steps=3, lr=0.1, eval_fraction=0, device="cpu", dtype="float32",
                 base_model=HF_BASE_MODEL)
    return out


# ---- initialisation ----

def test_inits_are_at_the_scale_of_real_embeddings(model, tokenizer):
    embeddings = model.tok_embeddings.weight
    text = init_prompt_weight("text", 20, embeddings, tokenizer, "Max was a big dog.")
    ids = tokenizer.encode("Max was a big dog.", bos=False, eos=False)
    expected_ids = (ids * 20)[:20]  # the text's tokens, repeated to fill
    assert torch.equal(text, embeddings[torch.tensor(expected_ids)])
    vocab = init_prompt_weight("vocab", 16, embeddings, seed=3)
    assert all((embeddings == row).all(dim=1).any() for row in vocab)
    random = init_prompt_weight("random", 64, embeddings, seed=3)
    ratio = float(random.std() / embeddings.std())
    assert 0.8 < ratio < 1.2 and float(embeddings.std()) < 0.5  # N(0, 1) would be far too large
    for weight in (text, vocab, random):
        assert weight.dtype == torch.float32
    assert torch.equal(random, init_prompt_weight("random", 64, embeddings, seed=3))
    with pytest.raises(BadInput, match=r"--init 'zeros' must be one of text, vocab, random"):
        init_prompt_weight("zeros", 4, embeddings)


def test_generation_with_a_prompt_equals_recomputing_the_whole_sequence(model, tokenizer,
                                                                        trained):
    """Prefill carries the virtual tokens at positions 0..n-1 and the cache the rest: greedy ids
    equal the argmax of a full forward over [prompt ‖ text] at every step, as in training."""
    weight, _ = load_soft_prompt(trained, model.args)
    soft_prompt = SoftPrompt(weight)
    stage = Stage(model, DistContext(), soft_prompt, weight.shape[0])
    ids = tokenizer.encode("Once upon a time", bos=True, eos=False)
    generated = generate(stage, [ids], 10)[0]
    tokens = list(ids)
    with torch.no_grad():
        for _ in range(10):
            h = soft_prompt.prepend(model.embed(torch.tensor([tokens])))
            tokens.append(int(model.logits(model.run_layers(h)[:, -1]).argmax()))
    assert generated == tokens[len(ids):]


# ---- PEFT export and import ----

def test_peft_export_imports_back_exactly(model, trained, tmp_path):
    ours, info = load_soft_prompt(trained, model.args)
    saved = torch.load(trained / "tuning.pt", weights_only=True)["prompt"]
    assert torch.equal(ours, saved) and saved.dtype == torch.float32
    assert info["n_virtual_tokens"] == 8 and info["dim"] == 64 and info["template"] == "plain"
    assert info["params_digest"] == params_digest(model.args) and info["steps"] == 3

    method, tensors, peft_info = import_peft(trained / "peft", model.args)
    weight = tensors["prompt"]
    assert method == "prompt" and list(tensors) == ["prompt"] and torch.equal(weight, saved) and weight.shape == (8, 64)
    assert weight.dtype == torch.float32
    config = json.loads((trained / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["task_type"] == "CAUSAL_LM"
    assert (config["num_virtual_tokens"], config["token_dim"]) == (8, 64)
    assert (config["num_layers"], config["num_attention_heads"]) == (5, 8)
    assert config["num_transformer_submodules"] == 1 and config["inference_mode"] is True
    assert config["prompt_tuning_init"] == "TEXT"
    assert config["prompt_tuning_init_text"] == ALPACA_PREAMBLE
    assert peft_info == {"n_virtual_tokens": 8, "init": "TEXT", "peft": True, "method": "prompt",
                         "params_digest": params_digest(model.args), "template": "plain"}
    state = torch.load(trained / "peft" / "adapter_model.bin", weights_only=True)
    assert list(state) == ["prompt_embeddings"]
    assert torch.equal(load_soft_prompt(trained / "peft", model.args)[0], saved)

    # export(import(export(w))) writes the same files again
    again = tmp_path / "again"
    metadata = {"init": "text", "init_text": ALPACA_PREAMBLE, "template": "plain",
                "tokenizer": config["tokenizer_name_or_path"],
                "ckpt_dir": config["base_model_name_or_path"]}
    export_peft(again, "prompt", {"prompt": weight}, model.args, metadata)
    assert json.loads((again / "adapter_config.json").read_text()) == config
    assert torch.equal(import_peft(again, model.args)[1]["prompt"], saved)


def test_peft_safetensors_layout_imports_the_same_tensor(model, trained, tmp_path):
    """What current PEFT versions write: adapter_model.safetensors (written by hand here)."""
    weight = torch.load(trained / "tuning.pt", weights_only=True)["prompt"]
    folder = tmp_path / "peft_st"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((trained / "peft" / "adapter_config.json")
                                                 .read_bytes())
    data = weight.numpy().tobytes()
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "prompt_embeddings": {"dtype": "F32", "shape": list(weight.shape),
                                               "data_offsets": [0, len(data)]}}).encode()
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header
                                                       + data)
    assert torch.equal(load_soft_prompt(folder, model.args)[0], weight)


def test_our_peft_export_refuses_another_model_of_the_same_width(model, trained, tmp_path):
    """PEFT's config only knows the width; our export also carries the model's digest."""
    folder = tmp_path / "peft"
    shutil.copytree(trained / "peft", folder)
    extra = json.loads((folder / "llama_prompt.json").read_text())
    (folder / "llama_prompt.json").write_text(json.dumps({**extra, "params_digest": "0" * 16}))
    with pytest.raises(BadInput, match="another model"):
        load_soft_prompt(folder, model.args)


def test_example_ft_generates_the_same_from_our_folder_and_the_peft_folder(
        model_bin, model, tokenizer, trained, capsys):
    capsys.readouterr()
    example_ft.main(str(model_bin), str(trained), prompts=TEXTS, max_gen_len=12, compare=True)
    ours = capsys.readouterr().out
    # The template travels with our PEFT export (llama_prompt.json beside adapter_config.json).
    example_ft.main(str(model_bin), str(trained / "peft"), prompts=TEXTS, max_gen_len=12,
                    compare=True)
    peft = capsys.readouterr().out
    assert ours == peft and ours.count("[with prompt]") == 2 and ours.count("[base model]") == 2

    ids = [tokenizer.encode(format_prompt({"instruction": t, "input": ""}, "plain"), bos=True,
                            eos=False) for t in TEXTS]
    generated = []
    for folder in (trained, trained / "peft"):
        weight, _ = load_soft_prompt(folder, model.args)
        stage = Stage(model, DistContext(), SoftPrompt(weight), weight.shape[0])
        generated.append(generate(stage, ids, 12, stop_ids=(1, 2)))
    assert generated[0] == generated[1]
    for text, new_ids in zip(TEXTS, generated[0]):
        assert f"### {text}\n[with prompt] {tokenizer.decode(new_ids)}" in ours


# ---- a prompt for another model is refused ----

def test_prompt_of_another_width_is_refused_naming_the_file(model, model_bin, tmp_path):
    narrow = torch.zeros(4, 32)
    save_tuning(tmp_path / "ours", "prompt", {"prompt": narrow}, dataclasses.replace(model.args, dim=32), {})
    with pytest.raises(BadInput, match=r"ours/tuning\.pt: prompt has shape \(4, 32\), but this "
                                       r"model \(dim=64, n_kv_heads=4\) needs \(4, 64\): it was "
                                       r"trained for another model"):
        load_soft_prompt(tmp_path / "ours", model.args)
    with pytest.raises(BadInput, match=r"ours/tuning\.pt: prompt has shape \(4, 32\)"):
        example_ft.main(str(model_bin), str(tmp_path / "ours"), max_gen_len=2)
    export_peft(tmp_path / "peft", "prompt", {"prompt": narrow}, model.args, {})
    with pytest.raises(BadInput, match=r"peft/adapter_config\.json: token_dim=32 but the model "
                                       r"has dim=64"):
        load_soft_prompt(tmp_path / "peft", model.args)


def test_prompt_of_another_model_with_the_same_width_is_refused_naming_the_file(
        model, model_bin, trained, tmp_path):
    other_model = dataclasses.replace(model.args, n_layers=4)
    weight = torch.load(trained / "tuning.pt", weights_only=True)["prompt"]
    save_tuning(tmp_path / "other", "prompt", {"prompt": weight}, other_model, {"template": "plain"})
    message = (rf"other/tuning\.pt was trained for another model \(params digest "
               rf"{params_digest(other_model)}, this model's is {params_digest(model.args)}\): "
               r"use the matching --ckpt_dir")
    with pytest.raises(BadInput, match=message):
        load_soft_prompt(tmp_path / "other", model.args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    run = subprocess.run([sys.executable, "example_ft.py", "--ckpt_dir", str(model_bin),
                          "--prompt", str(tmp_path / "other"), "--max_gen_len", "2"],
                         cwd=REPO, env=env, text=True, capture_output=True, timeout=120)
    assert run.returncode == 2 and run.stdout == "" and "Traceback" not in run.stderr
    assert run.stderr.startswith("error: ") and "other/tuning.pt was trained for another model" \
        in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_folder_without_a_prompt_is_refused(model, tmp_path):
    with pytest.raises(BadInput, match=r"empty holds no tuning\.pt, prompt\.pt or "
                                       r"adapter_config\.json"):
        load_soft_prompt(tmp_path / "empty", model.args)


@pytest.mark.parametrize("stem", ["tuning", "prompt"])
def test_pt_without_its_json_says_what_to_pass(model, trained, tmp_path, stem):
    folder = tmp_path / "half"
    folder.mkdir()
    shutil.copy(trained / "tuning.pt", folder / f"{stem}.pt")
    with pytest.raises(BadInput, match=rf"half/{stem}\.json is missing beside {stem}\.pt: .*pass "
                                       r"the folder ft_main\.py --out wrote .* or its peft/ "
                                       r"export"):
        load_soft_prompt(folder, model.args)


# ---- the prompt.pt + prompt.json folders of earlier versions still load ----

def old_prompt_folder(folder, weight, args, **extra):
    """What ft_main.py wrote for a prompt before tuning.pt: a bare tensor and its description."""
    folder.mkdir()
    torch.save(weight, folder / "prompt.pt")
    info = {"n_virtual_tokens": weight.shape[0], "dim": weight.shape[1],
            "params_digest": params_digest(args), "prompt_sha256": sha256_of(folder / "prompt.pt"),
            "template": "plain", "init": "random", "steps": 3, **extra}
    (folder / "prompt.json").write_text(json.dumps(info))
    return folder


def test_an_old_prompt_folder_loads_with_the_same_tensor(model, model_bin, trained, tmp_path):
    weight = torch.load(trained / "tuning.pt", weights_only=True)["prompt"]
    folder = old_prompt_folder(tmp_path / "old", weight, model.args)
    method, tensors, info = load_tuning(folder, model.args)
    assert method == "prompt" and list(tensors) == ["prompt"]
    assert torch.equal(tensors["prompt"], weight) and info["template"] == "plain"
    assert example_ft.main(str(model_bin), str(folder), max_gen_len=2) is None
    # and is checked like ours: another model, a damaged pair
    other = old_prompt_folder(tmp_path / "other", weight, model.args, params_digest="0" * 16)
    with pytest.raises(BadInput, match=r"other/prompt\.pt was trained for another model"):
        load_tuning(other, model.args)
    (folder / "prompt.pt").write_bytes((folder / "prompt.pt").read_bytes()[:-8])
    with pytest.raises(BadInput, match=r"old/prompt\.json describes another prompt\.pt"):
        load_tuning(folder, model.args)


def test_a_non_prompt_tuning_is_refused_where_only_a_prompt_can_be_used(model, tmp_path):
    tensors = {f"layers.{i}.prefix": torch.zeros(2, 3, 4, 8) for i in range(5)}
    save_tuning(tmp_path / "prefix", "prefix", tensors, model.args, {})
    with pytest.raises(BadInput, match=r"prefix holds a prefix tuning, not a soft prompt"):
        load_soft_prompt(tmp_path / "prefix", model.args)


# ---- a PEFT folder made elsewhere (no llama_prompt.json) is checked against the model ----

@pytest.mark.parametrize("field, value, message", [
    ("num_layers", 2, r"num_layers=2 but the model has n_layers=5"),
    ("num_attention_heads", 4, r"num_attention_heads=4 but the model has n_heads=8"),
    ("token_dim", 32, r"token_dim=32 but the model has dim=64"),
    ("num_virtual_tokens", 9, r"holds 8 virtual tokens but its description says 9"),
])
def test_peft_folder_of_another_model_is_refused_naming_both_values(model, trained, tmp_path,
                                                                   field, value, message):
    folder = tmp_path / "peft"
    shutil.copytree(trained / "peft", folder)
    (folder / "llama_prompt.json").unlink()  # as PEFT itself writes it
    assert torch.equal(load_soft_prompt(folder, model.args)[0],
                       torch.load(trained / "tuning.pt", weights_only=True)["prompt"])
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(BadInput, match=message):
        load_soft_prompt(folder, model.args)


def test_peft_export_records_the_base_model_transformers_can_load(trained, model, tmp_path):
    """adapter_config.json's base_model_name_or_path is what AutoPeftModelForCausalLM loads:
    --base_model names it; without it the checkpoint folder is recorded."""
    config = json.loads((trained / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HF_BASE_MODEL
    assert json.loads((trained / "tuning.json").read_text())["base_model"] == HF_BASE_MODEL
    export_peft(tmp_path / "plain", "prompt", {"prompt": torch.zeros(2, 64)}, model.args, {"ckpt_dir": "ckpts/pp2"})
    config = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "ckpts/pp2"


def test_init_text_without_tokens_is_refused_before_out_is_created(model, tokenizer, model_bin,
                                                                   tmp_path):
    assert tokenizer.encode(" ", bos=False, eos=False) == []
    with pytest.raises(BadInput, match=r"--init_text ' ' has no tokens"):
        init_prompt_weight("text", 4, model.tok_embeddings.weight, tokenizer, " ")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi."}] * 4))
    out = tmp_path / "out"
    with pytest.raises(BadInput, match=r"--init_text ' ' has no tokens .*--init vocab"):
        ft_main.main(ckpt_dir=str(model_bin), data=str(data), out=str(out), init_text=" ",
                     template="plain", n_virtual_tokens=4, max_seq_len=128, global_batch_size=2,
                     micro_batch_size=2, steps=1, eval_fraction=0, device="cpu")
    assert not out.exists()
