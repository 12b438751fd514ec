"""A thin layer over a ProcessGroup: point-to-point messages with byte counts and timeouts.

Works with any backend: tensors travel on ``device`` (CUDA for NCCL, CPU for gloo); the
library never creates or destroys a process group.
"""

from __future__ import annotations

import math
import pickle
import struct
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import CommError

_HEAD = 16  # two int64 in front of every message: the pickled skeleton's length, the message's length


@dataclass(frozen=True)
class _Slot:
    """Stands for a tensor inside a message's skeleton; the tensor's bytes follow the skeleton."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    on_cpu: bool


class Comm:
    """Messages between the ranks of a group: any picklable object holding tensors, sent as
    one byte buffer (see :func:`_pack`). A message whose skeleton (everything but the tensors'
    values) is that of the channel's last message leaves it out: pickling it cost as much as
    the rest of a message (~40 us of ~75 us after a denoiser call).

    Per call and direction, sender and receiver agree on the buffer's size (the largest so
    far), so a receive can be posted before its message is sent (:meth:`expect`). A message
    larger than the agreed size travels as a header padded to that size, then a second buffer
    of the new size; a call's first message on a channel is such a header.
    """

    def __init__(self, group: dist.ProcessGroup, timeout_s: float):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.timeout = timedelta(seconds=timeout_s)
        self.bytes_sent = 0
        self.bytes_received = 0
        self._pending: list[tuple[dist.Work, int]] = []
        self._posted: dict[int, tuple[dist.Work, torch.Tensor]] = {}  # src -> receive posted early
        self._agreed: dict[tuple[bool, int], int] = {}  # (sending, peer) -> buffer bytes
        self._skeletons: dict[tuple[bool, int], Any] = {}  # (sending, peer) -> last message's skeleton

    def begin_call(self) -> None:
        """Starts a pipeline call: zero the byte counts, forget the agreed sizes."""
        if self._posted or self._pending:
            raise CommError(
                "the previous pipeline call on this process group stopped mid-window, so messages of "
                "it may still be queued in the group: create a new process group "
                "(torch.distributed.new_group) and call parastep.apply with it"
            )
        self.bytes_sent = self.bytes_received = 0
        self._agreed.clear()
        self._skeletons.clear()

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)

    def _wait(self, work: dist.Work, peer: int, what: str) -> None:
        try:
            ok = work.wait(self.timeout)
        except Exception as exc:  # gloo raises on timeout or a closed connection
            raise CommError(
                f"rank {peer} did not complete {what} within {self.timeout.total_seconds():g}s: {exc}"
            ) from exc
        if ok is False:
            raise CommError(f"rank {peer} did not complete {what} within {self.timeout.total_seconds():g}s")

    def _agreed_size(self, sending: bool, peer: int) -> int:
        """The buffer size agreed with ``peer`` in this direction (a bare header before any)."""
        return max(self._agreed.get((sending, peer), 0), _HEAD)

    def _irecv(self, src: int, nbytes: int, device: torch.device) -> tuple[dist.Work, torch.Tensor]:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return _posted(dist.irecv(buf, self._global(src), self.group)), buf

    def expect(self, src: int, device: torch.device) -> None:
        """Posts the receive of ``src``'s next message now when the group's backend for
        ``device`` allows it (:func:`receives_may_be_posted_early`); otherwise :meth:`recv`
        posts it when the message is due."""
        if src not in self._posted and receives_may_be_posted_early(self.group, device):
            self._posted[src] = self._irecv(src, self._agreed_size(False, src), device)

    def send(self, obj: Any, dst: int, device: torch.device) -> None:
        """Starts sending ``obj`` to ``dst``; :meth:`flush` awaits completion."""
        agreed = self._agreed_size(True, dst)
        tensors: list[torch.Tensor] = []
        skeleton = _strip(obj, tensors)
        same = _same_skeleton(skeleton, self._skeletons.get((True, dst), _NONE))
        self._skeletons[(True, dst)] = skeleton
        buf = _pack(b"" if same else pickle.dumps(skeleton), tensors, device)
        size = buf.numel()
        wire = [_padded_to(buf, agreed)] if size <= agreed else [_padded_to(buf[:_HEAD], agreed), buf]
        for t in wire:
            self._pending.append((_posted(dist.isend(t, self._global(dst), self.group)), dst))
            self.bytes_sent += t.numel()
        self._agreed[(True, dst)] = max(agreed, size)

    def recv(self, src: int, device: torch.device) -> Any:
        """``src``'s next message (its receive posted by :meth:`expect`, or now)."""
        posted = self._posted.pop(src, None)
        work, first = posted or self._irecv(src, self._agreed_size(False, src), device)
        self._wait(work, src, f"sending to rank {self.rank}")
        n_blob, size = first[:_HEAD].view(torch.int64).tolist()
        self.bytes_received += first.numel()
        buf = first
        if size > first.numel():
            work, buf = self._irecv(src, size, device)
            self._wait(work, src, f"sending to rank {self.rank}")
            self.bytes_received += size
        self._agreed[(False, src)] = max(first.numel(), size)
        if n_blob:
            self._skeletons[(False, src)] = pickle.loads(buf[_HEAD : _HEAD + n_blob].cpu().numpy().tobytes())
        return _unpack(buf, n_blob, self._skeletons[(False, src)])

    def exchange(self, outgoing: dict[int, Any], sources: list[int], device: torch.device) -> dict[int, Any]:
        """Sends ``outgoing[peer]`` to each peer and returns the message of each rank in
        ``sources``, in an order that cannot deadlock on any backend: every rank takes its peers
        in ascending order and, with each, the lower rank sends first. (On NCCL a pair's operations
        run in order on one stream, so two ranks that both receive first would wait for ever.)

        Example: every rank sends its stage's output to every other rank::

            others = [r for r in range(comm.size) if r != comm.rank]
            received = comm.exchange({r: output for r in others}, others, device)
        """
        received: dict[int, Any] = {}
        for peer in sorted(set(outgoing) | set(sources)):
            if peer == self.rank:
                raise CommError(f"rank {peer} cannot exchange a message with itself")
            if peer < self.rank and peer in sources:
                received[peer] = self.recv(peer, device)
            if peer in outgoing:
                self.send(outgoing[peer], peer, device)
                self.flush()
            if peer > self.rank and peer in sources:
                received[peer] = self.recv(peer, device)
        return received

    def flush(self) -> None:
        """Waits for every send started by :meth:`send`."""
        pending, self._pending = self._pending, []
        for work, peer in pending:
            self._wait(work, peer, f"receiving from rank {self.rank}")


def backend_for(group: dist.ProcessGroup, device: torch.device) -> str:
    """The name of the backend ``group`` uses for tensors on ``device`` ("gloo", "nccl", ...;
    "" when the group names none for that device type). ``dist.get_backend`` gives one name
    ("gloo") or one per device type ("cpu:gloo,cuda:nccl")."""
    spec = str(dist.get_backend(group)).lower()
    if ":" not in spec:
        return spec.strip()
    for part in spec.split(","):
        device_type, _, name = part.partition(":")
        if device_type.strip() == device.type:
            return name.strip()
    return ""


def receives_may_be_posted_early(group: dist.ProcessGroup, device: torch.device) -> bool:
    """The one place that decides the window's message order: may a receive be posted before
    its message is due (at window open, by :meth:`Comm.expect`)? Only on gloo.

    Gloo matches a pair's operations by (peer, tag) as they arrive, so a receive posted
    early waits beside later sends; posting ParaStep-2's receives only when due made windows
    on the 2-core image slower and more often stalled (docs/BENCHMARKS.md). NCCL runs a
    pair's point-to-point operations in posting order on one stream (one stream per pair
    without ``device_id``, one for the whole group with ``device_id``/eager init): a receive
    posted ahead of a send in the other direction waits for ever, and so does the peer. NCCL
    and any backend this function does not know therefore get receives posted when due, an
    order tests/test_comm_order.py replays under those semantics for 2, 3 and 4 ranks.
    """
    return backend_for(group, device) == "gloo"


def _posted(work: dist.Work | None) -> dist.Work:
    if work is None:  # torch returns None only to a rank outside the group
        raise CommError("this rank is not a member of the ParaStep process group")
    return work


def _pad8(n: int) -> int:
    return n + -n % 8


def _padded_to(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.numel() >= n:
        return t
    return torch.cat([t, torch.zeros(n - t.numel(), dtype=torch.uint8, device=t.device)])


def _pack(blob: bytes, tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One byte buffer on ``device``: the header, the pickled skeleton ``blob`` (empty: the
    channel's last), then every tensor's bytes, each part padded to 8 bytes."""
    raws = [t.detach().to(device).contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    host = bytearray(_HEAD + _pad8(len(blob)))
    struct.pack_into("=qq", host, 0, len(blob), len(host) + sum(_pad8(r.numel()) for r in raws))
    host[_HEAD : _HEAD + len(blob)] = blob
    parts = [torch.frombuffer(host, dtype=torch.uint8).to(device)]
    return torch.cat(parts + [_padded_to(r, _pad8(r.numel())) for r in raws])


def _unpack(buf: torch.Tensor, n_blob: int, skeleton: Any) -> Any:
    slots: list[_Slot] = []
    _collect_slots(skeleton, slots)
    received, offset = [], _HEAD + _pad8(n_blob)
    for slot in slots:
        nbytes = math.prod(slot.shape) * slot.dtype.itemsize
        # clone: a tensor of its own, not a view that keeps the whole buffer alive
        t = buf[offset : offset + nbytes].clone().view(slot.dtype).reshape(slot.shape)
        received.append(t.cpu() if slot.on_cpu else t)
        offset += _pad8(nbytes)
    return _fill(skeleton, received)


_NONE = object()  # no skeleton yet
_IMMUTABLE = (_Slot, int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device)


def _same_skeleton(a: Any, b: Any) -> bool:
    """Equal, of the same types throughout (1, 1.0 and True differ; so does NaN), and built of
    values that cannot change in place: a numpy array in scheduler state, say, may have changed
    while still being the same object, so it travels again."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_same_skeleton, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_skeleton(a[k], b[k]) for k in a)
    return isinstance(a, _IMMUTABLE) and a == b


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
