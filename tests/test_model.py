"""The model against golden outputs of the real stories260K checkpoint (reference_outputs.json):
greedy ids, logits, cross-entropy, tokenizations; KV cache == recomputation; GQA; rotary.
Run: python3 -m pytest -q tests/test_model.py
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llama.model import transformer as model_module
from llama.formats.checkpoint import load_model, open_source
from llama.parallel.distributed import DistContext
from llama.serving.generation import generate
from llama.parallel.pipeline import Stage
from llama.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def stories(assets):
    return assets / "stories260K"


@pytest.fixture(scope="module")
def reference(stories):
    return json.loads((stories / "reference_outputs.json").read_text())


@pytest.fixture(scope="module")
def model(stories):
    return load_model(stories / "stories260K.bin")


@pytest.fixture(scope="module")
def tokenizer(stories):
    return Tokenizer(str(stories / "tok512.model"))


def test_loader_reads_the_header_and_ties_the_classifier(model):
    args = model.args
    assert (args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads,
            args.vocab_size, args.max_seq_len) == (64, 172, 5, 8, 4, 512, 512)
    assert torch.equal(model.output.weight, model.tok_embeddings.weight)
    unique = sum(p.numel() for name, p in model.named_parameters() if name != "output.weight")
    assert unique == 260_032  # the README's count, the tied classifier counted once


@pytest.mark.parametrize("case", ["greedy_from_bos", "greedy_from_prompt"])
def test_cached_generation_reproduces_reference_ids(model, reference, case):
    expected = reference[case]
    prompt = expected["prompt_ids"]
    # stop_ids=(): the reference runs its full length even past a BOS.
    new = generate(Stage(model, DistContext()), [prompt], expected["max_new_tokens"], stop_ids=())
    assert prompt + new[0] == expected["ids"]


def test_plain_argmax_loop_without_cache_reproduces_reference_ids(model, reference):
    expected = reference["greedy_from_prompt"]
    ids = list(expected["prompt_ids"])
    with torch.no_grad():
        for _ in range(expected["max_new_tokens"]):
            logits = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    assert ids == expected["ids"]


def test_reference_text_round_trips_through_the_tokenizer(reference, tokenizer):
    expected = reference["greedy_from_prompt"]
    assert tokenizer.encode(expected["prompt"], bos=True, eos=False) == expected["prompt_ids"]
    assert tokenizer.decode(expected["ids"]) == expected["text"]


def test_logits_match_reference(model, reference):
    fixture = reference["logits_fixture"]
    with torch.no_grad():
        logits = model(torch.tensor([fixture["input_ids"]]))[0]
    expected_last = torch.tensor(fixture["last_position_logits"])
    tolerance = fixture["suggested_abs_tolerance"]
    assert torch.allclose(logits[-1], expected_last, rtol=0, atol=tolerance)
    assert logits.argmax(-1).tolist() == fixture["argmax_per_position"]


def mean_cross_entropy(model, tokenizer, sentences):
    """Mean over every token after BOS of every sentence, in nats (the reference's definition)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for sentence in sentences:
            ids = torch.tensor([tokenizer.encode(sentence, bos=True, eos=False)])
            logits = model(ids[:, :-1])[0]
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return total / count, count


def test_cross_entropy_on_story_sentences(model, tokenizer, reference):
    figures = reference["cross_entropy"]
    mean, count = mean_cross_entropy(model, tokenizer, figures["tinystories_like_sentences"])
    assert count == figures["tinystories_like"]["n_tokens"]
    assert mean == pytest.approx(1.784, abs=1e-3)
    assert mean == pytest.approx(figures["tinystories_like"]["mean_ce_nats"], abs=1e-3)


@pytest.mark.parametrize("name, path", [("tok512", "stories260K/tok512.model"),
                                        ("llama32k", "llama/tokenizer.model")])
def test_tokenizers_give_reference_ids(assets, reference, name, path):
    tokenizer = Tokenizer(str(assets / path))
    assert tokenizer.bos_id == 1 and tokenizer.eos_id == 2
    assert tokenizer.n_words == {"tok512": 512, "llama32k": 32000}[name]
    for text, ids in reference["tokenization_examples"][name].items():
        assert tokenizer.encode(text, bos=False, eos=False) == ids
        assert tokenizer.encode(text, bos=True, eos=True) == [1] + ids + [2]
        assert tokenizer.decode(ids) == text


# ---- KV cache ----

def full_logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


def cached_hidden(model, tokens, chunks):
    """Final hidden states of tokens fed through the KV cache in chunks of the given lengths."""
    outputs, start = [], 0
    model.setup_kv_cache(tokens.shape[0], tokens.shape[1])
    try:
        with torch.no_grad():
            for length in chunks:
                chunk = tokens[:, start:start + length]
                outputs.append(model.run_layers(model.embed(chunk), start))
                start += length
    finally:
        model.clear_kv_cache()
    assert start == tokens.shape[1]
    return torch.cat(outputs, dim=1)


@pytest.fixture(scope="module")
def model64(stories):
    return load_model(stories / "stories260K.bin", dtype=torch.float64)


@pytest.mark.parametrize("chunks", [
    [6] + [1] * 10,       # prefill, then one token at a time
    [3, 5, 1, 4, 1, 2],   # chunked prefill at start_pos > 0, mixed with single steps
    [1] * 16,             # no prefill at all
    [16],                 # everything at once through the cache
])
def test_kv_cache_equals_full_recomputation(model, model64, chunks):
    tokens = torch.randint(3, 512, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.run_layers(model.embed(tokens))
    got = cached_hidden(model, tokens, chunks)
    # Compared before the head: the cache only touches the blocks, and the head's 512-wide
    # products of |h| ~ 16 would turn the same few-ulp differences into ~1.3e-5 on the logits.
    assert (got - expected).abs().max().item() <= 1e-5
    assert torch.equal(model.logits(got).argmax(-1), model.logits(expected).argmax(-1))
    # In float64 the cached and the recomputed logits agree to rounding: same maths.
    got64 = model64.logits(cached_hidden(model64, tokens, chunks))
    assert (got64 - full_logits(model64, tokens)).abs().max().item() <= 1e-12


def test_kv_cache_is_removed_after_generation(model):
    generate(Stage(model, DistContext()), [[1, 403], [1]], 4)
    assert all(block.attention.cache is None for block in model.layers.values())


# ---- grouped-query attention and the rotary convention ----

def reference_attention(attention, x, n_rep_order):
    """Attention written out by hand; kv head for query head h is n_rep_order(h)."""
    B, T, _ = x.shape
    H, KV, D = attention.n_heads, attention.n_kv_heads, attention.head_dim
    turns = model_module.rotary_tables(D, 10000.0, 0, T, x.device)
    q = model_module.apply_rotary(attention.wq(x).view(B, T, H, D), turns)
    k = model_module.apply_rotary(attention.wk(x).view(B, T, KV, D), turns)
    v = attention.wv(x).view(B, T, KV, D)
    kv_index = torch.tensor([n_rep_order(h) for h in range(H)])
    k, v = k[:, :, kv_index], v[:, :, kv_index]  # (B, T, H, D)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / D ** 0.5
    scores = scores.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), float("-inf"))
    out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)
    return attention.wo(out.reshape(B, T, H * D))


def test_gqa_query_heads_share_kv_heads_in_groups(model):
    attention = model.layers["0"].attention
    assert (attention.n_heads, attention.n_kv_heads) == (8, 4)
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(1))
    turns = model_module.rotary_tables(8, 10000.0, 0, 7, x.device)
    with torch.no_grad():
        got = attention(x, turns, 0)
        grouped = reference_attention(attention, x, lambda h: h // 2)  # heads 0,1 -> kv 0; ...
        round_robin = reference_attention(attention, x, lambda h: h % 4)
    assert (got - grouped).abs().max().item() <= 1e-5
    assert (got - round_robin).abs().max().item() > 1e-3  # the test can tell the two apart


def test_rotary_tables_equal_the_ones_stored_in_the_checkpoint(stories):
    source = open_source(stories / "stories260K.bin")
    args = source.args
    start = source.offsets["norm.weight"][0] + args.dim  # the tables follow the final norm
    half = args.max_seq_len * args.head_dim // 2
    stored = np.array(source.floats[start:start + 2 * half]).reshape(2, args.max_seq_len, -1)
    turns = model_module.rotary_tables(args.head_dim, args.rope_theta, 0, args.max_seq_len,
                                       "cpu")
    assert np.abs(turns.real.numpy() - stored[0]).max() <= 1e-6
    assert np.abs(turns.imag.numpy() - stored[1]).max() <= 1e-6


def rotate_half(x, turns):
    """The other rotary convention: pairs (x[i], x[i + head_dim/2])."""
    half = x.shape[-1] // 2
    x0, x1 = x.float()[..., :half], x.float()[..., half:]
    cos, sin = turns.real[None, :, None, :], turns.imag[None, :, None, :]
    return torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).type_as(x)


def test_rotate_half_breaks_the_model_unless_q_k_rows_are_permuted(model, tokenizer, reference,
                                                                   monkeypatch, stories):
    sentences = reference["cross_entropy"]["tinystories_like_sentences"]
    ids = torch.tensor([reference["logits_fixture"]["input_ids"]])
    expected = full_logits(model, ids)
    monkeypatch.setattr(model_module, "apply_rotary", rotate_half)
    wrong_ce, _ = mean_cross_entropy(model, tokenizer, sentences)
    assert wrong_ce > 3.0  # 4.08 per the assets README: our interleaved convention matters

    # Rotate-half is equivalent once each head's q/k rows are ordered evens-then-odds.
    permuted = load_model(stories / "stories260K.bin")
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    with torch.no_grad():
        for block in permuted.layers.values():
            for weight in (block.attention.wq.weight, block.attention.wk.weight):
                weight.copy_(weight.view(-1, 8, 64)[:, order].reshape(-1, 64))
    # float rounding only (logits up to ~16: 1.1e-5 apart on one CPU); a wrong order is O(1) off
    torch.testing.assert_close(full_logits(permuted, ids), expected, rtol=1e-5, atol=1e-5)
