"""Data-parallel training with PyTorch's own engine: DDP, launched by ``torchrun``.

One process per GPU (NCCL) or per CPU worker (gloo). ``torchrun`` (``python -m
torch.distributed.run``) starts the processes and sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup` reads them. Without them a run is one
ordinary process and nothing here does anything.

One machine, N processes (what ``spleen-seg train --nproc-per-node N`` runs for you)::

    torchrun --standalone --nproc-per-node 4 -m spleen_utils.cli train --profile full

Several machines (here 2 nodes x 8 GPUs): run the same command on every node; the rendezvous
endpoint is one reachable host:port (usually node 0), the id any string shared by the nodes of
this job, and each node waits until all ``--nnodes`` have joined::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
             --rdzv-endpoint node0.example.org:29400 --rdzv-id spleen-full-1 \\
             -m spleen_utils.cli train --profile full --data /shared/Task09_Spleen --out /shared/runs/full

Every node needs the dataset at the same path (or its own copy) and the run folder should be on
shared storage: rank 0 alone writes it. ``NCCL_SOCKET_IFNAME`` / ``GLOO_SOCKET_IFNAME`` choose
the network interface when a machine has several.

What changes with N processes: each rank caches and trains on its own partition of the training
cases (MONAI's ``partition_dataset``, padded so every rank takes the same number of steps), so one
step sees ``N x batch_size`` volumes; gradients are averaged by DDP; validation cases are split
across ranks and their per-case Dice gathered, so the metric is the same mean over the same cases
as in one process; rank 0 alone writes checkpoints and records.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .errors import SpleenError


@dataclass(frozen=True)
class Dist:
    """Where this process stands in a (possibly one-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the job torchrun started (gloo on CPU, NCCL on CUDA); idempotent; one process: a no-op.

    Returns this process's place and its device (``cuda:LOCAL_RANK`` on GPUs).
    """
    if not launched_by_torchrun():
        return Dist(), device
    import torch.distributed as td

    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise SpleenError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                              "use at most one process per GPU (--nproc-per-node).")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not td.is_initialized():
        td.init_process_group(backend=backend, timeout=dt.timedelta(minutes=30))
    return Dist(rank=td.get_rank(), world_size=td.get_world_size(), local_rank=local_rank, backend=backend), device


def current() -> Dist:
    """This process's place once :func:`setup` ran (one process otherwise)."""
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()):
        return Dist()
    return Dist(rank=td.get_rank(), world_size=td.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                backend=td.get_backend())


def broadcast_buffers(net: torch.nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every rank.

    DDP averages gradients, so parameters stay equal, but each rank updates its running
    statistics from its own crops; DDP copies rank 0's at the next forward. Validating or saving
    in between would use statistics that differ per rank, so they are made equal first.
    """
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()):
        return
    for b in net.buffers():
        td.broadcast(b.data, src=0)


def barrier() -> None:
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()):
        return [obj]
    out: list[Any] = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


def all_true(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (so that all ranks take the same branch)."""
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()):
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    td.all_reduce(t, op=td.ReduceOp.MIN)
    return bool(t.item())


@contextlib.contextmanager
def local_main_first() -> Iterator[None]:
    """Local rank 0 of each node goes first (e.g. to write a dataset), the others after it."""
    import torch.distributed as td

    active = td.is_available() and td.is_initialized()
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if active and not first:
        td.barrier()
    yield
    if active and first:
        td.barrier()


def cleanup() -> None:
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


def strip_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its value (``--opt V`` or ``--opt=V``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == option:
            skip = True
            continue
        if a.startswith(option + "="):
            continue
        out.append(a)
    return out


def launch(train_argv: list[str], nproc_per_node: int) -> int:
    """Run ``spleen-seg train <train_argv>`` in ``nproc_per_node`` processes through torchrun (one machine).

    For several machines run torchrun yourself with its rendezvous flags (see the module docstring).
    """
    if nproc_per_node < 1:
        raise SpleenError(f"--nproc-per-node must be at least 1, not {nproc_per_node}.")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
           "-m", "spleen_utils.cli", "train", *train_argv]
    return subprocess.run(cmd).returncode
