"""Process topology: spawn the peer ranks ourselves, or adopt a torchrun environment.

``python app.py`` (no RANK in the environment) makes this process rank 0: it opens the
control store on the loopback interface only, and starts the peers as child processes running
the same command line with RANK/WORLD_SIZE/MASTER_* set, the environment torchrun would give
them, plus the control channel's token. Under ``torchrun`` every process reads its environment
and the token comes from PARASTEP_CONTROL_TOKEN, which every node must set alike.

No process group exists here: :mod:`launcher.group` builds one world per generation over the
healthy ranks, on this store.

Devices: on GPUs each rank binds ``cuda:LOCAL_RANK`` — or ``cuda:0`` when its launcher gave it
one GPU through CUDA_VISIBLE_DEVICES — and that binding is set again in every thread that runs
pipelines or collectives (:meth:`Topology.bind_device`): CUDA's current device is per thread.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

SPAWNED_ENV = "PARASTEP_SPAWNED_BY"
TOKEN_ENV = "PARASTEP_CONTROL_TOKEN"
STORE_TIMEOUT = timedelta(seconds=60)


@dataclass
class Child:
    """A peer rank this process spawned: how to start it again, and the process now."""

    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen
    starts: int = 1
    started_at: float = field(default_factory=time.monotonic)


@dataclass
class Topology:
    rank: int
    world_size: int
    local_rank: int
    backend: str  # "gloo" (CPU ranks) or "nccl" (one GPU per rank)
    device: torch.device
    torchrun: bool
    store: dist.Store  # the control store; every generation's world rendezvous on it too
    token: bytes  # authenticates every control message
    single_host: bool
    children: dict[int, Child] = field(default_factory=dict)  # rank -> process (spawn mode, rank 0)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def bind_device(self) -> None:
        """Make this thread's current CUDA device the rank's (a no-op on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def child_problem(self, rank: int) -> str | None:
        """Why a spawned rank is gone, if it is."""
        child = self.children.get(rank)
        if child is None or child.proc.poll() is None:
            return None
        code = child.proc.returncode
        if code < 0:
            try:
                return f"rank {rank} was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"rank {rank} was killed by signal {-code}"
        return f"rank {rank} exited with code {code}"

    def respawn(self, rank: int) -> None:
        """Start a dead spawned rank again, with the command line and environment it had."""
        child = self.children[rank]
        child.proc = subprocess.Popen(child.argv, env=child.env)
        child.starts += 1
        child.started_at = time.monotonic()
        log.warning("rank %d respawned (pid %d, start %d)", rank, child.proc.pid, child.starts)

    def stop_children(self) -> None:
        for child in self.children.values():
            if child.proc.poll() is None:
                child.proc.terminate()
        for child in self.children.values():
            try:
                child.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.proc.kill()


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def limit_blas(threads: int) -> None:
    """Cap numpy's BLAS threads at this rank's cores. Its pool, restarted after any fork (e.g.
    ffmpeg writing a video), inherits the rank's pinning, and more BLAS threads than cores spin
    against each other: the audio model's decoding went from 0.03 s to 1 s a clip after the first
    video the app wrote (measured)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads, user_api="blas")


def core_share(local_rank: int, local_world: int) -> set[int]:
    """This rank's own share of the cores the process may use (empty with fewer cores than ranks).

    A CPU rank pinned to it (``os.sched_setaffinity``) before its process group exists keeps
    gloo's threads on its cores too: unpinned, ParaStep's messages waited milliseconds for a
    core whenever another thread held it (docs/BENCHMARKS.md).
    """
    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) // max(1, local_world)
    return set(cores[local_rank * share : (local_rank + 1) * share])


def _loopback_store() -> tuple[dist.TCPStore, int]:
    """A TCPStore server that listens on 127.0.0.1 only (torch's own binds every interface)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    store = dist.TCPStore(
        "127.0.0.1",
        port,
        None,
        True,
        STORE_TIMEOUT,
        wait_for_workers=False,  # respawned peers connect whenever they come
        master_listen_fd=sock.detach(),
    )
    return store, port


def route_interface(host: str) -> str | None:
    """The name of this machine's network interface whose IPv4 address routes to ``host`` (None
    when there is none, or the host is unknown)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))  # UDP: picks the route, sends nothing
            local = probe.getsockname()[0]
            for _, name in socket.if_nameindex():
                try:  # SIOCGIFADDR: the interface's (primary) IPv4 address
                    packed = fcntl.ioctl(probe.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
                except OSError:
                    continue
                if socket.inet_ntoa(packed[20:24]) == local:
                    return name
    except OSError:
        return None
    return None


def _device(local_rank: int, local_world: int) -> torch.device:
    """This rank's GPU: cuda:LOCAL_RANK when the process sees every GPU of its node, cuda:0 when
    its launcher gave it one (CUDA_VISIBLE_DEVICES)."""
    count = torch.cuda.device_count()
    if count == 1:
        return torch.device("cuda", 0)
    if local_rank < count:
        return torch.device("cuda", local_rank)
    raise SystemExit(
        f"local rank {local_rank} of {local_world} sees {count} GPU(s): give every process all the "
        f"node's GPUs or exactly one (CUDA_VISIBLE_DEVICES)"
    )


def start(ranks: int, threads_per_rank: int | None, argv: list[str]) -> Topology:
    """This process's place among the ranks; spawns the peers if it is the launcher.

    ``ranks``: CPU ranks to use when there is no GPU and no torchrun environment.
    ``argv``: the command line to give spawned peers (they parse it like rank 0 did).
    """
    has_gpu = torch.cuda.is_available()
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # a store wait that times out is no warning
    torchrun = "RANK" in os.environ and SPAWNED_ENV not in os.environ
    children: dict[int, Child] = {}
    if "RANK" not in os.environ:  # the launcher: rank 0, the store's host
        world = torch.cuda.device_count() if has_gpu else max(1, ranks)
        store, port = _loopback_store()
        token = secrets.token_hex(32)
        base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world)}
        base |= {"LOCAL_WORLD_SIZE": str(world), TOKEN_ENV: token, SPAWNED_ENV: str(os.getpid())}
        base |= {"GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}  # gloo on loopback too
        os.environ.update(base, RANK="0", LOCAL_RANK="0")
        for rank in range(1, world):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank))
            cmd = [sys.executable, *argv]
            children[rank] = Child(cmd, env, subprocess.Popen(cmd, env=env))
        log.info("spawned %d peer rank(s) on %s", world - 1, "GPUs" if has_gpu else "CPU")
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    token_text = os.environ.get(TOKEN_ENV, "")
    if not token_text:
        raise SystemExit(
            f"{TOKEN_ENV} is not set: under torchrun, set it to the same secret on every node "
            f"(e.g. {TOKEN_ENV}=$(openssl rand -hex 32)); it authenticates the control messages"
        )
    if rank != 0 or torchrun:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), None, False, STORE_TIMEOUT)
    if has_gpu:
        # Errors surface through the engine's own timed waits; the watchdog must not take the
        # process (and with rank 0 the UI) down: the app aborts the world and builds a new one.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
        device, backend = _device(local_rank, local_world), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
        if torchrun and local_world < world and "GLOO_SOCKET_IFNAME" not in os.environ:
            # ranks on several nodes: gloo's default (the hostname's address) may be loopback or
            # unreachable from the other nodes; the interface that reaches the store's host is not
            ifname = route_interface(os.environ["MASTER_ADDR"])
            if ifname:
                os.environ["GLOO_SOCKET_IFNAME"] = ifname
                log.info("gloo on %s, the interface that reaches %s", ifname, os.environ["MASTER_ADDR"])
        mine = core_share(local_rank, local_world)
        if mine and (threads_per_rank or len(mine)) <= len(mine):
            os.sched_setaffinity(0, mine)
        torch.set_num_threads(threads_per_rank or max(1, len(mine)))
        limit_blas(threads_per_rank or max(1, len(mine)))
    log.info("rank %d/%d up (%s, %d threads)", rank, world, backend, torch.get_num_threads())
    single_host = local_world == world
    return Topology(
        rank, world, local_rank, backend, device, torchrun, store, token_text.encode(), single_host, children
    )
