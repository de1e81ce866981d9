"""Worker: ranks that keep agreeing on a number (an all-reduce) until one of them is lost.

Run as a group of ranks (tests/launch.py). Rank --victim kills itself (--how kill: SIGKILL) or
stops itself (--how stop: SIGSTOP) at round --at, inside the loop of collectives, so the others
lose it in the middle of a collective; they must stop with one line naming the lost stage.
Every rank first writes its pid to <rank_dir>/rank<r>.pid.
"""
import itertools
import os
import signal
from pathlib import Path

from llama.cli import run_cli

from llama.parallel.distributed import init_distributed
from llama.parallel.faults import PeerLost, report_and_exit


def main(rank_dir, victim: int = 1, at: int = 20, how: str = "kill", timeout_s: float = 60):
    ctx = init_distributed(device="cpu", timeout_s=timeout_s)
    (Path(rank_dir) / f"rank{ctx.rank}.pid").write_text(str(os.getpid()))
    ctx.barrier()  # every pid file is written before anyone can be lost
    try:
        for round_ in itertools.count():
            if ctx.rank == victim and round_ == at:
                os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
            ctx.all_reduce_max([round_])
    except PeerLost as error:
        report_and_exit(error, ctx.rank)


if __name__ == "__main__":
    run_cli(main)
