"""How a conversation becomes token ids: each user turn in the template, replies as text.

Shared by the terminal chat (llama/serving/chat.py) and the HTTP server, so a turn is the same
ids in both. The instruction templates (alpaca, plain, none) separate a reply from the next turn
with a blank line; the chat formats of instruction-tuned models close a reply their own way:

    llama2   [INST] <<SYS>>\\nsystem\\n<</SYS>>\\n\\nuser [/INST] reply EOS BOS [INST] ...
    llama3   <|start_header_id|>system<|end_header_id|>\\n\\nsystem<|eot_id|>
             <|start_header_id|>user<|end_header_id|>\\n\\nuser<|eot_id|>
             <|start_header_id|>assistant<|end_header_id|>\\n\\nreply<|eot_id|> ...
    chatml   <|im_start|>system\\nsystem<|im_end|>\\n<|im_start|>user\\nuser<|im_end|>\\n
             <|im_start|>assistant\\nreply<|im_end|>\\n ...  (Qwen2.5)
"""
from llama.training.records import format_prompt

TURN_SEPARATOR = "\n\n"  # between a reply and the next turn's template
DEFAULT_TEMPLATE = "plain"  # without a prompt, or when the prompt names none

# A system message as its own block before the first user turn; the other templates put it at
# the start of the first user's text.
SYSTEM_BLOCKS = {"llama3": "<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
                 "chatml": "<|im_start|>system\n{system}<|im_end|>\n"}
SYSTEM_PREFIXES = {"llama2": "<<SYS>>\n{system}\n<</SYS>>\n\n"}
# What closes a reply before the next user turn: text, or (llama2) the EOS and BOS ids.
REPLY_ENDS = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>\n", "llama2": None}


def reply_end_ids(tokenizer, template: str) -> list:
    """The ids that close a reply: llama2's EOS and BOS, or the template's text."""
    end = REPLY_ENDS.get(template, TURN_SEPARATOR)
    return [tokenizer.eos_id, tokenizer.bos_id] if end is None else \
        tokenizer.encode(end, bos=False, eos=False)


def user_turn_ids(tokenizer, text: str, template: str, first: bool) -> list:
    """A user's text in the template; later turns start with what closes the reply before
    (encoded with the turn's text, as one text, where it is text)."""
    turn = format_prompt({"instruction": text, "input": ""}, template)
    if first:
        return tokenizer.encode(turn, bos=False, eos=False)
    end = REPLY_ENDS.get(template, TURN_SEPARATOR)
    if end is None:  # llama2: the reply ends with EOS, the next turn starts with BOS
        return reply_end_ids(tokenizer, template) + tokenizer.encode(turn, bos=False, eos=False)
    return tokenizer.encode(end + turn, bos=False, eos=False)


def system_ids(tokenizer, template: str, system: str) -> tuple:
    """(ids of a system block before the turn, text put before the user's own)."""
    if not system:
        return [], ""
    if template in SYSTEM_BLOCKS:
        text = SYSTEM_BLOCKS[template].format(system=system)
        return tokenizer.encode(text, bos=False, eos=False), ""
    return [], SYSTEM_PREFIXES.get(template, "{system}" + TURN_SEPARATOR).format(system=system)


def conversation_ids(tokenizer, template: str, messages: list) -> list:
    """BOS + a conversation [(role, text)], roles system/user/assistant, ending with a user turn:
    the ids a chat turn holds after the same history (replies as text, not as generated ids)."""
    ids, system, first = [tokenizer.bos_id], "", True
    for role, text in messages:
        if role == "system":
            system += (TURN_SEPARATOR if system else "") + text
        elif role == "user":
            block, prefix = system_ids(tokenizer, template, system)
            if block and not first:  # the reply's end, then the system block, then the turn
                ids += reply_end_ids(tokenizer, template)
            ids += block + user_turn_ids(tokenizer, prefix + text, template, first or bool(block))
            system, first = "", False
        else:
            ids += tokenizer.encode(text, bos=False, eos=False)
    return ids
