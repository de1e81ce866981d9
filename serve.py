"""Serve the model and any number of tunings (soft prompts, prefixes, adapters) over an
OpenAI-compatible HTTP API.

    python serve.py --ckpt_dir ckpts/stories260K_pp2 --prompts alpaca=runs/alpaca/prompt
    torchrun --nproc_per_node 2 serve.py --ckpt_dir ckpts/stories260K_pp2 --port 8000
"""
import os
import sys
from pathlib import Path

from llama.parallel.pipeline import Stage
from llama.serving.conversation import DEFAULT_TEMPLATE
from llama.serving.engine import Engine
from llama.training.records import format_prompt
from llama.cli import run_cli
from llama.errors import BadInput
from llama.tuning.files import load_tuning
from llama.tuning.methods import apply_saved
from llama.options import DECODING, MODEL, takes
from llama.prepare.stage import Preparation, run_on_stage
from llama.serving.http import (Access, Limits, Served, Service, parse_served_prompts,
                                run_server)


@takes(MODEL, DECODING)
def main(prompts: str = "", host: str = "127.0.0.1", port: int = 8000, api_key: str = None,
         max_batch: int = 8, max_wait_ms: float = 10.0, max_tokens: int = 256,
         max_prompt_tokens: int = 0, max_body_bytes: int = 1 << 20, base_name: str = None,
         access_log: bool = False, idle_timeout_s: float = 30.0, max_connections: int = 64,
         allow_origins: str = "", allow_hosts: str = "", **options):
    """Serve the model and tunings over HTTP: /v1/completions, /v1/chat/completions, /v1/models.

    Rank 0 listens (standard library HTTP server); the other ranks follow. A request's "model"
    picks the tuning (or the base model); requests join the running batch at its next step
    (continuous batching), which may mix every method. /metrics: Prometheus text; /: a chat
    page. See docs/serving.md.

    prompts: the tunings to serve, NAME=FOLDER,NAME=FOLDER (each folder: ft_main.py's --out of
        any method, soft prompt, prefix, adapter or LoRA, or a PEFT export of one)
    host: the address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)
    port: the TCP port (0: any free port, printed at start)
    api_key: when given, every request but /health needs 'Authorization: Bearer KEY' (default:
        $LLAMA_API_KEY if set)
    max_batch: the most requests generated together
    max_wait_ms: how long a batch waits for more requests after its first
    max_tokens: the most tokens one request may ask for
    max_prompt_tokens: the longest prompt in tokens (0: whatever fits max_seq_len)
    max_body_bytes: the largest request body
    base_name: the model name of the base model, without a soft prompt (default: the
        checkpoint's folder name)
    access_log: print one access line per HTTP request on stderr (time, model, prompt and
        completion tokens, time to first token, total time, status). Not --log: torchrun would
        take that for its own --log_dir
    idle_timeout_s: seconds a connection may stay silent (between requests, or mid-request)
        before it is closed
    max_connections: the most connections open at once; more are answered 503 and closed
    allow_origins: web pages that may call the server from a browser, by origin,
        ORIGIN,ORIGIN (https://app.example; *: any page). Default: none, so a page you visit
        cannot use a server on your machine
    allow_hosts: more names than IP addresses and localhost by which clients reach the server,
        NAME,NAME (*: any); others are refused, which defeats DNS rebinding
    """
    named = parse_served_prompts(prompts)
    base_name = base_name or Path(options["ckpt_dir"]).stem
    if base_name in named:
        raise BadInput(f"--prompts names {base_name!r}, the base model's name: rename the prompt "
                       "or pass another --base_name")
    limits = Limits(max_body_bytes, max_prompt_tokens, max_tokens, max_batch, max_wait_ms,
                    idle_timeout_s, max_connections)
    check_limits(limits, port)
    api_key = required_api_key(api_key)
    access = Access(host, names(allow_origins), tuple(n.lower() for n in names(allow_hosts)))
    log_line = (lambda line: print(line, file=sys.stderr, flush=True)) if access_log else None

    def work(ctx, model, tokenizer, _):
        tunings, served = load_served(ctx, model, named)
        engine = Engine(Stage(model, ctx, cuda_graph=options["cuda_graph"]), tunings,
                        max_rows=max_batch)

        def service():
            return Service(tokenizer, served, base_name, model.args.max_seq_len, limits, api_key)

        def listening(server):
            key = "an API key is required" if api_key else \
                "no API key: anyone who can reach the port can use it"
            print(f"serving {', '.join(server.service.models())} on http://{server.host}:"
                  f"{server.port} ({ctx.n_stages} stage{'s' if ctx.n_stages > 1 else ''}"
                  f"{f' x TP {ctx.tp_size}' if ctx.tp_size > 1 else ''}, "
                  f"batches of up to {max_batch}; {key}; Ctrl+C stops)", flush=True)

        run_server(engine, service, host, port,
                   heartbeat_s=min(2.0, options["timeout_s"] / 4), on_listen=listening,
                   log=log_line, access=access)

    run_on_stage(options, work, Preparation(dynamic_int8=not options["exact_quantized"],
                                            fuse_projections=True, cpu_linears="packed"))


def check_limits(limits: Limits, port: int):
    for name in ("max_batch", "max_tokens", "max_body_bytes"):
        if getattr(limits, name) < 1:
            raise BadInput(f"--{name}={getattr(limits, name)} must be at least 1")
    if not limits.idle_timeout_s > 0 or limits.max_connections < 1:  # "not >": NaN is refused
        raise BadInput(f"--idle_timeout_s={limits.idle_timeout_s:g} must be > 0 and "
                       f"--max_connections={limits.max_connections} at least 1")
    if limits.max_wait_ms < 0 or limits.max_prompt_tokens < 0 or not 0 <= port <= 65535:
        raise BadInput(f"--max_wait_ms={limits.max_wait_ms:g} and --max_prompt_tokens="
                       f"{limits.max_prompt_tokens} must be >= 0, --port={port} in 0..65535")


def load_served(ctx, model, named: dict):
    """({name: the tuning on this stage}, {name: Served}) for --prompts: rank 0 reads and checks
    every folder, and every stage keeps the tensors of its own layers."""
    loaded = {name: load_tuning(folder, model.args) for name, folder in named.items()} \
        if ctx.rank == 0 else None
    loaded = ctx.broadcast_object(loaded)
    check_templates({name: info.get("template") for name, (_, _, info) in loaded.items()}, named)
    tunings = {name: apply_saved(model, method, tensors, ctx.is_first, info)
               for name, (method, tensors, info) in loaded.items()}
    served = {name: Served(name, tunings[name].n_virtual, info.get("template"))
              for name, (_, _, info) in loaded.items()}
    return tunings, served


def required_api_key(api_key):
    """--api_key, else $LLAMA_API_KEY, else None (no key); an empty one is a mistake, not a wish
    to serve without a key (an unset variable in a script)."""
    from_env = api_key is None
    api_key = os.environ.get("LLAMA_API_KEY") if from_env else api_key
    if api_key is not None and not str(api_key).strip():
        where = "$LLAMA_API_KEY is set but empty" if from_env else "--api_key is empty"
        raise BadInput(f"{where}: give a key, or leave it out to serve without one")
    return None if api_key is None else str(api_key).strip()


def check_templates(templates: dict, named: dict):
    """A served prompt's template is checked now, not at its first chat request."""
    for name, template in templates.items():
        try:
            format_prompt({"instruction": ""}, template or DEFAULT_TEMPLATE)
        except BadInput as error:
            raise BadInput(f"--prompts {name}={named[name]}: its tuning.json has an {error} "
                           "(its \"template\")") from None


def names(text) -> tuple:
    """'a,b' (or a list) -> ('a', 'b')."""
    items = text if isinstance(text, (list, tuple)) else str(text or "").split(",")
    return tuple(i.strip() for i in items if str(i).strip())


if __name__ == "__main__":
    run_cli(main)
