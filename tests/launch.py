"""Start N real processes the way torchrun does (RANK, WORLD_SIZE, a rendezvous on 127.0.0.1)."""
import os
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv, n_procs: int, timeout_s: float = 120, extra_env=None):
    """Run `python argv...` as ranks 0..n-1; return [(returncode, stdout, stderr)] per rank.

    Every process is killed if the whole group has not finished within timeout_s.
    """
    port = free_port()
    procs = []
    for rank in range(n_procs):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n_procs),
               "LOCAL_WORLD_SIZE": str(n_procs), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO,
               **(extra_env or {})}
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, cwd=REPO, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    deadline = time.monotonic() + timeout_s
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def check_all_ok(results):
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}\nstdout:\n{out}\nstderr:\n{err}"
