"""Incremental detokenization: the text handed out id by id equals one decode of the whole reply
(leading spaces, multi-byte characters split over byte pieces), with a bounded window per id;
stop strings are found across pieces. Run: python3 -m pytest -q tests/test_detokenize.py
"""
import pytest

from llama.model.tokenizer import Tokenizer
from llama.serving.detokenize import Detokenizer, StopWatch

TEXT = " Héllo wörld: 世界 🦙🦙 naïve — ok.  Done"


@pytest.fixture(scope="module", params=["llama/tokenizer.model", "stories260K/tok512.model"])
def tokenizer(assets, request):
    return Tokenizer(str(assets / request.param))


def test_pieces_join_to_the_whole_decode_and_hold_back_half_characters(tokenizer):
    prompt = tokenizer.encode("Say it:", bos=True, eos=False)
    reply = tokenizer.encode(TEXT * 3, bos=False, eos=False)
    detokenizer = Detokenizer(tokenizer, prompt)
    pieces = [detokenizer.add(token) for token in reply]
    pieces.append(detokenizer.finish(reply))
    whole = tokenizer.decode(prompt + reply)[len(tokenizer.decode(prompt)):]
    assert "".join(pieces) == whole
    assert not any("\ufffd" in piece for piece in pieces)  # never half a character
    if tokenizer.n_words > 1000:  # the 32k vocabulary spells the llama in byte pieces
        assert "" in pieces[:-1], "a multi-byte character should have waited for its bytes"


def test_each_id_decodes_a_short_window_so_the_work_is_linear(tokenizer):
    reply = tokenizer.encode(TEXT * 20, bos=False, eos=False)
    sizes = []
    decode = tokenizer.decode

    class Counting:
        def decode(self, ids):
            sizes.append(len(ids))
            return decode(ids)

    detokenizer = Detokenizer(Counting(), [tokenizer.bos_id])
    for token in reply:
        detokenizer.add(token)
    assert len(reply) > 200 and max(sizes) <= 8, max(sizes)


def test_stop_strings_are_found_across_pieces_and_what_may_begin_one_waits():
    watch = StopWatch(["END", "xy"])
    assert watch.add("abc E") == -1 and watch.safe_end() == 3  # "E" may begin "END"
    assert watch.add("N") == -1
    assert watch.add("D and more") == 4
    assert StopWatch([]).add("anything") == -1
