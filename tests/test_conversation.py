"""A conversation's ids in every template: the chat's turn-by-turn ids equal the server's ids of
the same history, and the chat formats of instruction-tuned models (llama2, llama3, chatml) are
laid out as those models were trained. Nothing here loads a model.
Run: python3 -m pytest -q tests/test_conversation.py
"""
import pytest

from llama.model.tokenizer import Tokenizer
from llama.serving.conversation import conversation_ids, user_turn_ids
from llama.training.records import TEMPLATES


@pytest.fixture(scope="module")
def tokenizer(assets):
    return Tokenizer(str(assets / "llama" / "tokenizer.model"))


@pytest.mark.parametrize("template", TEMPLATES)
def test_turn_by_turn_ids_equal_the_whole_conversations(tokenizer, template):
    """What chat.py feeds turn by turn (its KV cache kept) is what serve.py builds at once."""
    turns = [("user", "Hello there"), ("assistant", "Hi! How can I help?"),
             ("user", "Tell me a story."), ("assistant", "Once upon a time."), ("user", "More")]
    chat = [tokenizer.bos_id]
    for i, (role, text) in enumerate(turns):
        chat += user_turn_ids(tokenizer, text, template, first=i == 0) if role == "user" else \
            tokenizer.encode(text, bos=False, eos=False)
    assert conversation_ids(tokenizer, template, turns) == chat


def test_llama2_closes_a_reply_with_eos_bos_and_wraps_the_system_message(tokenizer):
    ids = conversation_ids(tokenizer, "llama2", [("system", "Be brief."), ("user", "Hi"),
                                                 ("assistant", "Hello."), ("user", "Bye")])
    encode = lambda text: tokenizer.encode(text, bos=False, eos=False)  # noqa: E731
    assert ids == ([tokenizer.bos_id] + encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]")
                   + encode("Hello.") + [tokenizer.eos_id, tokenizer.bos_id]
                   + encode("[INST] Bye [/INST]"))


@pytest.mark.parametrize("template, system, turn", [
    ("llama3", "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>",
     "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("chatml", "<|im_start|>system\nBe brief.<|im_end|>\n",
     "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
])
def test_chat_formats_put_the_system_message_in_its_own_block(tokenizer, template, system, turn):
    """(Their special tokens are single ids with the model's tokenizer.json; the block and the
    turn meet at one, so encoding them apart gives the ids of encoding them together.)"""
    ids = conversation_ids(tokenizer, template, [("system", "Be brief."), ("user", "Hi")])
    encode = lambda text: tokenizer.encode(text, bos=False, eos=False)  # noqa: E731
    assert ids == [tokenizer.bos_id] + encode(system) + encode(turn)
