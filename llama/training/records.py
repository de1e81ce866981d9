"""Training records: Alpaca JSON or JSONL read strictly or with notes on what is skipped, and
the prompt templates that turn a record into text (alpaca, plain, none).
"""
from __future__ import annotations

import json

from llama.errors import BadInput

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
_ALPACA_PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.")

# Each template is (with_input, no_input). "plain" is Alpaca without its preamble, for runs where
# the soft prompt (often initialised from ALPACA_PREAMBLE) takes the preamble's place.
TEMPLATES = {
    "alpaca": (
        _ALPACA_PREAMBLE_WITH_INPUT
        + "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        ALPACA_PREAMBLE + "\n\n### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "plain": (
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "none": ("{instruction}\n{input}", "{instruction}"),
    # The chat formats of instruction-tuned models (one user turn; llama/serving/conversation.py
    # adds system messages and later turns). Special tokens written as text encode as single
    # ids with their tokenizer.json (llama/model/hf_tokenizer.py).
    "llama2": ("[INST] {instruction}\n\n{input} [/INST]", "[INST] {instruction} [/INST]"),
    "llama3": ("<|start_header_id|>user<|end_header_id|>\n\n{instruction}\n\n{input}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n",
               "<|start_header_id|>user<|end_header_id|>\n\n{instruction}<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "chatml": ("<|im_start|>user\n{instruction}\n\n{input}<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"),
}

_ALPACA_FIELDS = ("instruction", "input", "output")


# ----------------------------------------------------------------------------------------------
# Reading records


def load_records(path, strict: bool = False, log=print):
    """Read Alpaca or plain-text records from a JSON list or a JSONL file.

    Returns (records, n_skipped): each record is {"instruction", "input", "output"} (input "" when
    absent) or {"text"}. Unusable records are skipped and counted, or refused when strict.
    """
    records, skipped = records_from_bytes(path, read_bytes(path), strict)
    if skipped:
        log(f"note: {path}: " + passed_over_note("skipped", len(skipped), skipped[:N_NAMED]))
    return [record for _, record in records], len(skipped)


def read_bytes(path) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except FileNotFoundError:
        raise BadInput(f"data file {path} does not exist: pass --data the path of an Alpaca "
                       "JSON or JSONL file") from None
    except IsADirectoryError:
        raise BadInput(f"data path {path} is a folder: pass --data the path of an Alpaca JSON "
                       "or JSONL file") from None


def records_from_bytes(path, raw: bytes, strict: bool):
    """([(where, record)], [(where, why skipped)]): where names the record's place in the file."""
    try:
        text = raw.decode("utf-8-sig")  # -sig: tolerate the byte-order mark some editors write
    except UnicodeDecodeError as error:
        raise BadInput(f"data file {path} is not UTF-8 (bad byte at offset {error.start}): "
                       "re-encode it as UTF-8") from None
    is_json_list = text.lstrip().startswith("[")
    located = _parse_json_list(path, text) if is_json_list else _parse_jsonl(path, text)
    records, skipped = [], []
    for where, raw_record in located:
        record, problem = _check_record(raw_record)
        if record is not None:
            records.append((where, record))
            continue
        if strict:
            raise BadInput(f"data file {path}, {where}: {problem}; fix or remove that record, or "
                           "leave strict off to skip such records")
        skipped.append((where, problem))
    if not records:
        raise BadInput(f"data file {path} holds no usable records: each needs a non-empty "
                       "'instruction' and 'output' (Alpaca) or a non-empty 'text'")
    return records, skipped


def _parse_json_list(path, text: str):
    """[(where, value)] from a JSON list; a syntax error names line:column."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadInput(f"data file {path}:{error.lineno}:{error.colno}: not valid JSON "
                       f"({error.msg}); fix the file at that place") from None
    except RecursionError:
        raise BadInput(f"data file {path} nests lists or objects too deeply to be Alpaca "
                       "records: write a list [{...}, ...] of flat objects") from None
    if not isinstance(values, list):
        raise BadInput(f"data file {path} holds a JSON {type(values).__name__}, not a list of "
                       "records: write a list [{...}, ...] or JSONL (one object per line)")
    return [(f"record index {index}", value) for index, value in enumerate(values)]


def _parse_jsonl(path, text: str):
    """[(where, value)] from JSONL, one object per line; blank lines are allowed."""
    located = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            located.append((f"line {line_number}", json.loads(line)))
        except json.JSONDecodeError as error:
            raise BadInput(f"data file {path} line {line_number}: not valid JSON ({error.msg} at "
                           f"column {error.colno}); a JSONL file holds one JSON object per line, "
                           "a JSON file a single list") from None
        except RecursionError:
            raise BadInput(f"data file {path} line {line_number}: nested too deeply to be a "
                           "record; each line holds one flat JSON object") from None
    return located


def _is_text(value: str) -> bool:
    """False for strings JSON's \\ud800 escapes can make but no UTF-8 (nor the tokenizer) holds."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_kind(value) -> str:
    """What a JSON value is, in JSON's words: 'a number', 'null', 'a list' ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    kinds = {int: "a number", float: "a number", str: "a string", list: "a list",
             dict: "an object"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _check_record(value):
    """(normalised record, None) when usable, else (None, what is wrong with it)."""
    if not isinstance(value, dict):
        return None, f"{_json_kind(value)}, not an object"
    if "instruction" in value or "output" in value:
        fields = {"input": ""} | {name: value[name] for name in _ALPACA_FIELDS if name in value}
        for name in _ALPACA_FIELDS:
            if name not in fields:
                return None, f"field '{name}' is missing"
            if not isinstance(fields[name], str):
                return None, f"field '{name}' is {_json_kind(fields[name])}, not a string"
            if not _is_text(fields[name]):
                return None, f"field '{name}' holds a lone surrogate (\\ud800-\\udfff), not text"
        for name in ("instruction", "output"):
            if not fields[name].strip():
                return None, f"field '{name}' is empty"
        return fields, None
    if "text" in value:
        if not isinstance(value["text"], str):
            return None, f"field 'text' is {_json_kind(value['text'])}, not a string"
        if not _is_text(value["text"]):
            return None, "field 'text' holds a lone surrogate (\\ud800-\\udfff), not text"
        if not value["text"].strip():
            return None, "field 'text' is empty"
        return {"text": value["text"]}, None
    return None, "has neither 'instruction'/'output' (Alpaca) nor 'text'"


# ----------------------------------------------------------------------------------------------
# Templates and tokenising


def template_pair(template: str):
    if template not in TEMPLATES:
        raise BadInput(f"unknown template {template!r}: choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[template]


def format_prompt(record, template: str = "alpaca") -> str:
    """The prompt text of an instruction record (everything before the response)."""
    with_input, no_input = template_pair(template)
    input_text = record.get("input") or ""
    if input_text:
        return with_input.format(instruction=record["instruction"], input=input_text)
    return no_input.format(instruction=record["instruction"])


N_NAMED = 3  # records named in a note on skipped, truncated or dropped records; the rest counted
PASSED_OVER = ("skipped", "truncated", "dropped")


def _records(count: int) -> str:
    return f"{count} record" if count == 1 else f"{count} records"


def passed_over_note(kind: str, count: int, named, max_len: int = 0,
                     max_len_said: str = "") -> str:
    """One line on the records of a file that were skipped, truncated or dropped: how many, which
    (the first few of them, named) and why. max_len_said: how the user set max_len."""
    more = f"; and {count - len(named)} more" if count > len(named) else ""
    if kind == "skipped":  # named: (where, why)
        which = "; ".join(f"{where}: {why}" for where, why in named)
        return (f"{_records(count)} skipped ({which}{more}); pass --strict to refuse the file "
                "instead")
    if kind == "truncated":  # named: (where, n_tokens)
        which = "; ".join(f"{where}: {n_tokens} tokens" for where, n_tokens in named)
        return (f"{_records(count)} longer than {max_len_said}, truncated to {max_len} tokens "
                f"({which}{more}): the tokens past the cut are not trained")
    # dropped, named: (where, n_tokens, first_target)
    which = "; ".join(f"{where}: response from token {first_target} of {n_tokens}"
                      for where, n_tokens, first_target in named)
    its, it = ("its", "it") if count == 1 else ("their", "them")
    return (f"{_records(count)} dropped: {its} response starts past {max_len_said} "
            f"({which}{more}); raise --max_seq_len or use fewer virtual tokens to keep {it}")
