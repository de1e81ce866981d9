"""How a conversation becomes token ids: each user turn in the prompt's template, replies as text.

Shared by the terminal chat (llama/serving/chat.py) and the HTTP server (llama/serving/http.py), so a turn is
the same ids in both.
"""
from llama.training.records import format_prompt

TURN_SEPARATOR = "\n\n"  # between a reply and the next turn's template
DEFAULT_TEMPLATE = "plain"  # without a prompt, or when the prompt names none


def user_turn_ids(tokenizer, text: str, template: str, first: bool) -> list:
    """A user's text in the template; later turns start with the separator after a reply."""
    prefix = "" if first else TURN_SEPARATOR
    return tokenizer.encode(prefix + format_prompt({"instruction": text, "input": ""}, template),
                            bos=False, eos=False)


def conversation_ids(tokenizer, template: str, messages: list) -> list:
    """BOS + a conversation [(role, text)], roles system/user/assistant, ending with a user turn:
    the ids a chat turn holds after the same history (replies as text, not as generated ids)."""
    ids, system, first = [tokenizer.bos_id], "", True
    for role, text in messages:
        if role == "system":
            system += text + TURN_SEPARATOR
        elif role == "user":
            ids += user_turn_ids(tokenizer, system + text, template, first)
            system, first = "", False
        else:
            ids += tokenizer.encode(text, bos=False, eos=False)
    return ids
