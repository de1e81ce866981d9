"""The clients of bench/serve_bench.py, in a process of their own (never the server's interpreter):
streaming completions over raw HTTP/1.1, each client's requests one after another, the clients
started at staggered times. Standard library only (asyncio), so it starts in a moment.

    python -m bench.serve_clients < plan.json     # serve_bench.py writes the plan, reads the result

The plan: {"port", "clients": [{"start_s", "requests": [request body, ...]}, ...]}. The result,
one JSON line: per request its send time, time to the first text chunk, end time and
completion tokens (the usage chunk that stream_options include_usage asks for), or its error.
"""
import asyncio
import json
import sys
import time


async def one_request(port: int, body: dict) -> dict:
    """Send one streamed completion; time it from the request's sending."""
    payload = json.dumps({**body, "stream": True,
                          "stream_options": {"include_usage": True}}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = time.perf_counter()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\n"
                 + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    await writer.drain()
    record = {"sent": sent, "first": None, "end": None, "tokens": None, "error": None}
    status = (await reader.readline()).split(b" ", 2)
    while (await reader.readline()).strip():  # the headers: the stream follows them
        pass
    if len(status) < 2 or status[1] != b"200":
        record["error"] = f"HTTP {b' '.join(status[1:]).decode().strip()}: " + \
            (await reader.read()).decode(errors="replace")[:200]
    else:
        async for line in reader:  # the server closes the connection after [DONE]
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[len(b"data: "):])
            if "error" in chunk:
                record["error"] = chunk["error"]["message"]
            elif chunk["choices"] and chunk["choices"][0]["text"] and record["first"] is None:
                record["first"] = time.perf_counter()
            elif chunk.get("usage"):
                record["tokens"] = chunk["usage"]["completion_tokens"]
    record["end"] = time.perf_counter()
    writer.close()
    return record


async def one_client(port: int, start_s: float, requests: list, began: float) -> list:
    await asyncio.sleep(max(began + start_s - time.perf_counter(), 0))
    return [await one_request(port, body) for body in requests]


async def run(plan: dict) -> dict:
    began = time.perf_counter()
    done = await asyncio.gather(*(one_client(plan["port"], c["start_s"], c["requests"], began)
                                  for c in plan["clients"]))
    return {"began": began, "requests": [r for client in done for r in client]}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run(json.load(sys.stdin)))), flush=True)
