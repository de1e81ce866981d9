"""Requests/s and tokens/s of serve.py's server at several concurrencies: continuous batching
(requests join the running batch at any step), static batching (a batch runs to its end before
the next starts) and one request at a time.

    python -m bench.serve_bench --ckpt_dir ../shared/assets/stories260K/stories260K.bin

An in-process server on 127.0.0.1 (port 0) with real HTTP clients (threads, http.client); every
client sends its requests one after another. Prints one JSON line per configuration, then a table.
"""
import http.client
import json
import sys
import threading
import time

import torch

from bench.common import as_list
from llama.formats.checkpoint import find_tokenizer, load_model
from llama.parallel.distributed import DistContext
from llama.cli import run_cli
from llama.parallel.pipeline import Stage
from llama.serving.engine import Engine
from llama.serving.http import Limits, Served, Server, Service
from llama.tuning.methods import apply_saved
from llama.model.tokenizer import Tokenizer


def client(port, n_requests, max_tokens, tokens):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    for i in range(n_requests):
        # Long and short replies alternate: a static batch waits for its longest row, a
        # continuous one gives a finished row's place to the next request at once.
        body = {"model": "base" if i % 2 else "p", "prompt": "Once upon a time", "temperature": 0,
                "max_tokens": max_tokens if i % 2 else max(max_tokens // 4, 1)}
        connection.request("POST", "/v1/completions", body=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        answer = json.loads(response.read())
        if response.status != 200:  # the measure below then finds this request missing
            print(f"request refused ({response.status}): {answer}", file=sys.stderr)
            break
        tokens.append(answer["usage"]["completion_tokens"])
    connection.close()


def measure(model, tokenizer, tunings, concurrency, max_batch, requests_per_client, max_tokens,
            continuous: bool = True):
    served = {name: Served(name, t.n_virtual) for name, t in tunings.items()}
    service = Service(tokenizer, served, "base", model.args.max_seq_len,
                      Limits(max_tokens=max_tokens, max_batch=max_batch, max_wait_ms=5,
                             continuous=continuous))
    server = Server(service, "127.0.0.1", 0)
    engine = Engine(Stage(model, DistContext()), tunings, max_rows=max_batch)
    runner = threading.Thread(target=server.run, args=(engine, 0.2))
    runner.start()
    tokens = []
    threads = [threading.Thread(target=client, args=(server.port, requests_per_client, max_tokens,
                                                     tokens)) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    server.stop()
    runner.join()
    engine.close()
    if len(tokens) != concurrency * requests_per_client:
        raise SystemExit(f"serve_bench: {concurrency * requests_per_client - len(tokens)} of "
                         f"{concurrency * requests_per_client} requests got no answer (see above)")
    return {"concurrency": concurrency, "max_batch": max_batch,
            "batching": "continuous" if continuous else "static", "requests": len(tokens),
            "requests_per_s": round(len(tokens) / elapsed, 2),
            "tokens_per_s": round(sum(tokens) / elapsed, 1), "seconds": round(elapsed, 2),
            "largest_batch": service.stats["largest_batch"], "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}


def main(ckpt_dir: str, concurrency=(1, 4, 16), requests_per_client: int = 4,
         max_tokens: int = 32, threads: int = 1):
    """Requests/s and tokens/s of serve.py's server: continuous and static batching, and one
    request at a time.

    ckpt_dir: the model: a llama2.c .bin, a split, Meta or Hugging Face folder
    concurrency: how many clients send at once: one number, or several as 1,4,16
    requests_per_client: the requests each client sends, one after another
    max_tokens: the most tokens of the long replies (the short ones: a quarter)
    threads: torch's CPU threads
    """
    torch.set_num_threads(threads)
    model = load_model(ckpt_dir)
    tokenizer = Tokenizer(find_tokenizer(ckpt_dir))
    weight = torch.randn(8, model.args.dim) * float(model.tok_embeddings.weight.std())
    tunings = {"p": apply_saved(model, "prompt", {"prompt": weight}, True)}
    measure(model, tokenizer, tunings, 1, 1, 2, max_tokens)  # warm-up: first calls are slower
    rows = []
    for c in as_list(concurrency):
        # continuous, static, then one request at a time (where batching cannot matter)
        for max_batch, continuous in ((c, True), (c, False), (1, True)):
            if max_batch == 1 and (c, 1) in {(r["concurrency"], r["max_batch"]) for r in rows}:
                continue
            rows.append(measure(model, tokenizer, tunings, c, max_batch, requests_per_client,
                                max_tokens, continuous))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| concurrency | max_batch | batching | requests/s | tokens/s |\n"
          "| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['concurrency']} | {r['max_batch']} | {r['batching']} | "
              f"{r['requests_per_s']} | {r['tokens_per_s']} |")


if __name__ == "__main__":
    run_cli(main)
