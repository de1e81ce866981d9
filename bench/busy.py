"""Keep CPU cores busy, as other work on a shared machine would: the load under which the test
suite must still pass (bench/suite_under_load.sh).

    python bench/busy.py --cores 2 --seconds 3600

Each core gets a process that alternates arithmetic with touching a 64 MiB buffer, so both the
cores and the memory bandwidth are contended. Ends by itself after --seconds, or on SIGTERM.
"""
import argparse
import multiprocessing
import os
import signal
import sys
import time


def keep_busy(until: float, parent: int):
    buffer = bytearray(64 << 20)
    total, step = 0, 4096
    while time.monotonic() < until and os.getppid() == parent:  # never outlive the parent
        for _ in range(200_000):
            total = (total * 1103515245 + 12345) & 0xFFFFFFFF
        for offset in range(0, len(buffer), step):  # one write a page: the caches are evicted
            buffer[offset] = total & 0xFF


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=multiprocessing.cpu_count())
    parser.add_argument("--seconds", type=float, default=3600.0)
    args = parser.parse_args()
    until = time.monotonic() + args.seconds
    # SIGTERM ends the parent normally, and with it (daemon) the workers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    workers = [multiprocessing.Process(target=keep_busy, args=(until, os.getpid()), daemon=True)
               for _ in range(args.cores)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


if __name__ == "__main__":
    main()
