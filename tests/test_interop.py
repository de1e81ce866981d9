"""Interop with the real transformers and peft (skipped when either is not installed): the HF
export, soft prompts, prefixes and adaption prompts both ways, and LoRA merging all give the
numbers those libraries give. The product never imports them; only this file does.

PEFT's own cached generate() is not the reference for prompt and prefix tuning: with
transformers 5 it drops or garbles the virtual tokens after the first steps (peft issues #1391,
#2123). Greedy ids are compared against recomputing PEFT's forward over the whole text instead.
"""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import ft_main  # noqa: E402
from llama.formats import convert  # noqa: E402
from llama.formats.checkpoint import load_model  # noqa: E402
from llama.parallel.distributed import DistContext  # noqa: E402
from llama.serving.generation import generate  # noqa: E402
from llama.tuning.files import load_tuning  # noqa: E402
from llama.tuning.methods import apply_saved  # noqa: E402
from llama.parallel.pipeline import Stage  # noqa: E402

PROMPT = [1, 403, 407, 261]
N_NEW = 12
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def hf_dir(model_bin, tmp_path_factory):
    folder = tmp_path_factory.mktemp("interop") / "hf"
    convert.main(str(model_bin), str(folder), to="hf")
    return folder


def hf_model(hf_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


@torch.no_grad()
def tuned_logits(stage, tokens):
    """Our logits on the text positions (B, T, vocab), the method on."""
    h = stage.run_layers(stage.hidden_in(tokens, True), True)
    return stage.model.logits(h[:, stage.hidden_virtual(True):])


@torch.no_grad()
def peft_logits(model, tokens):
    """The logits of transformers/peft's forward on the text positions (prompt tuning returns
    the virtual positions' too, in front)."""
    logits = model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits
    return logits[:, -tokens.shape[1]:]


def greedy_by_recomputing(model, prompt, n_new: int):
    ids = list(prompt)
    for _ in range(n_new):
        ids.append(int(peft_logits(model, torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def assert_same_as_peft(stage, peft_model):
    """Same greedy ids (ours cached, PEFT's by recomputation), same logits over the whole text,
    and the method really changes the model (else the comparison proves nothing)."""
    ours = generate(stage, [PROMPT], N_NEW)[0]
    assert ours == greedy_by_recomputing(peft_model, PROMPT, N_NEW)
    tokens = torch.tensor([PROMPT + ours])
    logits = tuned_logits(stage, tokens)
    torch.testing.assert_close(logits, peft_logits(peft_model, tokens), atol=1e-4, rtol=0)
    with stage.tuning.off(), torch.no_grad():
        assert (logits - stage.model(tokens)).abs().max() > 0.1


def test_hf_export_gives_transformers_our_logits_and_greedy_ids(model_bin, hf_dir):
    model, theirs = load_model(model_bin), hf_model(hf_dir)
    tokens = torch.tensor([PROMPT])
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, model(tokens), atol=1e-4, rtol=0)
    ours = generate(Stage(model, DistContext()), [PROMPT], 30)[0]
    generated = theirs.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=30,
                                do_sample=False)
    assert generated[0, len(PROMPT):].tolist() == ours


@pytest.mark.parametrize("method", ["prompt", "prefix", "adapter"])
def test_tuning_trained_here_runs_in_peft_as_here(model_bin, hf_dir, tmp_path, method):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in (
        "Once upon a time there was a cat.", "The dog ran to the park and played.",
        "Lily had a red ball.", "Tom liked to eat cake.")))
    out = tmp_path / "run"
    # lr 1: two steps move an adapter's zero-initialised gates far enough to matter
    ft_main.main(ckpt_dir=str(model_bin), data=str(data), out=str(out), method=method,
                 template="none", n_virtual_tokens=4, adapter_layers=2, steps=2,
                 global_batch_size=2, micro_batch_size=1, eval_fraction=0, max_seq_len=64,
                 lr=1.0, device="cpu", dtype="float32", base_model=str(hf_dir))
    # base_model_name_or_path names the HF folder, so PEFT finds the model by itself
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(out / "peft", dtype=torch.float32).eval()
    model = load_model(model_bin)
    loaded, tensors, _ = load_tuning(out, model.args)
    assert loaded == method
    assert_same_as_peft(Stage(model, DistContext(), tuning=apply_saved(model, method, tensors, True)),
                        theirs)


PEFT_CONFIGS = {
    "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    # save_pretrained stores the projected prefix, so this too reads as a plain prefix
    "prefix-projection": lambda: peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=True,
        encoder_hidden_size=16),
    "adapter": lambda: peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4,
                                                 adapter_layers=2)}


@pytest.mark.parametrize("kind", list(PEFT_CONFIGS))
def test_adapter_made_by_peft_runs_here_as_in_peft(model_bin, hf_dir, tmp_path, kind):
    method = kind.split("-")[0]
    theirs = peft.get_peft_model(hf_model(hf_dir), PEFT_CONFIGS[kind]())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # PEFT starts gates at zero and prompts small: make them count
        for _, parameter in theirs.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    theirs.eval().save_pretrained(tmp_path / "peft")
    model = load_model(model_bin)
    loaded, tensors, _ = load_tuning(tmp_path / "peft", model.args)
    assert loaded == method
    assert_same_as_peft(Stage(model, DistContext(), tuning=apply_saved(model, method, tensors, True)),
                        theirs)


@pytest.mark.parametrize("targets", [LINEARS, LINEARS + ["embed_tokens", "lm_head"]],
                         ids=["linears", "with-embeddings"])
def test_lora_merged_here_equals_peft_merge_and_unload(model_bin, hf_dir, tmp_path, targets):
    torch.manual_seed(0)  # init_lora_weights=False: B is random too, so every update counts
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                             rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3})
    theirs = peft.get_peft_model(hf_model(hf_dir), config).eval()
    theirs.save_pretrained(tmp_path / "lora")
    merged = theirs.merge_and_unload().eval()
    convert.main(str(model_bin), str(tmp_path / "merged"), lora=str(tmp_path / "lora"))
    ours, base = load_model(tmp_path / "merged"), load_model(model_bin)
    tokens = torch.tensor([PROMPT + [378, 432, 383, 286]])
    with torch.no_grad():
        logits = ours(tokens)
        torch.testing.assert_close(logits, merged(tokens).logits, atol=1e-4, rtol=0)
        assert (logits - base(tokens)).abs().max() > 0.1
