"""What every benchmark shares: starting its stages as processes, clocks, memory, output.

A benchmark asked for n > 1 stages starts itself again under torch.distributed.run (one process
per stage, on this machine) unless torchrun already started it; rank 0 prints the JSON lines
and the table.
"""
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def started_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def relaunch_as_stages(module: str, n_stages: int) -> int:
    """Run `python -m module <this command's arguments>` as n_stages processes; their exit code.

    --standalone gives the group a free port on this machine; for several machines, start the
    module with torchrun yourself (it then runs as it is and does not start itself again).
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(n_stages), "-m", module, *sys.argv[1:]]
    sys.stdout.flush()
    return subprocess.call(command, cwd=REPO)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall time of device work: synchronises before each reading."""

    def __init__(self, device):
        self.device = device

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()


class StepTimer:
    """Wall time (device synchronised) and the process's CPU time of the steps run inside it,
    each step ended by lap().

    The CPU time counts every thread of the process. On a shared CPU, where other work takes
    turns on the cores, it tells what the steps cost when the wall time says how long they
    waited too; the fastest step is the one least disturbed."""

    def __init__(self, device):
        self.clock, self.walls, self.cpus = Clock(device), [], []

    def __enter__(self):
        self.started, self.cpu_started = self.clock.now(), time.process_time()
        return self

    def lap(self):
        now, cpu_now = self.clock.now(), time.process_time()
        self.walls.append(now - self.started)
        self.cpus.append(cpu_now - self.cpu_started)
        self.started, self.cpu_started = now, cpu_now

    def __exit__(self, *exc):
        pass

    def record(self, tokens_per_step: int) -> dict:
        step_s, cpu_s = sum(self.walls) / len(self.walls), sum(self.cpus) / len(self.cpus)
        return {"step_time_s": step_s, "tokens_per_s": tokens_per_step / step_s,
                "fastest_step_s": min(self.walls),
                "tokens_per_s_fastest": tokens_per_step / min(self.walls),
                "cpu_s_per_step": cpu_s, "tokens_per_cpu_s": tokens_per_step / cpu_s}


def resident_gib() -> float:
    """The process's resident memory now (Linux; 0 where /proc does not say)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20  # KiB
    except OSError:
        pass
    return 0.0


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device) -> float:
    """The process's peak: allocated GPU memory since the last reset, or the CPU's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def peak_reserved_gib(device):
    """The caching allocator's peak reservation (what the process holds from the GPU, short of
    the CUDA context itself); None on a CPU."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_reserved(device) / 2**30, 3)


def peak_memory_kind(device) -> str:
    return ("cuda max_memory_allocated since the configuration's model was built"
            if device.type == "cuda" else "CPU peak RSS of the process so far (not resettable)")


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo
                          if line.startswith("model name")), "")
    except OSError:
        pass
    return f"CPU ({model or platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def last_level_cache_bytes() -> int:
    """The largest CPU cache this Linux reports for cpu0 (0 where it reports none)."""
    sizes = [0]
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes)


def environment(device) -> dict:
    return {"device": str(device), "device_name": device_name(device), "torch": torch.__version__,
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "date": time.strftime("%Y-%m-%d")}


def emit(record: dict):
    """One JSON line on stdout (the machine-readable result)."""
    print(json.dumps(record), flush=True)


def print_table(records: list, columns: list):
    """A short fixed-width table of some fields of the records, after the JSON lines."""
    if not records:
        return
    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, (list, tuple)):
            return "/".join(cell(v) for v in value) or "-"
        return "-" if value is None or value == "" else str(value)
    rows = [[cell(r.get(c)) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    sys.stdout.flush()


def as_list(value) -> list:
    """An argument that may be one value or several: the command line makes `--micro_batch 1,2,4`
    a tuple, but leaves `--schedule gpipe,1f1b` a string (1f1b is no Python literal)."""
    if isinstance(value, str):
        return value.split(",")
    return list(value) if isinstance(value, (list, tuple)) else [value]


def ratio(numerator, denominator):
    """numerator / denominator, or None where either figure is missing."""
    return numerator / denominator if numerator and denominator else None


def hf_missing():
    """None when transformers and peft are importable, else why not (a line for the output)."""
    import importlib
    try:
        importlib.import_module("peft")
        importlib.import_module("transformers")
    except ImportError as error:
        return f"transformers + peft are not installed ({error}); the HF comparison was skipped"
    return None


def autograd_saved_bytes(run, left_out=()) -> int:
    """Bytes of the distinct tensors autograd saves while run() executes, tensors in left_out (the
    frozen weights, shared tables) excluded: what llama/training/memory.py's arithmetic is checked against."""
    skip = {t.data_ptr() for t in left_out}
    saved = {}

    def pack(tensor):
        if tensor.data_ptr() not in skip:
            saved[tensor.data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(saved.values())
