"""Continuous against static batching in serve.py's server: requests/s, generated tokens/s and time
to first token at several numbers of concurrent streaming clients that arrive staggered.

    OMP_NUM_THREADS=1 python -m bench.serve_bench --ckpt_dir ../shared/assets/stories260K/stories260K.bin

This process runs the real server (Service, Server, Engine on 127.0.0.1, a free port; its
generation loop and HTTP threads, as serve.py does); the clients run in another process
(bench/serve_clients.py), so they never wait for this interpreter. The two modes alternate run
by run (repeats), so a machine that gets busier slows both alike; tokens per second of this
process's CPU time (what the serving cost, less moved by other work than wall time) beside them.
One JSON line per run, then a table of medians with min-max.
"""
import json
import random
import subprocess
import sys
import threading
import time

import torch

from bench.common import REPO, as_list, device_name
from llama.cli import run_cli
from llama.formats.checkpoint import find_tokenizer, load_model
from llama.model.tokenizer import Tokenizer
from llama.parallel.distributed import DistContext
from llama.parallel.pipeline import Stage
from llama.serving.engine import Engine
from llama.serving.http import Limits, Served, Server, Service
from llama.tuning.methods import apply_saved

TEXTS = ("Once upon a time", "Tom and Lily went to the park. They saw", "The cat",
         "One day, a little girl named Sue")
MODES = ("continuous", "static")


def client_plan(concurrency: int, requests_per_client: int, max_tokens: int, stagger_ms: float,
                seed: int = 0) -> list:
    """Client k starts k * stagger_ms after the first and sends its requests one after another:
    greedy completions of mixed lengths (a static batch waits for its longest row) that
    alternate the soft prompt and the base model (a batch mixes them)."""
    pick = random.Random(seed)
    return [{"start_s": k * stagger_ms / 1000, "requests": [
        {"model": "p" if (k + i) % 2 else "base", "prompt": pick.choice(TEXTS), "temperature": 0,
         "max_tokens": pick.randint(max(max_tokens // 8, 1), max_tokens)}
        for i in range(requests_per_client)]} for k in range(concurrency)]


def measure(model, tokenizer, tunings, clients: list, max_batch: int, mode: str) -> dict:
    """One run: a fresh server in this process, the clients in another; what they saw."""
    served = {name: Served(name, t.n_virtual) for name, t in tunings.items()}
    longest = max(r["max_tokens"] for c in clients for r in c["requests"])
    service = Service(tokenizer, served, "base", model.args.max_seq_len,
                      Limits(max_tokens=longest, max_batch=max_batch,
                             max_connections=len(clients) + 8, continuous=mode == "continuous"))
    server = Server(service, "127.0.0.1", 0)
    engine = Engine(Stage(model, DistContext()), tunings, max_rows=max_batch)
    runner = threading.Thread(target=server.run, args=(engine, 0.2))
    cpu_before = time.process_time()  # this process only serves meanwhile: the server's CPU time
    runner.start()
    try:
        done = subprocess.run([sys.executable, "-m", "bench.serve_clients"], cwd=REPO,
                              input=json.dumps({"port": server.port, "clients": clients}),
                              capture_output=True, text=True, timeout=3600)
    finally:
        server.stop()
        runner.join()
        engine.close()
    server_cpu_s = time.process_time() - cpu_before
    if done.returncode != 0:
        raise SystemExit(f"serve_bench: the clients failed:\n{done.stderr}")
    requests = json.loads(done.stdout)["requests"]
    failed = [r["error"] for r in requests if r["error"] or r["tokens"] is None]
    if failed:
        raise SystemExit(f"serve_bench: {len(failed)} of {len(requests)} requests failed: "
                         f"{failed[0]}")
    return summary(requests, service, len(clients), max_batch, mode, server_cpu_s)


def summary(requests: list, service, concurrency: int, max_batch: int, mode: str,
            server_cpu_s: float) -> dict:
    elapsed = max(r["end"] for r in requests) - min(r["sent"] for r in requests)
    ttft = [r["first"] - r["sent"] for r in requests if r["first"] is not None]
    tokens = sum(r["tokens"] for r in requests)
    metrics = service.metrics
    return {"concurrency": concurrency, "max_batch": max_batch, "batching": mode,
            "requests": len(requests), "tokens": tokens, "seconds": round(elapsed, 3),
            "requests_per_s": round(len(requests) / elapsed, 2),
            "tokens_per_s": round(tokens / elapsed, 1),
            "ttft_p50_ms": round(percentile(ttft, 50) * 1000, 1),
            "ttft_p99_ms": round(percentile(ttft, 99) * 1000, 1),
            "server_cpu_s": round(server_cpu_s, 3),
            "tokens_per_cpu_s": round(tokens / server_cpu_s, 1),
            "decode_steps": metrics.steps,
            "mean_rows": round(metrics.row_steps / max(metrics.steps, 1), 2),
            "largest_batch": service.stats["largest_batch"]}


def percentile(values: list, q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    at = (len(ordered) - 1) * q / 100
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def spread(values: list, decimals: int = None) -> str:
    """median [min-max], to 4 significant digits or to the decimals given"""
    form = f".{decimals}f" if decimals is not None else ".4g"
    return (f"{percentile(values, 50):{form}} [{min(values):{form}}-{max(values):{form}}]")


def print_table(runs: list):
    fields = ("requests_per_s", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tokens_per_cpu_s")
    print("\nmedian [min-max] over the repeats\n\n| clients | batching | requests/s | tokens/s | "
          "TTFT p50 ms | TTFT p99 ms | tokens per server CPU s | mean rows |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    for concurrency in dict.fromkeys(r["concurrency"] for r in runs):
        for mode in MODES:
            mine = [r for r in runs if (r["concurrency"], r["batching"]) == (concurrency, mode)]
            cells = " | ".join(spread([r[f] for r in mine]) for f in fields)
            rows = percentile([r["mean_rows"] for r in mine], 50)
            print(f"| {concurrency} | {mode} | {cells} | {rows:.3g} |")
    print("\ncontinuous / static in runs side by side, median [min-max] (the issue's target at "
          "16 clients: requests/s >= 1, TTFT p99 <= 0.33)\n")
    for concurrency in dict.fromkeys(r["concurrency"] for r in runs):
        pairs = list(zip(*([r for r in runs if (r["concurrency"], r["batching"]) ==
                            (concurrency, mode)] for mode in MODES)))
        rate, ttft, cpu = (spread([c[f] / s[f] for c, s in pairs], 2) for f in
                           ("requests_per_s", "ttft_p99_ms", "tokens_per_cpu_s"))
        print(f"{concurrency} clients: requests/s {rate}, TTFT p99 {ttft}, tokens per server "
              f"CPU s {cpu}")


def main(ckpt_dir: str, concurrency=(1, 4, 16, 64), requests_per_client: int = 8,
         max_tokens: int = 64, max_batch: int = 16, stagger_ms: float = 25.0, repeats: int = 3,
         threads: int = 1):
    """Continuous against static batching in serve.py's server, side by side in one run.

    ckpt_dir: the model: a llama2.c .bin, a split, Meta or Hugging Face folder
    concurrency: how many clients send at once: one number, or several as 1,4,16,64
    requests_per_client: the streamed completions each client sends, one after another
    max_tokens: the longest reply asked for (each asks for 1/8 of it to all of it)
    max_batch: the server's --max_batch (the most rows generated together)
    stagger_ms: client k starts k * stagger_ms after the first
    repeats: runs of each mode per concurrency, alternating continuous and static
    threads: torch's CPU threads
    """
    torch.set_num_threads(threads)
    model = load_model(ckpt_dir)
    tokenizer = Tokenizer(find_tokenizer(ckpt_dir))
    weight = torch.randn(8, model.args.dim, generator=torch.Generator().manual_seed(0))
    tunings = {"p": apply_saved(model, "prompt",
                                {"prompt": weight * float(model.tok_embeddings.weight.std())}, True)}
    for mode in MODES:  # warm-up: first calls are slower
        measure(model, tokenizer, tunings, client_plan(2, 1, 4, 0), 2, mode)
    print(json.dumps({"machine": device_name(torch.device("cpu")), "torch": torch.__version__,
                      "threads": threads, "date": time.strftime("%Y-%m-%d")}), flush=True)
    runs = []
    for clients in as_list(concurrency):
        plan = client_plan(clients, requests_per_client, max_tokens, stagger_ms)
        for repeat in range(repeats):
            for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
                runs.append(measure(model, tokenizer, tunings, plan, max_batch, mode))
                print(json.dumps(runs[-1]), flush=True)
    print_table(runs)


if __name__ == "__main__":
    run_cli(main)
