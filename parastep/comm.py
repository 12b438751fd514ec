"""A thin layer over a ProcessGroup: point-to-point and broadcast with byte counts and timeouts.

Works with any backend: tensors travel on ``device`` (CUDA for NCCL, CPU for gloo); the
library never creates or destroys a process group.
"""
from __future__ import annotations

import math
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
    """Per window: one message per peer (its shape header only the first time per key and call)
    and two broadcasts (sizes; pickled skeleton and every tensor's bytes in one buffer)."""

    def __init__(self, group: dist.ProcessGroup, timeout_s: float):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.timeout = timedelta(seconds=timeout_s)
        self.bytes_sent = 0
        self.bytes_received = 0
        self._pending: list[tuple[dist.Work, int]] = []
        self._known: dict[tuple[int, Any], tuple[tuple[int, ...], torch.dtype]] = {}

    def begin_call(self) -> None:
        """Starts a pipeline call: zero the byte counts, forget the shapes seen."""
        self.bytes_sent = self.bytes_received = 0
        self._known.clear()

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
    def send(self, tensor: torch.Tensor, dst: int, key: Any = None) -> None:
        """Starts sending ``tensor``; completion is awaited by :meth:`flush`. The shape travels
        only with the first tensor of each ``key`` in a call (sender and receiver count alike)."""
        tensor = tensor.contiguous()
        wire = [tensor]
        if (dst, key) not in self._known:
            if tensor.dim() > _MAX_DIMS:
                raise CommError(f"cannot send a tensor with more than {_MAX_DIMS} dimensions")
            header = torch.zeros(_MAX_DIMS + 2, dtype=torch.int64, device=tensor.device)
            header[0], header[1] = tensor.dim(), _DTYPES.index(tensor.dtype)
            header[2:2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
            wire.insert(0, header)
            self._known[(dst, key)] = (tuple(tensor.shape), tensor.dtype)
        for t in wire:
            self._pending.append((dist.isend(t, self._global(dst), self.group), dst))
            self.bytes_sent += t.numel() * t.element_size()

    def recv(self, src: int, device: torch.device, key: Any = None) -> torch.Tensor:
        if (src, key) not in self._known:
            header = torch.empty(_MAX_DIMS + 2, dtype=torch.int64, device=device)
            self._wait(dist.irecv(header, self._global(src), self.group), src, "sending a prediction")
            self.bytes_received += header.numel() * header.element_size()
            ndim = int(header[0])
            self._known[(src, key)] = (tuple(header[2:2 + ndim].tolist()), _DTYPES[int(header[1])])
        shape, dtype = self._known[(src, key)]
        out = torch.empty(shape, dtype=dtype, device=device)
        self._wait(dist.irecv(out, self._global(src), self.group), src, "sending a prediction")
        self.bytes_received += out.numel() * out.element_size()
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
        """Returns ``src``'s ``obj`` on every rank in two collectives: the sizes, then one byte
        buffer holding the pickled skeleton followed by every tensor (each padded to 8 bytes)."""
        if self.rank == src:
            tensors: list[torch.Tensor] = []
            blob = pickle.dumps(_strip(obj, tensors))
            parts = [torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device),
                     torch.zeros(-len(blob) % 8, dtype=torch.uint8, device=device)]
            for t in tensors:
                raw = t.detach().to(device).contiguous().reshape(-1).view(torch.uint8)
                parts += [raw, torch.zeros(-raw.numel() % 8, dtype=torch.uint8, device=device)]
            buf = torch.cat(parts)
            sizes = torch.tensor([len(blob), buf.numel()], dtype=torch.int64, device=device)
        else:
            sizes = torch.empty(2, dtype=torch.int64, device=device)
        self._broadcast_tensor(sizes, src)
        if self.rank != src:
            buf = torch.empty(int(sizes[1]), dtype=torch.uint8, device=device)
        self._broadcast_tensor(buf, src)
        if self.rank == src:
            return obj
        n_blob = int(sizes[0])
        skeleton = pickle.loads(buf[:n_blob].cpu().numpy().tobytes())
        slots: list[_Slot] = []
        _collect_slots(skeleton, slots)
        received, offset = [], n_blob + (-n_blob % 8)
        for slot in slots:
            nbytes = math.prod(slot.shape) * slot.dtype.itemsize
            # clone: an aligned tensor of its own, not a view into the shared buffer
            t = buf[offset:offset + nbytes].clone().view(slot.dtype).reshape(slot.shape)
            received.append(t.cpu() if slot.on_cpu else t)
            offset += nbytes + (-nbytes % 8)
        return _fill(skeleton, received)


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
