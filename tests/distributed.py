"""Runs a function on N gloo ranks in spawned processes and returns each rank's result."""

from __future__ import annotations

import os
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launcher.topology import free_port


def _convert(obj, fn):
    """Tensors cross the process boundary as numpy arrays (no shared-memory handles)."""
    if isinstance(obj, (list, tuple)):
        return type(obj)(_convert(v, fn) for v in obj)
    if isinstance(obj, dict):
        return {k: _convert(v, fn) for k, v in obj.items()}
    return fn(obj)


def _to_numpy(v):
    return v.detach().cpu().numpy().copy() if isinstance(v, torch.Tensor) else v


def _to_torch(v):
    import numpy as np

    return torch.from_numpy(v) if isinstance(v, np.ndarray) else v


def _worker(rank: int, world: int, port: int, fn, args, queue, barrier: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
        result = _convert(fn(rank, *args), _to_numpy)
        if barrier:
            dist.barrier()  # no rank tears the group down while another still uses it
        queue.put((rank, "ok", result))
    except BaseException as exc:  # report, never hang the parent
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 240.0, barrier: bool = True) -> list:
    """``fn(rank, *args)`` on ``world`` ranks; returns the results by rank, raises on any error."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue, barrier)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            (results.__setitem__(rank, value) if status == "ok" else errors.append(f"rank {rank}: {value}"))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [_convert(results[r], _to_torch) for r in range(world)]
