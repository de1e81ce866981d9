"""Start N real processes the way torchrun does (RANK, WORLD_SIZE, a rendezvous on 127.0.0.1)."""
import os
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, n_procs: int, port: int, extra_env=None) -> dict:
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n_procs),
            "LOCAL_WORLD_SIZE": str(n_procs), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO,
            **(extra_env or {})}


def launch(argv, n_procs: int, timeout_s: float = 120, extra_env=None):
    """Run `python argv...` as ranks 0..n-1; return [(returncode, stdout, stderr)] per rank.

    Output goes to files, not pipes, so a rank that prints a lot can never block on a full pipe
    while we wait for another. Every process is killed if the whole group is not done in time.
    """
    port = free_port()
    with tempfile.TemporaryDirectory() as logs:
        procs, files = [], []
        for rank in range(n_procs):
            out = open(os.path.join(logs, f"{rank}.out"), "w+")
            err = open(os.path.join(logs, f"{rank}.err"), "w+")
            files.append((out, err))
            procs.append(subprocess.Popen([sys.executable, *argv], cwd=REPO, text=True,
                                          env=rank_env(rank, n_procs, port, extra_env),
                                          stdout=out, stderr=err))
        deadline = time.monotonic() + timeout_s
        try:
            for p in procs:
                try:
                    p.wait(timeout=max(deadline - time.monotonic(), 1))
                except subprocess.TimeoutExpired:
                    break
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        results = []
        for p, (out, err) in zip(procs, files):
            out.seek(0)
            err.seek(0)
            results.append((p.returncode, out.read(), err.read()))
            out.close()
            err.close()
    return results


def check_all_ok(results):
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}\nstdout:\n{out}\nstderr:\n{err}"
