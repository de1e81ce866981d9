"""The speed paths give what the plain paths give: static-cache (CUDA-graph) decode the same ids,
fused projections the same logits and state dict, --compile the same losses, selective
recomputation and kept loss logits the same gradient. All on the CPU with stories260K or the tiny shape.
Run: python3 -m pytest -q tests/test_speed_paths.py
"""
import functools
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy

from llama.formats.checkpoint import load_model
from llama.prepare.compiling import apply_compile, compiler_missing
from llama.training.data import MicroBatch
from llama.parallel.distributed import DistContext
from llama.errors import BadInput
from llama.model import cpu_linear
from llama.model.fused import apply_fused_projections
from llama.model.quant import use_dynamic_int8
from llama.serving.generation import generate
from llama.prepare import compiling, offload
from llama.prepare.offload import apply_recompute
from llama.parallel import loss
from llama.parallel.loss import loss_sum
from llama.parallel.pipeline import Stage
from llama.training import memory
from llama.tuning.prompt import SoftPrompt
from llama.prepare.stage import compile_blocks
from llama.model.tokenizer import Tokenizer

MAX_GEN_LEN = 16
SETTINGS = dict(top_p=0.9, seed=0, stop_ids=(1, 2))


@pytest.fixture(scope="module")
def stories(assets):
    return assets / "stories260K"


@pytest.fixture(scope="module")
def model(stories):
    return load_model(stories / "stories260K.bin")


@pytest.fixture(scope="module")
def prompts(stories):
    tokenizer = Tokenizer(str(stories / "tok512.model"))
    texts = ["Once upon a time", "Tom and Lily went to the park. They saw", "The cat"]
    return [tokenizer.encode(t, bos=True, eos=False) for t in texts] + [[1]]


@pytest.fixture(scope="module")
def soft_prompt(model):
    weight = model.tok_embeddings.weight[torch.arange(20, 26)].clone()
    return SoftPrompt(weight)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("with_soft_prompt", [False, True])
def test_static_decode_generates_the_ids_of_the_eager_path(model, prompts, soft_prompt,
                                                           temperature, with_soft_prompt):
    extra = (soft_prompt, soft_prompt.n_virtual_tokens) if with_soft_prompt else ()
    eager = Stage(model, DistContext(), *extra)
    static = Stage(model, DistContext(), *extra, cuda_graph=True)
    expected = generate(eager, prompts, MAX_GEN_LEN, temperature, **SETTINGS)
    assert generate(static, prompts, MAX_GEN_LEN, temperature, **SETTINGS) == expected
    # A second run, and another batch size, still agree (tests/test_engine.py checks which
    # steps went through the captured path).
    assert generate(static, prompts, MAX_GEN_LEN, temperature, **SETTINGS) == expected
    assert generate(static, prompts[:1], MAX_GEN_LEN, temperature, **SETTINGS) == \
        generate(eager, prompts[:1], MAX_GEN_LEN, temperature, **SETTINGS)


# ---- fused projections ----

def test_fused_projections_give_the_same_logits_and_the_same_state_dict(stories, prompts):
    plain = load_model(stories / "stories260K.bin")
    fused = apply_fused_projections(load_model(stories / "stories260K.bin"))
    assert fused.layers["0"].attention.wq is None and fused.layers["0"].feed_forward.w13 is not None
    tokens = torch.tensor([prompts[1]])
    torch.testing.assert_close(fused(tokens), plain(tokens), rtol=1e-5, atol=1e-5)
    # Files keep Meta's names: the same keys and tensors come out, and go back in strictly.
    saved, expected = fused.state_dict(), plain.state_dict()
    assert list(saved) == list(expected)
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    again = apply_fused_projections(load_model(stories / "stories260K.bin"))
    again.load_state_dict({k: torch.zeros_like(v) for k, v in expected.items()}, strict=True)
    assert not again.layers["0"].attention.wqkv.weight.any()
    again.load_state_dict(expected, strict=True)
    torch.testing.assert_close(again(tokens), plain(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_fused_quantized_projections_give_the_same_logits_and_state_dict(stories, prompts,
                                                                         scheme):
    """Quantized q/k/v and w1/w3 join too, on the exact path and on generation's int8 path
    (each output row is computed as its part computed it), and save and load as before."""
    plain = load_model(stories / "stories260K.bin", quantize=scheme)
    fused = apply_fused_projections(load_model(stories / "stories260K.bin", quantize=scheme))
    wqkv = fused.layers["0"].attention.wqkv
    assert wqkv.scheme == scheme and wqkv.out_features == 64 + 2 * 32  # 4 of 8 kv heads
    tokens = torch.tensor([prompts[1]])
    with torch.no_grad():
        exact = plain(tokens)
        torch.testing.assert_close(fused(tokens), exact, rtol=1e-5, atol=1e-5)
        use_dynamic_int8(plain), use_dynamic_int8(fused)
        assert fused.layers["0"].feed_forward.w13.use_dynamic_int8
        torch.testing.assert_close(fused(tokens), plain(tokens), rtol=1e-5, atol=1e-5)
    saved, expected = fused.state_dict(), plain.state_dict()
    assert list(saved) == list(expected)
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    again = apply_fused_projections(load_model(stories / "stories260K.bin", quantize=scheme))
    again.load_state_dict(expected, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), exact, rtol=1e-5, atol=1e-5)


# ---- the CPU's linears through oneDNN ----

def test_onednn_linears_give_the_same_logits_gradient_and_state_dict(stories, plain_gradient,
                                                                     prompts):
    if not cpu_linear.onednn_available():
        pytest.skip("this torch has no oneDNN linear")
    plain = load_model(stories / "stories260K.bin")
    model = load_model(stories / "stories260K.bin")
    # every linear, small as stories260K's are (the default leaves layers under 512 x 512 alone)
    assert cpu_linear.apply_cpu_linears(model, min_weights=0) == 7 * len(model.layers) + 1
    tokens = torch.tensor([prompts[1]])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), plain(tokens), rtol=1e-5, atol=1e-5)
    saved, expected = model.state_dict(), plain.state_dict()
    assert list(saved) == list(expected) and all(torch.equal(saved[k], expected[k])
                                                 for k in expected)
    def onednn(stage_model):
        cpu_linear.apply_cpu_linears(stage_model, min_weights=0)
        return stage_model
    loss, grad = prompt_gradient(stories, onednn)
    assert loss == pytest.approx(plain_gradient[0], rel=1e-5)
    torch.testing.assert_close(grad, plain_gradient[1], rtol=1e-5, atol=1e-6)


def test_packed_linears_for_generation_and_what_stays_as_it_was(stories, prompts, monkeypatch):
    if not cpu_linear.onednn_available():
        pytest.skip("this torch has no oneDNN linear")
    plain = load_model(stories / "stories260K.bin")
    model = apply_fused_projections(load_model(stories / "stories260K.bin"))
    trainable = model.layers["0"].attention.wo.requires_grad_(True)
    model.output.weight = model.tok_embeddings.weight  # the same values, now one tensor
    assert cpu_linear.apply_cpu_linears(model, packed=True) == 0  # stories260K's are too small
    cpu_linear.apply_cpu_linears(model, packed=True, min_weights=0)
    assert type(trainable) is torch.nn.Linear  # a trained linear keeps autograd's own product
    wqkv = model.layers["0"].attention.wqkv
    assert wqkv.weight is None and wqkv.packed_weight.is_mkldnn
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr(), \
        "the head that is the embedding table too stays plain"
    tokens = torch.tensor([prompts[1]])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), plain(tokens), rtol=1e-5, atol=1e-5)
    # A refusal of the private op sends that layer back to F.linear, for good.
    head = model.output
    monkeypatch.setattr(cpu_linear, "onednn_linear", lambda *a: (_ for _ in ()).throw(
        RuntimeError("no")))
    with torch.no_grad():
        torch.testing.assert_close(head(torch.ones(1, 64)), plain.output(torch.ones(1, 64)))
    assert head.use_onednn is False


# ---- training: --compile and selective recomputation ----

def prompt_gradient(stories, transform, loss_fn=loss_sum):
    """(loss, prompt gradient) of one 1F1B step of stories260K with a 4-token soft prompt, after
    transform(model), trained on loss_fn."""
    model = transform(load_model(stories / "stories260K.bin"))
    weight = load_model(stories / "stories260K.bin").tok_embeddings.weight[10:14]
    prompt = SoftPrompt(weight)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        tokens = torch.randint(3, 512, (2, 12), generator=generator)
        targets = torch.full_like(tokens, -100)
        targets[:, 4:-1] = tokens[:, 5:]
        batches.append(MicroBatch(tokens, targets, int((targets != -100).sum())))
    loss, _ = Stage(model, DistContext(), prompt, 4, loss_fn=loss_fn).train_step(batches, "1f1b")
    return loss, prompt.weight.grad


@pytest.fixture(scope="module")
def plain_gradient(stories):
    return prompt_gradient(stories, lambda model: model)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_modes_give_the_same_gradient(stories, plain_gradient, mode):
    loss, grad = prompt_gradient(stories, lambda model: apply_recompute(model, mode=mode))
    assert loss == pytest.approx(plain_gradient[0], rel=1e-6)
    torch.testing.assert_close(grad, plain_gradient[1], rtol=1e-5, atol=1e-7)


def test_selective_recompute_keeps_every_matrix_product(stories, monkeypatch):
    """The forward pass marks every GEMM's output (7 per block) to be kept, and the elementwise
    work to be redone in the backward pass (torch answers the kept ones from storage there)."""
    decisions, policy = [], offload._keep_matrix_products

    def recording_policy(ctx, op, *args, **kwargs):
        decision = policy(ctx, op, *args, **kwargs)
        if not ctx.is_recompute:
            decisions.append((str(op), decision))
        return decision

    model = apply_recompute(load_model(stories / "stories260K.bin"), mode="selective")
    h = torch.randn(2, 12, model.args.dim, requires_grad=True)
    monkeypatch.setattr(offload, "_keep_matrix_products", recording_policy)
    model.run_layers(h).sum().backward()
    kept = [op for op, d in decisions if d == CheckpointPolicy.MUST_SAVE]
    redone = {op for op, d in decisions if d == CheckpointPolicy.PREFER_RECOMPUTE}
    assert kept.count("aten.mm.default") == 7 * len(model.layers)
    assert "aten.mm.default" not in redone and {"aten.rsqrt.default", "aten.silu.default"} <= redone


def compile_backends():
    """aot_eager always (the graph capture, quick); inductor (kernels built with the system's
    C++ compiler: minutes on a busy 2-core CPU) when LLAMA_TEST_INDUCTOR=1."""
    inductor_skip = compiler_missing("inductor") or (
        None if os.environ.get("LLAMA_TEST_INDUCTOR") == "1" else
        "inductor builds C++ kernels for minutes on a small CPU: set LLAMA_TEST_INDUCTOR=1")
    return ["aot_eager", pytest.param("inductor", marks=pytest.mark.skipif(
        bool(inductor_skip), reason=inductor_skip or ""))]


@pytest.mark.parametrize("backend", compile_backends())
def test_compiled_blocks_give_the_same_losses_and_gradient(stories, plain_gradient, backend):
    missing = compiler_missing(backend)
    if missing:
        pytest.skip(missing)
    loss, grad = prompt_gradient(stories, lambda model: apply_compile(model, backend))
    assert loss == pytest.approx(plain_gradient[0], rel=1e-5)
    torch.testing.assert_close(grad, plain_gradient[1], rtol=1e-4, atol=1e-6)


def test_compile_without_a_compiler_is_refused_in_one_line(model, monkeypatch):
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    with pytest.raises(BadInput, match=r"^--compile: torch\.compile's inductor backend needs a "
                                       r"C/C\+\+ compiler \(cc, gcc or clang\) on PATH; install "
                                       r"one or leave out --compile$"):
        compile_blocks(model, True)
    assert compile_blocks(model, False) is model  # off: untouched


# ---- the loss head: logits kept for backward, or recomputed ----

def reference_loss(model, h, targets):
    """Plain autograd through F.cross_entropy over every position's logits at once."""
    logits = model.logits(h).float().flatten(0, 1)
    return F.cross_entropy(logits, targets.flatten().to(h.device), ignore_index=-100,
                           reduction="sum")


@pytest.mark.parametrize("keep_logits", [True, False])
def test_kept_and_recomputed_logits_give_the_same_loss_and_gradient(stories, monkeypatch,
                                                                    keep_logits):
    """In chunks of 5 target positions (of 28), each choice gives F.cross_entropy's loss and
    prompt gradient, and the two choices each other's, to 1e-5."""
    expected_loss, expected = prompt_gradient(stories, lambda model: model, reference_loss)
    monkeypatch.setattr(loss, "LOSS_CHUNK_TOKENS", 5)
    got_loss, got = prompt_gradient(stories, lambda model: model,
                                    functools.partial(loss_sum, keep_logits=keep_logits))
    other_loss, other = prompt_gradient(stories, lambda model: model,
                                        functools.partial(loss_sum, keep_logits=not keep_logits))
    for value, gradient in ((got_loss, got), (other_loss, other)):
        assert value == pytest.approx(expected_loss, rel=1e-5)
        assert float((gradient - expected).norm() / expected.norm()) <= 1e-5
    assert float((got - other).norm() / other.norm()) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cross_entropy_gradient_written_into_the_logits_is_autograds(dtype):
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(7, 50, generator=generator)).to(dtype)
    targets = torch.randint(0, 50, (7,), generator=generator)
    expected_input = logits.clone().requires_grad_(True)
    expected = F.cross_entropy(expected_input.float(), targets, reduction="sum")
    (2 * expected).backward()
    got_input = logits.clone().requires_grad_(True)
    mine = loss._CrossEntropySum.apply(got_input * 1, targets)  # a non-leaf, as the head's output
    (2 * mine).backward()
    assert float(mine.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got_input.grad, expected_input.grad, rtol=tolerance, atol=tolerance)


def test_kept_logits_are_what_the_forward_saves_and_recompute_saves_none(model):
    """Saved for backward: every target's logits with keep_logits (28 x 512 float32), the
    hidden states they come from without (the chunks' inputs, 28 x 64)."""
    h = torch.randn(2, 15, model.args.dim, requires_grad=True)
    targets = torch.randint(0, 512, (2, 15))
    targets[:, :1] = -100
    saved, weights = {}, {p.data_ptr() for p in model.parameters()}

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            saved[tensor.data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor
    for keep_logits in (True, False):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss_sum(model, h, targets, keep_logits=keep_logits)
        largest = max(saved.values())
        assert largest == (28 * 512 * 4 if keep_logits else 28 * 64 * 4)


def test_auto_keeps_the_logits_only_when_the_estimate_fits_the_free_memory(model, monkeypatch):
    def choose(requested, free):
        monkeypatch.setattr(memory, "free_memory_bytes", lambda device: free)
        return memory.choose_loss_logits(requested, model, torch.device("cpu"), 8, 4, 255, 0,
                                         "1f1b", "plain")
    keep, line = choose("auto", 2**40)
    assert keep and line.startswith("loss: the head's logits are kept for backward (auto: ")
    keep, line = choose("auto", 2**20)
    assert not keep and line.startswith("loss: the head's logits are recomputed in backward, "
                                        "1024 target positions at a time (auto: ")
    assert "over 80% of the 0.00 GiB free" in line
    assert not choose("auto", None)[0] and choose("keep", 2**20)[0]
    assert not choose("recompute", 2**40)[0]
    with pytest.raises(BadInput, match=r"^--loss_logits 'fast' must be one of auto, keep, "):
        choose("fast", 2**40)
