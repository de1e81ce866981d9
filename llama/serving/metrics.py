"""What the server counts, served at /metrics in Prometheus' text format, and its access log line.

Counters: requests by status, prompt and completion tokens. Gauges: requests waiting, rows in
the batch and the batch's capacity. Histograms: time to first token and time per output token
(each gap between two ids of a reply). The generation thread and the HTTP threads both write,
so every change holds one lock.
"""
import threading
import time

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS_S):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)  # per bucket, not cumulative
        self.total, self.count = 0.0, 0

    def observe(self, value: float):
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list:
        out, running = [], 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total:.6f}",
                f"{name}_count {self.count}"]
        return out


class Metrics:
    """Every number /metrics shows, changed under one lock."""

    def __init__(self, capacity: int):
        self.lock = threading.Lock()
        self.requests = {}  # HTTP status -> count
        self.prompt_tokens = self.completion_tokens = 0
        self.queue_length = self.batch_rows = 0
        self.capacity = capacity
        self.steps = self.row_steps = 0  # decode steps, and rows summed over them
        self.ttft = Histogram()
        self.per_token = Histogram()

    def request_done(self, status: int, prompt_tokens: int, completion_tokens: int):
        with self.lock:
            self.requests[status] = self.requests.get(status, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens

    def step(self, rows: int, waiting: int):
        with self.lock:
            self.batch_rows, self.queue_length = rows, waiting
            if rows:
                self.steps += 1
                self.row_steps += rows

    def first_token(self, seconds: float):
        with self.lock:
            self.ttft.observe(seconds)

    def next_token(self, seconds: float):
        with self.lock:
            self.per_token.observe(seconds)

    def text(self) -> str:
        """The Prometheus text exposition (version 0.0.4)."""
        with self.lock:
            lines = ["# HELP llama_requests_total Requests answered, by HTTP status.",
                     "# TYPE llama_requests_total counter"]
            lines += [f'llama_requests_total{{status="{s}"}} {n}'
                      for s, n in sorted(self.requests.items())]
            lines += counter("llama_prompt_tokens_total", "Prompt tokens of answered requests.",
                             self.prompt_tokens)
            lines += counter("llama_completion_tokens_total", "Tokens generated.",
                             self.completion_tokens)
            lines += gauge("llama_queue_length", "Requests waiting for a row.", self.queue_length)
            lines += gauge("llama_batch_rows", "Rows generating now.", self.batch_rows)
            lines += gauge("llama_batch_capacity", "The most rows at once (--max_batch).",
                           self.capacity)
            lines += counter("llama_decode_steps_total", "Decode steps run.", self.steps)
            lines += counter("llama_decode_rows_total", "Rows summed over decode steps (divided "
                             "by steps and capacity: the mean batch occupancy).", self.row_steps)
            lines += histogram("llama_time_to_first_token_seconds", "From the request's arrival "
                               "to its first generated token.", self.ttft)
            lines += histogram("llama_time_per_output_token_seconds", "Between two generated "
                               "tokens of one reply.", self.per_token)
            return "\n".join(lines) + "\n"


def counter(name: str, meaning: str, value) -> list:
    return [f"# HELP {name} {meaning}", f"# TYPE {name} counter", f"{name} {value}"]


def gauge(name: str, meaning: str, value) -> list:
    return [f"# HELP {name} {meaning}", f"# TYPE {name} gauge", f"{name} {value}"]


def histogram(name: str, meaning: str, values: Histogram) -> list:
    return [f"# HELP {name} {meaning}", f"# TYPE {name} histogram", *values.lines(name)]


def access_line(method: str, path: str, status: int, model=None, prompt_tokens: int = 0,
                completion_tokens: int = 0, ttft_s=None, total_s: float = 0.0,
                finish=None) -> str:
    """One line per request: when, what, how it ended, its tokens and its latencies."""
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    ttft = f"{ttft_s * 1000:.1f}" if ttft_s is not None else "-"
    return (f"{when} {method} {path} status={status} model={model or '-'} "
            f"prompt_tokens={prompt_tokens} completion_tokens={completion_tokens} "
            f"ttft_ms={ttft} total_ms={total_s * 1000:.1f} finish={finish or '-'}")
