"""Worker: ft_main.py as one rank of a fault test, telling the test its pid and pacing its steps.

Run under torchrun (or tests/launch.py) with ft_main's own arguments plus --rank_dir: rank r
writes its pid to <rank_dir>/rank<r>.pid before anything else, so the test can signal that very
rank, and sends its stdout and stderr to rank<r>.out and rank<r>.err, so the test can read what
each rank said. --step_delay_s sleeps before each training step (the numbers do not change), so
that a signal sent "in the middle of training" lands there on a slow machine and a fast one alike.
"""
import os
import sys
import time
from pathlib import Path

import ft_main
from llama.training import train
from llama.cli import run_cli


def main(rank_dir, step_delay_s: float = 0.0, **ft_args):
    rank = int(os.environ.get("RANK", 0))
    folder = Path(rank_dir)
    for stream, suffix in ((sys.stdout, "out"), (sys.stderr, "err")):
        stream.flush()
        with open(folder / f"rank{rank}.{suffix}", "w") as file:
            os.dup2(file.fileno(), stream.fileno())
    pid_file = folder / f"rank{rank}.pid"
    pid_file.with_suffix(".tmp").write_text(str(os.getpid()))
    os.replace(pid_file.with_suffix(".tmp"), pid_file)  # the test never reads half a number
    real_step = train.run_train_step

    def paced_step(stage, batches, cfg, scale, ctx):
        time.sleep(step_delay_s)
        return real_step(stage, batches, cfg, scale, ctx)

    train.run_train_step = paced_step
    return ft_main.main(**ft_args)


if __name__ == "__main__":
    run_cli(main)
