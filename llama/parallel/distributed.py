"""One place for distributed setup: torchrun's environment -> a small context with the transport.

The ranks form a grid of pipeline stages x tensor-parallel (TP) ranks: global RANK r is TP rank
r % tp of stage r // tp, so the TP ranks of a stage are neighbours (one node, where their
all-reduces are cheapest). Activations pass between the matching TP ranks of neighbouring
stages; each stage has its own process group for its all-reduces. With tp 1 the stage is the
RANK. The device comes from LOCAL_RANK, so a multi-node launch works unchanged. nccl when every local rank has its own GPU; gloo otherwise (CPU only, or ranks
sharing a GPU, which NCCL refuses), with tensors staged through CPU memory. Every wait has a
timeout; what a failure means is worked out in llama/parallel/faults.py.
"""
import contextlib
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from llama.parallel import faults
from llama.errors import BadInput


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = "none"
    timeout_s: float = 300.0
    store: dist.Store = None  # the job's store, where llama/parallel/faults.py reports a lost peer
    pending_sends: list = field(default_factory=list)
    tp_size: int = 1  # tensor-parallel ranks per stage
    tp_group: object = None  # this stage's process group (None with tp 1)
    # (name, category) -> a context manager timing a TP all-reduce in the run's trace (the
    # Stage's span, set by the training loop); None: not traced
    span: object = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def stage(self) -> int:
        return self.rank // self.tp_size

    @property
    def n_stages(self) -> int:
        return self.world_size // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.n_stages - 1

    def rank_of(self, stage: int, tp_rank: int = None) -> int:
        """The global rank of `stage`'s TP rank (this rank's own TP rank by default)."""
        return stage * self.tp_size + (self.tp_rank if tp_rank is None else tp_rank)

    @property
    def prev_rank(self) -> int:
        """Where this rank's activations come from: the same TP rank of the stage before."""
        return self.rank_of(self.stage - 1)

    @property
    def next_rank(self) -> int:
        return self.rank_of(self.stage + 1)

    def log(self, *parts):
        """Print on rank 0 only (the others stay quiet rather than being silenced)."""
        if self.rank == 0:
            print(*parts, flush=True)

    # ---- point-to-point transport ----

    @property
    def wire_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def send(self, tensor, dst: int):
        """Start sending tensor to rank dst; completion is awaited by flush_sends()."""
        # Sends that have arrived no longer need their tensor: drop them now rather than holding
        # every activation sent this step until its end.
        self.pending_sends = [p for p in self.pending_sends if not p[0].is_completed()]
        wire = tensor.detach().contiguous().to(self.wire_device)
        work = self._point_to_point(lambda: dist.isend(wire, dst), dst, "sending to")
        self.pending_sends.append((work, wire, dst))

    def recv(self, shape, dtype, src: int):
        """Receive a tensor of known shape and dtype from rank src, on this rank's device."""
        buffer = torch.empty(shape, dtype=dtype, device=self.wire_device)
        work = self._point_to_point(lambda: dist.irecv(buffer, src), src, "receiving from")
        self._point_to_point(lambda: self._wait(work), src, "receiving from")
        return buffer.to(self.device, non_blocking=True)

    def flush_sends(self):
        for work, _, dst in self.pending_sends:
            self._point_to_point(lambda: self._wait(work), dst, "sending to")
        self.pending_sends.clear()

    def _wait(self, work):
        if self.backend == "gloo":
            work.wait(timedelta(seconds=self.timeout_s))
        else:  # nccl's timeout is the process group's own
            work.wait()

    def _point_to_point(self, call, peer: int, doing: str):
        """call() (gloo raises at once when the connection to peer is gone, or at the timeout)."""
        try:
            return call()
        except RuntimeError as error:
            raise faults.peer_lost(self, error, peer, doing) from None

    # ---- small collectives (control values every rank must agree on) ----

    def all_reduce_max(self, values):
        """The element-wise maximum over all ranks of a list of numbers (every rank gets it)."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.wire_device)
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
        wire = tensor.contiguous().to(self.wire_device)
        self._collective(lambda: dist.broadcast(wire, src))
        return wire.to(self.device)

    def gather_objects(self, obj):
        """Rank 0 gets [obj of rank 0, obj of rank 1, ...]; other ranks get None."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.rank == 0 else None
        self._collective(lambda: dist.gather_object(obj, out, dst=0))
        return out

    def tp_all_reduce(self, tensor):
        """tensor summed over this stage's TP ranks, in place where the wire is its device."""
        if self.tp_size == 1:
            return tensor
        wire = tensor.contiguous().to(self.wire_device)
        with self.span("all-reduce", "all_reduce") if self.span else contextlib.nullcontext():
            self._collective(lambda: dist.all_reduce(wire, group=self.tp_group))
        return wire if wire.device == tensor.device else wire.to(tensor.device)

    def barrier(self):
        if self.distributed:
            self._collective(dist.barrier)

    def _collective(self, call):
        try:
            call()
        except RuntimeError as error:
            raise faults.collective_failed(self, error) from None

    def close(self):
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def pick_device(device_arg, local_rank: int) -> torch.device:
    if device_arg in (None, "auto"):
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_arg)
    except RuntimeError:
        raise BadInput(f"--device {device_arg!r} is not a device name (cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {device_arg} asked for, but no CUDA GPU is visible: use --device cpu")
    if device.type == "cuda" and device.index is None:  # one GPU per local rank, round robin
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise BadInput(f"environment variable {name}={value!r} is not an integer") from None


def job_store(rank: int, world_size: int, timeout: timedelta) -> dist.TCPStore:
    """The job's key-value store at MASTER_ADDR:MASTER_PORT, made as init_process_group's env://
    makes it, but kept for llama/parallel/faults.py: torchrun's agent hosts it when it says
    TORCHELASTIC_USE_AGENT_STORE=True (every rank is a client); otherwise rank 0 hosts it."""
    address, port = os.environ.get("MASTER_ADDR"), env_int("MASTER_PORT", None)
    if not address or port is None:
        raise BadInput(f"WORLD_SIZE={world_size} but MASTER_ADDR or MASTER_PORT is not set: "
                       "start the ranks with torchrun (python -m torch.distributed.run)")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return dist.TCPStore(address, port, world_size, is_master=False, timeout=timeout)
    return dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout,
                         multi_tenant=True, use_libuv=os.environ.get("USE_LIBUV", "1") == "1")


def check_grid(world_size: int, tp: int, expected_stages=None) -> int:
    """The number of stages of world_size ranks at tp TP ranks each; a grid that cannot be is
    refused in one line naming both numbers."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise BadInput(f"--tp {tp!r} must be a positive integer (tensor-parallel ranks per stage)")
    if world_size == 1 and tp > 1:
        raise BadInput(f"--tp {tp} needs {tp} processes per stage, but this is one process: "
                       f"start it with torchrun --nproc_per_node {tp} (or more stages' worth)")
    if world_size % tp:
        raise BadInput(f"torchrun started {world_size} processes, which is not a whole number "
                       f"of stages of --tp {tp} ranks: start stages x {tp} processes")
    if world_size == 1 or expected_stages is None or world_size // tp == expected_stages:
        return world_size // tp
    grid = f" = {world_size // tp} stages x --tp {tp}," if tp > 1 else ""
    raise BadInput(f"torchrun started {world_size} processes{grid} but the checkpoint is split "
                   f"into {expected_stages} stages: use "
                   f"--nproc_per_node {expected_stages * tp} (in all) or split again with "
                   f"--n_stages {world_size // tp}")


def init_distributed(device=None, timeout_s: float = 300.0, expected_stages=None,
                     tp: int = 1) -> DistContext:
    """Read torchrun's environment, pick device and backend, join the process group and make
    each stage's TP group (world size = stages x tp)."""
    if not timeout_s or timeout_s <= 0:
        shown = format(timeout_s, "g") if isinstance(timeout_s, (int, float)) else repr(timeout_s)
        raise BadInput(f"--timeout_s={shown} must be a positive number of seconds")
    world_size = env_int("WORLD_SIZE", 1)
    rank, local_rank = env_int("RANK", 0), env_int("LOCAL_RANK", 0)
    check_grid(world_size, tp, expected_stages)
    device = pick_device(device, local_rank)
    if world_size == 1:
        return DistContext(device=device, timeout_s=timeout_s)
    local_world = env_int("LOCAL_WORLD_SIZE", world_size)
    own_gpu = device.type == "cuda" and local_world <= torch.cuda.device_count()
    backend = "nccl" if own_gpu else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    store = job_store(rank, world_size, timeout)
    # the same prefix env:// gives the group's keys, apart from anything else in the store
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank,
                            world_size=world_size, timeout=timeout)
    tp_group = None
    # every rank makes every stage's group, in the same order (new_group is collective)
    for stage in range(world_size // tp if tp > 1 else 0):
        group = dist.new_group(list(range(stage * tp, (stage + 1) * tp)), timeout=timeout)
        tp_group = group if stage == rank // tp else tp_group
    return DistContext(rank, world_size, device, backend, timeout_s, store, tp_size=tp,
                       tp_group=tp_group)
