"""The checks a request passes before it may queue: its fields, each refused with an OpenAI-style
error (HTTP status, message naming the value and the fix, param, code), never ignored.

Used by llama/serving/service.py (a body -> a Job) and llama/serving/handler.py (framing).
"""
import json
import math
from dataclasses import dataclass

from llama.errors import BadInput
from llama.serving.conversation import conversation_ids
from llama.serving.sampling import Sampling

UNSUPPORTED = {  # field -> the only values accepted (anything else is refused, not ignored)
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False, 0),
    "top_logprobs": (None, 0), "logit_bias": (None, {}), "suffix": (None, ""),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "tools": (None, []),
}
MAX_STOP_STRINGS = 4


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 0  # 0: whatever fits max_seq_len
    max_tokens: int = 256
    max_batch: int = 8
    max_wait_ms: float = 10.0
    idle_timeout_s: float = 30.0  # a connection silent this long is closed
    max_connections: int = 64  # open at once; more are answered 503 and closed
    # False: static batching, a batch runs to its end before queued requests start (only
    # bench/serve_bench.py asks for it, to measure what joining at any step gains)
    continuous: bool = True


class ApiError(Exception):
    """An OpenAI-style error: HTTP status and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param=None, code=None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}


def parse_served_prompts(text) -> dict:
    """'alpaca=runs/alpaca,max=runs/max' (or a list of NAME=FOLDER) -> {name: folder}; each folder
    a tuning of any method (soft prompt, prefix, adapter)."""
    items = text if isinstance(text, (list, tuple)) else [t for t in (text or "").split(",")]
    named = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, sep, folder = item.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise BadInput(f"--prompts item {item!r} must be NAME=FOLDER (for example "
                           "alpaca=runs/alpaca/prompt)")
        if name.strip() in named:
            raise BadInput(f"--prompts names {name.strip()!r} twice: give each prompt its own name")
        named[name.strip()] = folder.strip()
    return named


def number(body: dict, name: str, default, low, high, integer=False):
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    # Python compares an int of any size with a float exactly; math.isfinite(int) would first
    # convert it to a float, which overflows for 400 digits. So the finite test is for floats.
    if isinstance(value, bool) or not isinstance(value, kinds) \
            or (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise ApiError(400, f"{name}={shorten(json.dumps(value))} must be {what} from {low} to "
                       f"{high}", param=name, code="invalid_value")
    return value


def shorten(text: str, most: int = 40) -> str:
    """A value quoted in an error, cut so that a 5,000-digit number does not fill the reply."""
    return text if len(text) <= most else f"{text[:most]}… ({len(text)} characters)"


def encode(tokenizer, text: str, param: str) -> list:
    try:
        return tokenizer.encode(text, bos=True, eos=False)
    except BadInput as error:  # a lone surrogate ("\\ud800") is valid JSON but not text
        raise ApiError(400, f"{param}: {error}", param=param, code="invalid_value") from None


def stop_strings(body: dict) -> list:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) \
            or len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop must be a non-empty string or a list of at most "
                       f"{MAX_STOP_STRINGS} of them", param="stop", code="invalid_value")
    return stops


def refuse_unsupported(body: dict):
    for name, accepted in UNSUPPORTED.items():
        if name in body and body[name] not in accepted:
            raise ApiError(400, f"{name}={json.dumps(body[name])} is not supported by this "
                           f"server (only {json.dumps(accepted[-1])})", param=name,
                           code="unsupported_value")


def chat_messages(body: dict) -> list:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}",
                       param="messages", code="invalid_value")
    out = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                content = None
            else:
                content = "".join(p["text"] for p in content)
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] must be {{\"role\": system|user|assistant, "
                           "\"content\": text}", param="messages", code="invalid_value")
        out.append((role, content))
    if out[-1][0] != "user":
        raise ApiError(400, "the last message must be the user's", param="messages",
                       code="invalid_value")
    return out


def content_length(text: str, most: int) -> int:
    """A Content-Length header -> the number of bytes, or an ApiError."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()):  # "²".isdigit() is True, int("²") fails
        raise ApiError(400, f"Content-Length {shorten(repr(text))} is not a number of bytes",
                       code="invalid_content_length")
    if len(text) > 18 or int(text) > most:  # 18 digits: int() of thousands would be refused
        raise ApiError(413, f"the body is {shorten(text)} bytes; this server takes at most "
                       f"{most} (--max_body_bytes)", code="body_too_large")
    return int(text)


def refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")



# ---- a body's parts, as the generation needs them ----

def prompt_ids(body: dict, kind: str, tokenizer, template: str) -> list:
    """BOS + the prompt's ids (completion), or the conversation's in the template (chat)."""
    if kind == "chat":
        try:
            return conversation_ids(tokenizer, template, chat_messages(body))
        except BadInput as error:  # a lone surrogate in a message
            raise ApiError(400, f"messages: {error}", param="messages",
                           code="invalid_value") from None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string (or a list of one string)",
                       param="prompt", code="invalid_value")
    return encode(tokenizer, prompt, "prompt")


def max_new_tokens(body: dict, kind: str, n_ids: int, n_virtual: int, limits: "Limits",
                   max_seq_len: int) -> int:
    """The tokens the reply may have: asked for, within --max_tokens and the context left."""
    limit = limits.max_prompt_tokens or max_seq_len
    room = max_seq_len - n_virtual - n_ids
    if n_ids > limit or room < 1:
        raise ApiError(400, f"the prompt is {n_ids} tokens (+{n_virtual} virtual); this server "
                       f"takes at most {min(limit, max_seq_len - n_virtual - 1)}: shorten it",
                       param="messages" if kind == "chat" else "prompt",
                       code="context_length_exceeded")
    default_tokens = 16 if kind == "completion" else min(limits.max_tokens, room)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = number(body, name, default_tokens, 1, limits.max_tokens, integer=True)
    if max_tokens > room:
        raise ApiError(400, f"the prompt ({n_ids} tokens, +{n_virtual} virtual) and "
                       f"{name}={max_tokens} exceed the context of {max_seq_len} tokens: lower "
                       f"{name} to at most {room}", param=name, code="context_length_exceeded")
    return max_tokens


def sampling_of(body: dict) -> Sampling:
    sampling = Sampling(number(body, "temperature", 1.0, 0, 2), number(body, "top_p", 1.0, 0, 1),
                        number(body, "seed", 0, -(2 ** 63), 2 ** 63 - 1, integer=True))
    if sampling.top_p == 0:
        sampling.temperature = 0.0  # nothing left to sample from but the likeliest
    return sampling


def streaming(body: dict) -> tuple:
    """(stream, include_usage): stream_options={"include_usage": true} asks for a last chunk
    that carries the usage (OpenAI's rule: only with stream=true)."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", param="stream", code="invalid_value")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise ApiError(400, "stream_options is only allowed with stream=true: leave it out or "
                       "set stream to true", param="stream_options", code="invalid_value")
    usage = options.get("include_usage", False) if isinstance(options, dict) else None
    if not isinstance(usage, bool) or set(options) - {"include_usage"}:
        raise ApiError(400, 'stream_options must be {"include_usage": true or false}',
                       param="stream_options", code="invalid_value")
    return stream, usage


def model_named(body: dict, models: list) -> str:
    model = body.get("model")
    if not isinstance(model, str) or model not in models:
        raise ApiError(404, f"The model {json.dumps(model)} does not exist: GET /v1/models lists "
                       f"{', '.join(models)}", param="model", code="model_not_found")
    return model
