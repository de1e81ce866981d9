"""One place for distributed setup: torchrun's environment -> a small context with the transport.

The stage of a rank is its global RANK, its device comes from LOCAL_RANK, so a multi-node launch
works unchanged. nccl when every local rank has its own GPU; gloo otherwise (CPU only, or ranks
sharing a GPU, which NCCL refuses), with tensors staged through CPU memory. Every wait has a
timeout, and a lost peer becomes a clear error naming its stage.
"""
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from llama.errors import BadInput


class PeerLost(RuntimeError):
    """A neighbouring stage stopped answering (crashed, killed, or stalled past the timeout)."""


DOWN_KEY = "llama/down/"  # in the job's store: rank -> the stage it lost ("" when it cannot tell)
DONE_KEY = "llama/done/"  # rank -> it has named the lost stage and needs the store no more
FAILED_KEY = "llama/failed/"  # rank -> it stopped with an error of its own, printed on its stderr
NAMING_WAIT_S = 5.0  # how long a rank that lost a collective waits for the others to report


def short_cause(error) -> str:
    """'Connection closed by peer [127.0.0.1]:23957' from gloo's long '[pair.cc:553] ... GLHF!'."""
    line = str(error).splitlines()[0] if str(error) else type(error).__name__
    if line.startswith("[") and "] " in line:
        line = line.split("] ", 1)[1]
    return line.split(". ")[0]


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = "none"
    timeout_s: float = 300.0
    pending_sends: list = field(default_factory=list)
    _failed: list = field(default_factory=list)  # ranks that reported an error of their own

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    def log(self, *parts):
        """Print on rank 0 only (the others stay quiet rather than being silenced)."""
        if self.rank == 0:
            print(*parts, flush=True)

    # ---- point-to-point transport ----

    def _on_wire(self, tensor):
        return tensor if self.backend == "nccl" else tensor.cpu()

    def send(self, tensor, dst: int):
        """Start sending tensor to rank dst; completion is awaited by flush_sends()."""
        # Sends that have arrived no longer need their tensor: drop them now rather than holding
        # every activation sent this step until its end.
        self.pending_sends = [p for p in self.pending_sends if not p[0].is_completed()]
        wire = self._on_wire(tensor.detach().contiguous())
        self.pending_sends.append((self._start(lambda: dist.isend(wire, dst), dst, "sending to"),
                                   wire, dst))

    def recv(self, shape, dtype, src: int):
        """Receive a tensor of known shape and dtype from rank src, on this rank's device."""
        wire_device = self.device if self.backend == "nccl" else torch.device("cpu")
        buffer = torch.empty(shape, dtype=dtype, device=wire_device)
        work = self._start(lambda: dist.irecv(buffer, src), src, "receiving from")
        self._wait(work, src, "receiving from")
        return buffer.to(self.device, non_blocking=True)

    def flush_sends(self):
        for work, _, dst in self.pending_sends:
            self._wait(work, dst, "sending to")
        self.pending_sends.clear()

    def _start(self, call, peer: int, doing: str):
        """isend/irecv; gloo raises right here when the connection to peer is already gone."""
        try:
            return call()
        except RuntimeError as error:
            raise self._peer_lost(error, peer, doing) from None

    def _wait(self, work, peer: int, doing: str):
        try:
            if self.backend == "gloo":
                work.wait(timedelta(seconds=self.timeout_s))
            else:
                work.wait()
        except RuntimeError as error:
            raise self._peer_lost(error, peer, doing) from None

    def _peer_lost(self, error, peer: int, doing: str) -> PeerLost:
        lost = self._report_down(peer)
        doing = f"rank {self.rank} (stage {self.rank}) failed {doing} stage {peer}"
        if lost in self._failed:
            return PeerLost(f"{doing}: {stopped_with_its_own_error(lost)}")
        blame = f"Stage {peer} has probably died or stalled"
        if lost not in (None, peer):  # the peer gave up first, because it had lost another stage
            blame = (f"Stage {peer} stopped because it lost stage {lost}, which has probably died "
                     "or stalled")
        return PeerLost(f"{doing}: {short_cause(error)}. {blame} longer than --timeout_s="
                        f"{self.timeout_s:g}; see its log")

    # ---- small collectives (control values every rank must agree on) ----

    def all_reduce_max(self, values):
        """The element-wise maximum over all ranks of a list of numbers (every rank gets it)."""
        if not self.distributed:
            return [float(v) for v in values]
        device = self.device if self.backend == "nccl" else torch.device("cpu")
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        self._collective(lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX))
        return t.cpu().tolist()

    def broadcast_object(self, obj, src: int = 0):
        """Every rank gets src's (picklable) object; used for small state such as resume data."""
        if not self.distributed:
            return obj
        box = [obj]
        self._collective(lambda: dist.broadcast_object_list(box, src=src))
        return box[0]

    def broadcast_tensor(self, tensor, src: int):
        """Every rank gets src's tensor (same shape and dtype everywhere)."""
        if not self.distributed:
            return tensor
        wire = self._on_wire(tensor.contiguous())
        self._collective(lambda: dist.broadcast(wire, src))
        return wire.to(self.device)

    def gather_objects(self, obj):
        """Rank 0 gets [obj of rank 0, obj of rank 1, ...]; other ranks get None."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.rank == 0 else None
        self._collective(lambda: dist.gather_object(obj, out, dst=0))
        return out

    def barrier(self):
        if self.distributed:
            self._collective(dist.barrier)

    def _collective(self, call):
        try:
            call()
        except RuntimeError as error:
            silent = self._report_down(None)
            if self._failed:
                raise PeerLost(f"rank {self.rank} (stage {self.rank}) stopped: "
                               f"{stopped_with_its_own_error(self._failed[0])}") from None
            named = ""
            if silent:
                stages = ", ".join(str(r) for r in silent)
                named = (f": stage{'s' if len(silent) > 1 else ''} {stages}, which did not report an "
                         "error of its own")
            raise PeerLost(f"rank {self.rank} (stage {self.rank}): a collective with the other "
                           f"stages failed ({short_cause(error)}); another stage has probably "
                           f"died or stalled{named}; see its log") from None

    def _report_down(self, peer):
        """Tell the other ranks, through the job's store, that this rank gives up, and name the
        stage at fault.

        A rank that gives up writes whom it lost (peer, or "" after a failed collective) before it
        exits, so a stage that wrote nothing is one that died or stalled. After losing `peer`:
        the peer itself, or, if the peer gave up too, the stage it lost (followed along the
        chain). After a failed collective: the ranks that still have not reported after a few
        seconds, as a list. None (or []) when the store cannot be reached either.
        """
        store = dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
        if store is None:
            return peer if peer is not None else []
        wait_s = min(self.timeout_s, NAMING_WAIT_S)
        try:
            store.set_timeout(timedelta(seconds=wait_s))
            store.set(f"{DOWN_KEY}{self.rank}", "" if peer is None else str(peer))
            lost = self._follow_chain(store, peer) if peer is not None else \
                self._silent_ranks(store, time.monotonic() + wait_s)
            self._failed = [r for r in range(self.world_size)
                            if store.check([f"{FAILED_KEY}{r}"])]
            store.set(f"{DONE_KEY}{self.rank}", "")
        except (RuntimeError, ValueError):  # the store went down with its host
            return peer if peer is not None else []
        if self.rank == 0:
            linger(store, self.world_size, time.monotonic() + wait_s)
        return lost

    def _follow_chain(self, store, peer: int) -> int:
        lost, seen = peer, {self.rank, peer}
        while store.check([f"{DOWN_KEY}{lost}"]) and not store.check([f"{FAILED_KEY}{lost}"]):
            verdict = store.get(f"{DOWN_KEY}{lost}").decode()
            if not verdict or int(verdict) in seen:  # lost in a collective, or a cycle
                break
            lost = int(verdict)
            seen.add(lost)
        return lost

    def _silent_ranks(self, store, deadline: float) -> list:
        while True:
            silent = [r for r in range(self.world_size) if r != self.rank and not
                      store.check([f"{DOWN_KEY}{r}"]) and not store.check([f"{FAILED_KEY}{r}"])]
            if len(silent) <= 1 or time.monotonic() > deadline:
                return silent
            time.sleep(0.1)

    def close(self):
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def pick_device(device_arg, local_rank: int) -> torch.device:
    if device_arg not in (None, "auto"):
        try:
            device = torch.device(device_arg)
        except RuntimeError:
            raise BadInput(f"--device {device_arg!r} is not a device name (cpu, cuda, cuda:1)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BadInput(f"--device {device_arg} asked for, but no CUDA GPU is visible: use --device cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise BadInput(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device=None, timeout_s: float = 300.0, expected_world_size=None) -> DistContext:
    """Read torchrun's environment, pick device and backend, join the process group."""
    if not timeout_s or timeout_s <= 0:
        shown = format(timeout_s, "g") if isinstance(timeout_s, (int, float)) else repr(timeout_s)
        raise BadInput(f"--timeout_s={shown} must be a positive number of seconds")
    world_size = env_int("WORLD_SIZE", 1)
    rank, local_rank = env_int("RANK", 0), env_int("LOCAL_RANK", 0)
    if expected_world_size is not None and world_size not in (1, expected_world_size):
        raise BadInput(f"torchrun started {world_size} processes but the checkpoint is split into "
                       f"{expected_world_size} stages: use --nproc_per_node {expected_world_size} "
                       f"(in all) or split again with --n_stages {world_size}")
    device = pick_device(device, local_rank)
    if world_size == 1:
        return DistContext(device=device, timeout_s=timeout_s)
    local_world = env_int("LOCAL_WORLD_SIZE", world_size)
    own_gpu = device.type == "cuda" and local_world <= torch.cuda.device_count()
    backend = "nccl" if own_gpu else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return DistContext(rank, world_size, local_rank, device, backend, timeout_s)


def stopped_with_its_own_error(rank: int) -> str:
    return (f"stage {rank} stopped with an error of its own (its error line comes first); this "
            "stage stops with it")


def linger(store, world_size: int, deadline: float):
    """Rank 0 may be the process that holds the store (torchrun's agent holds it, a plain
    launch gives it to rank 0): it stays until every rank that reported has read its answer."""
    try:
        while time.monotonic() < deadline:
            if all(store.check([f"{DONE_KEY}{r}"]) or not store.check([f"{DOWN_KEY}{r}"])
                   for r in range(world_size)):
                return
            time.sleep(0.05)
    except RuntimeError:
        pass


def leave_after_own_error():
    """A rank that stops with an error of its own (a BadInput) says so in the job's store, so the
    stages that lose it name it as the one that failed instead of as a silent one. Under torchrun
    the agent holds the store, which outlives us; in a plain launch rank 0 holds it and its
    peers only notice it left once it has exited, so there rank 0's note dies with it."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=NAMING_WAIT_S))
        store.set(f"{FAILED_KEY}{dist.get_rank()}", "")
    except (RuntimeError, ValueError):
        pass


def report_and_exit(error: PeerLost, rank: int):
    """A lost peer ends this rank with its message (non-zero exit, no traceback)."""
    from llama.cli import record_for_torchrun  # llama.cli imports nothing of torch's
    print(f"error: {error}", file=sys.stderr, flush=True)
    record_for_torchrun(f"error: {error}")
    os._exit(3)  # the process group's threads may still wait on the dead peer; don't join them
