"""What a rank does when the job breaks: name the stage at fault in one line, then stop.

A rank whose send, receive or collective fails notes in the job's store whom it lost and reads
what the others noted, so that it can blame the right stage: the peer itself, the stage that peer
lost in turn, the stages that noted nothing (died or stalled), or a stage that stopped with an
error of its own (llama/cli.py notes that through note_own_error). The line ends the rank and is
written where torchrun's agent looks for a worker's error.
"""
import json
import os
import sys
import time
from datetime import timedelta

import torch.distributed as dist

NAMING_WAIT_S = 5.0  # how long a rank that lost a collective waits for the others to report


class PeerLost(RuntimeError):
    """A neighbouring stage stopped answering (crashed, killed, or stalled past the timeout)."""


def short_cause(error) -> str:
    """'Connection closed by peer [127.0.0.1]:23957' from gloo's long '[pair.cc:553] ... GLHF!'."""
    line = str(error).splitlines()[0] if str(error) else type(error).__name__
    if line.startswith("[") and "] " in line:
        line = line.split("] ", 1)[1]
    return line.split(". ")[0]


def stage_named(ctx, rank: int) -> str:
    """'2' for rank 2 of a pipeline alone; '1 (rank 2)' in a grid of stages x TP ranks."""
    tp = getattr(ctx, "tp_size", 1)
    return str(rank) if tp == 1 else f"{rank // tp} (rank {rank})"


def stopped_with_its_own_error(ctx, rank: int) -> str:
    return (f"stage {stage_named(ctx, rank)} stopped with an error of its own (its error line "
            "comes first); this stage stops with it")


# ---- the two ways a rank loses the others ----

def peer_lost(ctx, error, peer: int, doing: str) -> PeerLost:
    """The error for a failed send to / receive from `peer` (doing: "sending to", ...)."""
    lost, failed = report_down(ctx, peer)
    where = f"rank {ctx.rank} (stage {ctx.stage}) failed {doing} stage {stage_named(ctx, peer)}"
    if lost in failed:
        return PeerLost(f"{where}: {stopped_with_its_own_error(ctx, lost)}")
    blame = f"Stage {stage_named(ctx, peer)} has probably died or stalled"
    if lost != peer:  # the peer gave up first, because it had lost another stage
        blame = (f"Stage {stage_named(ctx, peer)} stopped because it lost stage "
                 f"{stage_named(ctx, lost)}, which has probably died or stalled")
    return PeerLost(f"{where}: {short_cause(error)}. {blame} longer than --timeout_s="
                    f"{ctx.timeout_s:g}; see its log")


def collective_failed(ctx, error) -> PeerLost:
    """The error for a failed collective: it cannot say whom it lost, so it asks the store."""
    silent, failed = report_down(ctx, None)
    if failed:
        return PeerLost(f"rank {ctx.rank} (stage {ctx.stage}) stopped: "
                        f"{stopped_with_its_own_error(ctx, failed[0])}")
    named = ""
    if silent:
        stages = ", ".join(stage_named(ctx, r) for r in silent)
        named = (f": stage{'s' if len(silent) > 1 else ''} {stages}, which did not report an "
                 "error of its own")
    return PeerLost(f"rank {ctx.rank} (stage {ctx.stage}): a collective with the other stages "
                    f"failed ({short_cause(error)}); another stage has probably died or stalled"
                    f"{named}; see its log")


# ---- notes in the job's store ----

def fault_notes(store) -> dist.PrefixStore:
    """Our keys in the job's store, apart from the process group's and per torchrun attempt
    (the agent's store outlives a restart): down/<rank> = the stage it lost ("" after a
    collective), done/<rank> = it has read its answer, failed/<rank> = an error of its own."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"llama/faults/{attempt}", store)


def report_down(ctx, peer):
    """Note that this rank gives up, then find the stage at fault: (lost, ranks that failed with
    an error of their own).

    A stage that noted nothing died or stalled. After losing `peer`, lost is the peer itself or,
    if the peer gave up too, the stage it lost (followed along the chain); after a failed
    collective (peer None), lost lists the ranks still silent after a few seconds. Without the
    store (it went down with its host) only the peer can be named.
    """
    unknown = (peer if peer is not None else []), []
    if ctx.store is None:
        return unknown
    store, wait_s = fault_notes(ctx.store), min(ctx.timeout_s, NAMING_WAIT_S)
    try:
        store.set_timeout(timedelta(seconds=wait_s))
        store.set(f"down/{ctx.rank}", "" if peer is None else str(peer))
        lost = follow_chain(store, ctx.rank, peer) if peer is not None else \
            silent_ranks(store, ctx.rank, ctx.world_size, time.monotonic() + wait_s)
        failed = [r for r in range(ctx.world_size) if store.check([f"failed/{r}"])]
        store.set(f"done/{ctx.rank}", "")
    except (RuntimeError, ValueError):
        return unknown
    if ctx.rank == 0:
        linger(store, ctx.world_size, time.monotonic() + wait_s)
    return lost, failed


def follow_chain(store, rank: int, peer: int) -> int:
    lost, seen = peer, {rank, peer}
    while store.check([f"down/{lost}"]) and not store.check([f"failed/{lost}"]):
        verdict = store.get(f"down/{lost}").decode()
        if not verdict or int(verdict) in seen:  # lost in a collective, or a cycle
            break
        lost = int(verdict)
        seen.add(lost)
    return lost


def silent_ranks(store, rank: int, world_size: int, deadline: float) -> list:
    while True:
        silent = [r for r in range(world_size) if r != rank and not store.check([f"down/{r}"])
                  and not store.check([f"failed/{r}"])]
        if len(silent) <= 1 or time.monotonic() > deadline:
            return silent
        time.sleep(0.1)


def linger(store, world_size: int, deadline: float):
    """Rank 0 may be the process that holds the store (torchrun's agent holds it, a plain
    launch gives it to rank 0): it stays until every rank that reported has read its answer."""
    try:
        while time.monotonic() < deadline:
            if all(store.check([f"done/{r}"]) or not store.check([f"down/{r}"])
                   for r in range(world_size)):
                return
            time.sleep(0.05)
    except RuntimeError:
        pass


# ---- stopping ----

def note_own_error(line: str) -> bool:
    """A rank stops with an error of its own (a BadInput): write its line for torchrun and, if
    it joined a process group, say so in the job's store, so the stages that lose it name it as
    the one that failed instead of as a silent one. True when it had joined one.

    Under torchrun the agent holds the store, which outlives us; in a plain launch rank 0 holds
    it and its peers only notice it left once it has exited, so there rank 0's note dies with it.
    """
    write_torchrun_error_file(line)
    if not dist.is_initialized():
        return False
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              is_master=False, timeout=timedelta(seconds=NAMING_WAIT_S))
        fault_notes(store).set(f"failed/{dist.get_rank()}", "")
    except (RuntimeError, ValueError, KeyError):
        pass
    return True


def report_and_exit(error: PeerLost, rank: int):
    """A lost peer ends this rank with its message (non-zero exit, no traceback)."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    write_torchrun_error_file(f"error: {error}")
    os._exit(3)  # the process group's threads may still wait on the dead peer; don't join them


def write_torchrun_error_file(line: str):
    """Under torchrun, write this rank's error where its agent reads it (the file named by
    TORCHELASTIC_ERROR_FILE, in the layout of torch.distributed.elastic's ErrorHandler), so
    torchrun's summary quotes this one line as the root cause instead of a traceback."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": line, "extraInfo": {
        "py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as file:
            json.dump(data, file)
    except OSError:
        pass  # the summary then says less; the line itself is already on stderr
