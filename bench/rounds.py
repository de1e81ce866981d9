"""The sides of a comparison, each measured in a process of its own, alternated round by round.

On a CPU a process's peak memory (its peak RSS) cannot be reset, so one process per measurement
is the only way to give each side its own peak; and on a shared machine a slow moment should
slow both sides of a round rather than all of one side, so the rounds alternate the sides (and
which of them goes first). Summaries are medians with min-max, and ratios paired by round.
"""
import json
import os
import statistics
import subprocess
import sys

from bench import common


def command_line(module: str, options: dict) -> list:
    """`python -m module --name value ...` for every option that is not None; lists and tuples
    as comma-separated values, as the command line reads them back."""
    argv = [sys.executable, "-m", module]
    for name, value in options.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple, set, frozenset)):
            value = ",".join(str(v) for v in value)
        argv += [f"--{name}", str(value)]
    return argv


def run_side(module: str, options: dict, timeout_s: float) -> list:
    """The JSON records one process of `module` prints with these options. Its other lines are
    dropped; a failure ends the comparison with the process's own output."""
    done = subprocess.run(command_line(module, options), cwd=common.REPO, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{module} {options} exited with {done.returncode}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def alternate(module: str, sides: dict, rounds: int, timeout_s: float) -> dict:
    """{side name: [its records of round 0, of round 1, ...]}: every side once a round, each in
    a new process, in the given order on even rounds and the reverse on odd ones."""
    results = {name: [] for name in sides}
    names = list(sides)
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else reversed(names):
            records = run_side(module, sides[name], timeout_s)
            for record in records:
                record["round"] = round_index
                common.emit(record)
            results[name].append(records)
    return results


def spread(values: list, prefix: str) -> dict:
    """{prefix_median, prefix_min, prefix_max} of the values that are there (None left out)."""
    values = [v for v in values if v is not None]
    if not values:
        return {f"{prefix}_median": None, f"{prefix}_min": None, f"{prefix}_max": None}
    return {f"{prefix}_median": statistics.median(values), f"{prefix}_min": min(values),
            f"{prefix}_max": max(values)}


def paired_ratios(mine: list, theirs: list, prefix: str) -> dict:
    """spread() of mine[r] / theirs[r]: each round's ratio, so one round's load slows both."""
    return spread([common.ratio(a, b) for a, b in zip(mine, theirs)], prefix)
