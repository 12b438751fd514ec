"""A thin layer over a ProcessGroup: point-to-point and broadcast with byte counts and timeouts.

Works with any backend: tensors travel on ``device`` (CUDA for NCCL, CPU for gloo); the
library never creates or destroys a process group.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import CommError

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
           torch.uint8, torch.bool, torch.int8, torch.int16, torch.complex64]
_MAX_DIMS = 8


@dataclass(frozen=True)
class _Slot:
    """Stands for a tensor inside a broadcast object; the tensor itself travels separately."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    on_cpu: bool


class Comm:
    def __init__(self, group: dist.ProcessGroup, timeout_s: float):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.timeout = timedelta(seconds=timeout_s)
        self.bytes_sent = 0
        self.bytes_received = 0
        self._pending: list[tuple[dist.Work, int]] = []

    def reset_counts(self) -> None:
        self.bytes_sent = self.bytes_received = 0

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)

    def _wait(self, work: dist.Work, peer: int, what: str) -> None:
        try:
            ok = work.wait(self.timeout)
        except Exception as exc:  # gloo raises on timeout or a closed connection
            raise CommError(f"rank {peer} did not complete {what} within "
                            f"{self.timeout.total_seconds():g}s: {exc}") from exc
        if ok is False:
            raise CommError(f"rank {peer} did not complete {what} within "
                            f"{self.timeout.total_seconds():g}s")

    # -- point to point -------------------------------------------------------------
    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Starts sending ``tensor`` (shape header first); completion is awaited by :meth:`flush`."""
        tensor = tensor.contiguous()
        if tensor.dim() > _MAX_DIMS:
            raise CommError(f"cannot send a tensor with more than {_MAX_DIMS} dimensions")
        header = torch.zeros(_MAX_DIMS + 2, dtype=torch.int64, device=tensor.device)
        header[0], header[1] = tensor.dim(), _DTYPES.index(tensor.dtype)
        header[2:2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
        for t in (header, tensor):
            self._pending.append((dist.isend(t, self._global(dst), self.group), dst))
            self.bytes_sent += t.numel() * t.element_size()

    def recv(self, src: int, device: torch.device) -> torch.Tensor:
        header = torch.empty(_MAX_DIMS + 2, dtype=torch.int64, device=device)
        self._wait(dist.irecv(header, self._global(src), self.group), src, "sending a prediction")
        ndim, code = int(header[0]), int(header[1])
        out = torch.empty(tuple(header[2:2 + ndim].tolist()), dtype=_DTYPES[code], device=device)
        self._wait(dist.irecv(out, self._global(src), self.group), src, "sending a prediction")
        self.bytes_received += header.numel() * 8 + out.numel() * out.element_size()
        return out

    def flush(self) -> None:
        """Waits for every send started by :meth:`send`."""
        pending, self._pending = self._pending, []
        for work, peer in pending:
            self._wait(work, peer, "receiving a prediction")

    # -- broadcast ------------------------------------------------------------------
    def _broadcast_tensor(self, tensor: torch.Tensor, src: int) -> None:
        work = dist.broadcast(tensor, self._global(src), self.group, async_op=True)
        self._wait(work, src, "the window broadcast")
        nbytes = tensor.numel() * tensor.element_size()
        if self.rank == src:
            self.bytes_sent += nbytes * (self.size - 1)
        else:
            self.bytes_received += nbytes

    def broadcast(self, obj: Any, device: torch.device, src: int = 0) -> Any:
        """Returns ``src``'s ``obj`` on every rank: tensors by collective, the rest pickled."""
        tensors: list[torch.Tensor] = []
        skeleton = _strip(obj, tensors) if self.rank == src else None
        blob = pickle.dumps(skeleton) if self.rank == src else b""
        size = torch.tensor([len(blob)], dtype=torch.int64, device=device)
        self._broadcast_tensor(size, src)
        buf = (torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device) if self.rank == src
               else torch.empty(int(size), dtype=torch.uint8, device=device))
        self._broadcast_tensor(buf, src)
        if self.rank != src:
            skeleton = pickle.loads(buf.cpu().numpy().tobytes())
            slots: list[_Slot] = []
            _collect_slots(skeleton, slots)
            tensors = [torch.empty(s.shape, dtype=s.dtype, device=device) for s in slots]
        else:
            slots = []
            _collect_slots(skeleton, slots)
        received = []
        for slot, tensor in zip(slots, tensors):
            wire = tensor.to(device).contiguous()
            self._broadcast_tensor(wire, src)
            received.append(wire.cpu() if slot.on_cpu else wire)
        return obj if self.rank == src else _fill(skeleton, received)


def _strip(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Slot(len(tensors) - 1, tuple(obj.shape), obj.dtype, obj.device.type == "cpu")
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip(v, tensors) for v in obj)
    if isinstance(obj, dict):
        return {k: _strip(v, tensors) for k, v in obj.items()}
    return obj


def _collect_slots(obj: Any, slots: list[_Slot]) -> None:
    if isinstance(obj, _Slot):
        slots.append(obj)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect_slots(v, slots)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect_slots(v, slots)


def _fill(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, _Slot):
        return tensors[obj.index]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(v, tensors) for v in obj)
    if isinstance(obj, dict):
        return {k: _fill(v, tensors) for k, v in obj.items()}
    return obj
