"""Process topology: spawn the peer ranks ourselves, or adopt a torchrun environment.

``python app.py`` (no RANK in the environment) makes this process rank 0 and starts the
peers as child processes running the same command line with RANK/WORLD_SIZE/MASTER_* set,
exactly the environment torchrun would give them, so both paths share one code path.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

SPAWNED_ENV = "PARASTEP_SPAWNED_BY"


@dataclass
class Topology:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    torchrun: bool
    children: dict[int, subprocess.Popen] = field(default_factory=dict)  # rank -> process (spawn mode, rank 0)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def child_problem(self, rank: int) -> str | None:
        """Why a child rank is gone, if it is (spawn mode only)."""
        proc = self.children.get(rank)
        if proc is None or proc.poll() is None:
            return None
        code = proc.returncode
        if code < 0:
            try:
                return f"rank {rank} was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"rank {rank} was killed by signal {-code}"
        return f"rank {rank} exited with code {code}"

    def stop_children(self) -> None:
        for proc in self.children.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.children.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def core_share(local_rank: int, local_world: int) -> set[int]:
    """This rank's own share of the cores the process may use (empty with fewer cores than ranks).

    A CPU rank pinned to it (``os.sched_setaffinity``) before its process group exists keeps
    gloo's threads on its cores too: unpinned, ParaStep's messages waited milliseconds for a
    core whenever another thread held it (docs/BENCHMARKS.md).
    """
    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) // max(1, local_world)
    return set(cores[local_rank * share : (local_rank + 1) * share])


def start(ranks: int, threads_per_rank: int | None, argv: list[str]) -> Topology:
    """Initialise the default process group for this process; spawn peers if we are the launcher.

    ``ranks``: CPU ranks to use when there is no GPU and no torchrun environment.
    ``argv``: the command line to give spawned peers (they parse it like rank 0 did).
    """
    has_gpu = torch.cuda.is_available()
    children: dict[int, subprocess.Popen] = {}
    torchrun = "RANK" in os.environ and SPAWNED_ENV not in os.environ
    if "RANK" not in os.environ:
        world = torch.cuda.device_count() if has_gpu else max(1, ranks)
        port = free_port()
        base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world)}
        os.environ.update(base, RANK="0", LOCAL_RANK="0")
        for rank in range(1, world):
            env = dict(os.environ, **base, RANK=str(rank), LOCAL_RANK=str(rank), **{SPAWNED_ENV: str(os.getpid())})
            children[rank] = subprocess.Popen([sys.executable, *argv], env=env)
        log.info("spawned %d peer rank(s) on %s", world - 1, "GPUs" if has_gpu else "CPU")
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))

    if has_gpu:
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        mine = core_share(local_rank, local_world)
        if mine and (threads_per_rank or len(mine)) <= len(mine):
            os.sched_setaffinity(0, mine)
        torch.set_num_threads(threads_per_rank or max(1, len(mine)))
    # The default group is only used to rendezvous and build ParaStep groups; idle peers
    # wait on the store (launcher.control), never in a collective, so a long time-out is safe.
    dist.init_process_group(
        backend="cpu:gloo,cuda:nccl" if has_gpu else "gloo",
        init_method="env://",
        rank=rank,
        world_size=world,
        timeout=timedelta(hours=1),
        device_id=device if has_gpu else None,
    )
    log.info("rank %d/%d up (%s, %d threads)", rank, world, backend, torch.get_num_threads())
    return Topology(rank, world, local_rank, backend, device, torchrun, children)
