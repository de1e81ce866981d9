"""chat.py: scripted stdin, in one process and through 2 ranks; every streamed reply equals greedy
generation of the same history (KV cache kept across turns); Ctrl+C stops a reply, not the
program; the oldest turns are dropped when the history outgrows max_seq_len; /reset, /exit, Ctrl+D.
Run: python -m pytest -q tests/test_chat.py
"""
import io
import os
import signal
import subprocess
import sys

import pytest
import torch

import split_model
from launch import REPO, free_port, rank_env
from llama.serving.sampling import Sampling
from llama.serving.chat import HINT, run_chat
from llama.formats.checkpoint import load_model
from llama.parallel.distributed import DistContext
from llama.serving.generation import generate
from llama.parallel.pipeline import Stage
from llama.tuning.methods import apply_adapter, apply_prefix
from llama.tuning.prompt import SoftPrompt
from llama.model.tokenizer import Tokenizer

LINES = ["Once upon a time", "Tom saw a dog", "The end"]
MAX_GEN_LEN = 24


@pytest.fixture(scope="module")
def tokenizer(assets):
    return Tokenizer(str(assets / "stories260K" / "tok512.model"))


@pytest.fixture(scope="module")
def prompt_weight(model_bin):
    model = load_model(model_bin)
    std = float(model.tok_embeddings.weight.std())
    return torch.randn(4, model.args.dim, generator=torch.Generator().manual_seed(0)) * std * 3


def chat(model, tokenizer, lines, weight=None, stdout=None, max_gen_len=MAX_GEN_LEN):
    soft = SoftPrompt(weight) if weight is not None else None
    stage = Stage(model, DistContext(), soft, soft.n_virtual_tokens if soft else 0)
    out = stdout or io.StringIO()
    conversation = run_chat(stage, tokenizer, "plain", max_gen_len, Sampling(), heartbeat_s=0.5,
                            stdin=io.StringIO("".join(line + "\n" for line in lines)), stdout=out)
    return conversation, out


def greedy_reply(model, tokenizer, history_ids, weight=None, max_gen_len=MAX_GEN_LEN):
    """What generate() answers after the same history ids (BOS first), with the same prompt."""
    soft = SoftPrompt(weight) if weight is not None else None
    stage = Stage(model, DistContext(), soft, soft.n_virtual_tokens if soft else 0)
    return generate(stage, [history_ids], max_gen_len, stop_ids=tokenizer.stop_ids)[0]


def history_before(conversation, turn_index):
    ids = [conversation.tokenizer.bos_id]
    for turn in conversation.turns[:turn_index]:
        ids += turn.user_ids + turn.reply_ids
    return ids + conversation.turns[turn_index].user_ids


@pytest.mark.parametrize("with_prompt", [False, True])
def test_each_streamed_reply_equals_greedy_generation_of_its_history(model_bin, tokenizer,
                                                                     prompt_weight, with_prompt):
    model = load_model(model_bin)
    weight = prompt_weight if with_prompt else None
    conversation, out = chat(model, tokenizer, LINES + ["/exit"], weight)
    assert [t.text for t in conversation.turns] == LINES
    for i, turn in enumerate(conversation.turns):
        assert turn.reply_ids == greedy_reply(model, tokenizer, history_before(conversation, i), weight)
        reply_text = tokenizer.decode(turn.user_ids + turn.reply_ids)[len(tokenizer.decode(turn.user_ids)):]
        assert f"Assistant: {reply_text}\n" in out.getvalue()  # streamed piece by piece


def test_history_outgrowing_max_seq_len_drops_the_oldest_turns(model_bin, tokenizer):
    model = load_model(model_bin, max_seq_len=80)
    conversation, out = chat(model, tokenizer, LINES + LINES, max_gen_len=16)
    assert "dropped the oldest" in out.getvalue()
    assert len(conversation.turns) < 2 * len(LINES)
    assert len(conversation.ids()) <= 80
    last = len(conversation.turns) - 1
    assert conversation.turns[last].reply_ids == greedy_reply(
        model, tokenizer, history_before(conversation, last), max_gen_len=16)


def test_a_message_too_long_is_refused_and_the_chat_goes_on(model_bin, tokenizer):
    model = load_model(model_bin, max_seq_len=64)
    conversation, out = chat(model, tokenizer, ["word " * 60, "Hi"], max_gen_len=16)
    assert "does not fit max_seq_len=64" in out.getvalue()
    assert [t.text for t in conversation.turns] == ["Hi"]


def test_reset_clears_the_history(model_bin, tokenizer):
    model = load_model(model_bin)
    conversation, out = chat(model, tokenizer, [LINES[0], "/reset", LINES[1]])
    assert "(history cleared)" in out.getvalue()
    assert [t.text for t in conversation.turns] == [LINES[1]]
    assert conversation.turns[0].reply_ids == greedy_reply(model, tokenizer,
                                                           history_before(conversation, 0))


class InterruptAfterWords(io.StringIO):
    """A terminal whose user presses Ctrl+C (a real SIGINT) once the first reply has begun."""

    def __init__(self):
        super().__init__()
        self.sent = False

    def write(self, text):
        written = super().write(text)
        if not self.sent and self.getvalue().count("Assistant: ") == 1 and \
                len(self.getvalue().split("Assistant: ")[1]) > 5:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return written


def test_ctrl_c_stops_the_reply_not_the_program(model_bin, tokenizer):
    model = load_model(model_bin)
    conversation, out = chat(model, tokenizer, [LINES[0], LINES[1]], stdout=InterruptAfterWords(),
                             max_gen_len=200)
    assert " [stopped]" in out.getvalue()
    first, second = conversation.turns
    assert 0 < len(first.reply_ids) < 200
    # The next turn goes on from the stopped reply, as generation from that history would.
    assert second.reply_ids == greedy_reply(model, tokenizer, history_before(conversation, 1),
                                            max_gen_len=200)


def test_two_ranks_chat_like_one_process_and_quit_together(model_bin, tokenizer, tmp_path):
    split_model.main(str(model_bin), 2, out_dir=str(tmp_path / "pp2"))
    conversation, out = chat(load_model(model_bin), tokenizer, LINES[:2])
    argv = [sys.executable, "chat.py", "--ckpt_dir", str(tmp_path / "pp2"), "--temperature", "0",
            "--max_gen_len", str(MAX_GEN_LEN), "--timeout_s", "60"]
    port = free_port()
    ranks = [subprocess.Popen(argv, cwd=REPO, env=rank_env(r, 2, port), text=True,
                              stdin=subprocess.PIPE if r == 0 else subprocess.DEVNULL,
                              stdout=open(tmp_path / f"{r}.out", "w"),
                              stderr=open(tmp_path / f"{r}.err", "w")) for r in range(2)]
    try:
        ranks[0].stdin.write("".join(line + "\n" for line in LINES[:2]))
        ranks[0].stdin.close()  # Ctrl+D after the two lines
        assert [p.wait(timeout=120) for p in ranks] == [0, 0], (tmp_path / "0.err").read_text()
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
    printed = (tmp_path / "0.out").read_text()
    assert HINT in printed
    assert printed.split(HINT, 1)[1] == out.getvalue().split(HINT, 1)[1]


def test_a_line_that_is_not_utf8_is_refused_and_the_chat_goes_on(model_bin, tokenizer):
    """Bytes as a terminal sends them: the invalid line is named in one line, the next answered."""
    model = load_model(model_bin)
    stage = Stage(model, DistContext())
    stdin = io.TextIOWrapper(io.BytesIO(b"\xed\xa0\x80 hello\nHi\n"), encoding="utf-8")
    out = io.StringIO()
    # A limit: before the fix the reading thread died and the chat waited forever for a line.
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail(f"the chat hung: {out.getvalue()}"))
    signal.alarm(60)
    try:
        conversation = run_chat(stage, tokenizer, "plain", MAX_GEN_LEN, Sampling(),
                                heartbeat_s=0.5, stdin=stdin, stdout=out)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert "which is not a Unicode character (bytes that are not UTF-8, or a lone surrogate): " \
           "give UTF-8 text)" in out.getvalue()
    assert [t.text for t in conversation.turns] == ["Hi"]
    assert conversation.turns[0].reply_ids == greedy_reply(model, tokenizer,
                                                           history_before(conversation, 0))


@pytest.mark.parametrize("method", ["prefix", "adapter"])
def test_a_prefix_or_adapter_chat_replies_what_generation_with_it_gives(model_bin, tokenizer,
                                                                       method):
    """Later turns extend the cached row: a prefix stays in its first positions, an adapter is
    on for every chunk."""
    model = load_model(model_bin)
    if method == "prefix":
        tuning = apply_prefix(model, 3, seed=5)
    else:
        tuning = apply_adapter(model, 4, adapter_layers=3, seed=3)
        with torch.no_grad():
            for key, tensor in tuning.trainable.items():
                if key.endswith("gate"):
                    tensor.fill_(2.0)
    stage = Stage(model, DistContext(), tuning=tuning)
    conversation = run_chat(stage, tokenizer, "plain", MAX_GEN_LEN, Sampling(), heartbeat_s=0.5,
                            stdin=io.StringIO("".join(line + "\n" for line in LINES[:2])),
                            stdout=io.StringIO())
    assert len(conversation.turns) == 2
    for i, turn in enumerate(conversation.turns):
        expected = generate(stage, [history_before(conversation, i)], MAX_GEN_LEN,
                            stop_ids=tokenizer.stop_ids)[0]
        assert turn.reply_ids == expected
