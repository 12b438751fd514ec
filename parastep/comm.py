"""A thin layer over a ProcessGroup: point-to-point messages with byte counts and timeouts.

Works with any backend; the library never creates or destroys a process group. CPU messages
between ranks on one host go through shared-memory mailboxes instead (:mod:`parastep.shm`;
``PARASTEP_SHM_DISABLE=1`` turns them off).

Device and dtype rules
----------------------
* A message travels as one uint8 buffer on the ``device`` passed to :meth:`Comm.send` /
  :meth:`Comm.recv`: the device the group's backend moves (CUDA for NCCL, CPU for gloo).
  Layout: a 16-byte header (two int64: the skeleton's length, the message's length), the
  skeleton, the host part (CPU tensors and numpy arrays), the device part (every other
  tensor), each part padded to 8 bytes. Through a shared-memory mailbox that buffer is the
  mailbox itself: the sender packs into it and the receiver copies each tensor out of it.
* Tensors and numpy arrays travel raw (their bytes, any dtype torch can view as bytes), in
  slots: a tensor on the CPU comes back on the CPU, a numpy array as a numpy array, a tensor
  on any other device comes back on the receiver's ``device`` (never with the sender's index),
  wherever it is nested (lists, tuples, dicts).
* Everything else of a message, its skeleton (scheduler state, shapes, dtypes), travels as a
  small tagged JSON text (:func:`_encode`): lists, tuples, dicts with str/int keys, int, float
  (nan and inf included), str, bool, None, torch.dtype, numpy scalars. Nothing is pickled:
  anything else is a :class:`~parastep.CommError` naming it.
* On CUDA the header, skeleton and host part are written into page-locked (pinned) host
  memory and copied to the device without blocking the host; a message is packed once
  whatever the number of its destinations. The host waits for the device only to read what
  it must: a received message's header, skeleton and host part (one copy to pinned memory and
  one CUDA event, polled with short sleeps against the timeout). :attr:`Comm.host_syncs`
  counts those waits.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from . import shm
from .errors import CommError

_HEAD = 16  # two int64 in front of every message: the skeleton's length, the message's length
_PREFETCH = 1 << 16  # bytes of a received CUDA message copied to the host at once: header, skeleton, host part


@dataclass(frozen=True)
class _Slot:
    """Stands for a tensor inside a message's skeleton; the tensor's bytes follow the skeleton.
    ``where``: "device" (comes back on the receiver's device), "cpu" (a CPU tensor) or
    "numpy" (a numpy array)."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    where: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Comm:
    """Messages between the ranks of a group: any object of the kinds the module docstring
    lists, tensors included, sent as one byte buffer (see :func:`_pack`). A message whose
    skeleton (everything but the tensors' values) is that of the channel's last message leaves
    it out: encoding it cost as much as the rest of a message (~40 us of ~75 us after a
    denoiser call).

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
        self.host_syncs = 0  # times this call's host waited for the device (see _to_host)
        self._pending: list[tuple[dist.Work, int, bool]] = []  # (work, peer, stream-ordered)
        self._completed: dist.Work | None = None  # the receive last waited for (never wait on one twice)
        self._posted: dict[int, tuple[dist.Work, torch.Tensor]] = {}  # src -> receive posted early
        self._agreed: dict[tuple[bool, int], int] = {}  # (sending, peer) -> buffer bytes
        self._skeletons: dict[tuple[bool, int], Any] = {}  # (sending, peer) -> last message's skeleton
        self._backends: dict[str, str] = {}  # device type -> the group's backend for it
        self._shm: shm.Mailboxes | None = None  # CPU messages to peers on this host (see parastep.shm)
        if self.size > 1 and backend_for(group, torch.device("cpu")) == "gloo":
            self._shm = shm.mailboxes(group, self.rank, self.size)

    @property
    def shared_memory_peers(self) -> frozenset[int]:
        """The peers whose CPU messages travel through shared memory instead of the group."""
        return self._shm.peers if self._shm else frozenset()

    def _via_shm(self, peer: int, device: torch.device) -> bool:
        return device.type == "cpu" and self._shm is not None and peer in self._shm.peers

    def begin_call(self) -> None:
        """Starts a pipeline call: zero the byte and sync counts, forget the agreed sizes. (A
        shared-memory mailbox may already hold this call's first message from a peer ahead.)"""
        if self._posted or self._pending:
            raise CommError(
                "the previous pipeline call on this process group stopped mid-window, so messages of "
                "it may still be queued in the group: create a new process group "
                "(torch.distributed.new_group) and call parastep.apply with it"
            )
        self.bytes_sent = self.bytes_received = self.host_syncs = 0
        self._agreed.clear()
        self._skeletons.clear()

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)

    def _backend(self, device: torch.device) -> str:
        """The group's backend for ``device``; NCCL moves only CUDA tensors, said up front."""
        name = self._backends.get(device.type)
        if name is None:
            name = self._backends[device.type] = backend_for(self.group, device)
        if name == "nccl" and device.type != "cuda":
            raise CommError(
                f"the process group moves {device.type} tensors with NCCL, which moves only CUDA tensors: keep "
                "the pipeline on the GPU, or initialise the group with backend='cpu:gloo,cuda:nccl'"
            )
        return name

    def _stream_ordered(self, device: torch.device) -> bool:
        """NCCL on CUDA: ``work.wait()`` without a timeout only makes the current stream wait
        for the operation, the host goes on (a timed wait would poll every 1 ms from the time
        the operation was queued, and abort the communicator on timeout)."""
        return device.type == "cuda" and self._backend(device) == "nccl"

    def _wait(self, work: dist.Work, peer: int, what: str) -> None:
        try:
            ok = work.wait(self.timeout)
        except Exception as exc:  # gloo raises on timeout or a closed connection
            raise CommError(
                f"rank {peer} did not complete {what} within {self.timeout.total_seconds():g}s: {exc}"
            ) from exc
        if ok is False:
            raise CommError(f"rank {peer} did not complete {what} within {self.timeout.total_seconds():g}s")

    def _to_host(self, work: dist.Work, buf: torch.Tensor, start: int, end: int, peer: int) -> np.ndarray:
        """Bytes ``start:end`` of the received ``buf`` on the host, once ``work`` completed.
        On the CPU a view; on CUDA one copy into pinned memory and one host wait on a CUDA
        event, polled with short sleeps so that the timeout counts from now."""
        what = f"sending to rank {self.rank}"
        if buf.device.type == "cpu":
            if work is not self._completed:  # gloo: a second wait() on a receive waits for the next one
                self._wait(work, peer, what)
                self._completed = work
            return buf[start:end].numpy()
        if self._stream_ordered(buf.device):
            work.wait()  # the current stream waits for the receive; the host does not
        else:
            self._wait(work, peer, what)
        host = torch.empty(end - start, dtype=torch.uint8, pin_memory=True)
        host.copy_(buf[start:end], non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(buf.device))
        self.host_syncs += 1
        deadline, pause = time.monotonic() + self.timeout.total_seconds(), 2e-5
        while not done.query():  # sleeps of at most 0.25 ms: late by that much at worst, no spinning
            if time.monotonic() > deadline:
                raise CommError(
                    f"rank {peer} did not complete {what} within {self.timeout.total_seconds():g}s (the NCCL "
                    "communicator may still hold the receive: create a new process group before retrying)"
                )
            time.sleep(pause)
            pause = min(pause * 2, 2.5e-4)
        return host.numpy()

    def _agreed_size(self, sending: bool, peer: int) -> int:
        """The buffer size agreed with ``peer`` in this direction (a bare header before any)."""
        return max(self._agreed.get((sending, peer), 0), _HEAD)

    def _irecv(self, src: int, nbytes: int, device: torch.device) -> tuple[dist.Work, torch.Tensor]:
        self._backend(device)
        buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return _posted(dist.irecv(buf, self._global(src), self.group)), buf

    def expect(self, src: int, device: torch.device) -> None:
        """Posts the receive of ``src``'s next message now when the group's backend for
        ``device`` allows it (:func:`receives_may_be_posted_early`); otherwise :meth:`recv`
        posts it when the message is due."""
        if self._via_shm(src, device):
            return
        if src not in self._posted and receives_may_be_posted_early(self.group, device):
            self._posted[src] = self._irecv(src, self._agreed_size(False, src), device)

    def send(self, obj: Any, dst: int | list[int], device: torch.device) -> None:
        """Starts sending ``obj`` to ``dst`` (a rank, or several: the message is packed once for
        the group's transport, and straight into each shared-memory mailbox);
        :meth:`flush` awaits completion."""
        dsts = [dst] if isinstance(dst, int) else list(dst)
        self._backend(device)
        tensors: list[torch.Tensor] = []
        skeleton = _strip(obj, tensors)
        same = all(_same_skeleton(skeleton, self._skeletons.get((True, d), _NONE)) for d in dsts)
        blob = b"" if same else _encode(skeleton, tensors)
        slots = _layout(_slots_of(tensors))
        size = _sizes(len(blob), slots)[1]
        agreed = {d: self._agreed_size(True, d) for d in dsts}
        buf: torch.Tensor | None = None  # packed once for every destination the group's transport reaches
        ordered = self._stream_ordered(device)
        for d in dsts:
            self._skeletons[(True, d)] = skeleton
            if self._via_shm(d, device):
                self.bytes_sent += size
                if self._mail(d, blob, tensors, slots, size):
                    continue
                if buf is None:  # /dev/shm is full: the mailbox told d to receive it over the group
                    buf = _pack(blob, tensors, device, max(agreed.values(), default=0), slots=slots)[0]
                self._pending.append((_posted(dist.isend(buf[:size], self._global(d), self.group)), d, False))
                continue
            if buf is None:
                buf = _pack(blob, tensors, device, max(agreed.values(), default=0), slots=slots)[0]
            # the first part carries the header; past it, when a second part follows, any bytes
            wire = [buf[: agreed[d]]] if size <= agreed[d] else [buf[: agreed[d]], buf[:size]]
            for t in wire:
                self._pending.append((_posted(dist.isend(t, self._global(d), self.group)), d, ordered))
                self.bytes_sent += t.numel()
            self._agreed[(True, d)] = max(agreed[d], size)

    def _mail(self, dst: int, blob: bytes, tensors: list[torch.Tensor], slots: list[_Slot], size: int) -> bool:
        """Packs a CPU message straight into ``dst``'s shared-memory mailbox and posts it: no
        buffer of its own (allocating ~200 KB costs more than the copy). False when it does not
        fit in ``/dev/shm``: the mailbox then tells ``dst`` to receive it over the group."""
        assert self._shm is not None
        mailbox = self._shm.outbox(dst, size, self.timeout.total_seconds(), _largest_at(len(blob), slots))
        if mailbox is not None:
            _pack(blob, tensors, mailbox.device, size, out=mailbox, slots=slots)
        self._shm.post(dst)
        return mailbox is not None

    def recv(self, src: int, device: torch.device) -> Any:
        """``src``'s next message (its receive posted by :meth:`expect`, or now)."""
        if self._via_shm(src, device):
            assert self._shm is not None
            got = self._shm.inbox(src, self.timeout.total_seconds())
            if isinstance(got, int):  # it did not fit in the sender's /dev/shm: over the group
                work, buf = self._irecv(src, got, device)
                self._wait(work, src, f"sending to rank {self.rank}")
                return self._finish_on_host(buf, src)
            try:  # each tensor is copied straight out of the mailbox into a tensor of its own
                return self._finish_on_host(got, src)
            finally:
                self._shm.free(src)
        posted = self._posted.pop(src, None)
        work, buf = posted or self._irecv(src, self._agreed_size(False, src), device)
        host = self._to_host(work, buf, 0, min(buf.numel(), _PREFETCH), src)
        n_blob, size = (int(v) for v in host[:_HEAD].view(np.int64))
        self.bytes_received += buf.numel()
        self._agreed[(False, src)] = max(buf.numel(), size)
        if size > buf.numel():
            work, buf = self._irecv(src, size, device)
            host = self._to_host(work, buf, 0, min(size, _PREFETCH), src)
            self.bytes_received += size
        try:
            return self._finish(buf, host, n_blob, src, work)
        finally:
            self._completed = None  # between messages a Comm holds no operation of the group

    def _finish_on_host(self, buf: torch.Tensor, src: int) -> Any:
        """The message in the CPU buffer ``buf``, all of it received."""
        host = buf.numpy()
        self.bytes_received += buf.numel()
        return self._finish(buf, host, int(host[:_HEAD].view(np.int64)[0]), src, None)

    def _finish(self, buf: torch.Tensor, host: np.ndarray, n_blob: int, src: int, work: dist.Work | None) -> Any:
        """The message in ``buf`` (``host``: its first bytes on the host; all of them when
        ``work`` is None)."""
        if n_blob:
            if len(host) < _HEAD + n_blob:
                assert work is not None
                host = self._to_host(work, buf, 0, _HEAD + n_blob, src)
            self._skeletons[(False, src)] = _decode(host[_HEAD : _HEAD + n_blob].tobytes())
        skeleton = self._skeletons[(False, src)]
        slots = _layout(skeleton)
        host_end = _sizes(n_blob, slots)[0]
        if len(host) < host_end:
            assert work is not None
            host = self._to_host(work, buf, 0, host_end, src)
        return _unpack(buf, host, n_blob, skeleton, slots)

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
        """Waits for every send started by :meth:`send` (on NCCL: the current stream waits)."""
        pending, self._pending = self._pending, []
        for work, peer, ordered in pending:
            if ordered:
                work.wait()
            else:
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


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _sizes(n_blob: int, slots: list[_Slot]) -> tuple[int, int]:
    """Where a message's host part ends, and its length, for a skeleton of ``n_blob`` bytes
    and the ``slots`` of :func:`_layout`."""
    n_host = _HEAD + _pad8(n_blob) + sum(_pad8(s.nbytes) for s in slots if s.where != "device")
    return n_host, n_host + sum(_pad8(s.nbytes) for s in slots if s.where == "device")


def _largest_at(n_blob: int, slots: list[_Slot]) -> int:
    """Where the bytes of a message's largest tensor begin (0 when it has none)."""
    offset, at, largest = _HEAD + _pad8(n_blob), 0, -1
    for slot in slots:
        if slot.nbytes > largest:
            at, largest = offset, slot.nbytes
        offset += _pad8(slot.nbytes)
    return at


def _pack(
    blob: bytes,
    tensors: list[torch.Tensor],
    device: torch.device,
    capacity: int,
    out: torch.Tensor | None = None,
    slots: list[_Slot] | None = None,
) -> tuple[torch.Tensor, int]:
    """One byte buffer on ``device``, at least ``capacity`` long, and the message's length:
    the header, the skeleton ``blob`` (empty: the channel's last), the host part, the device
    part (see the module docstring). The buffer is zeroed, or is ``out`` when given (a CPU
    uint8 tensor at least the message's length, written in place, its padding left as it is).
    ``slots``: ``_layout(_slots_of(tensors))`` when the caller has it already. On CUDA the host
    bytes go through one pinned buffer and one copy that does not block the host."""
    if slots is None:
        slots = _layout(_slots_of(tensors))
    n_host, size = _sizes(len(blob), slots)
    if out is None:
        buf = torch.zeros(max(size, capacity), dtype=torch.uint8, device=device)
    else:
        assert out.device.type == device.type == "cpu" and out.dtype == torch.uint8 and out.numel() >= size
        buf = out
    pinned = device.type == "cuda"
    host = torch.zeros(n_host, dtype=torch.uint8, pin_memory=True) if pinned else buf[:n_host]
    view = host.numpy()
    view[:_HEAD] = np.array([len(blob), size], dtype=np.int64).view(np.uint8)
    view[_HEAD : _HEAD + len(blob)] = np.frombuffer(blob, dtype=np.uint8)
    offset = _HEAD + _pad8(len(blob))
    for slot in slots:
        target = host if slot.where != "device" else buf
        target[offset : offset + slot.nbytes].copy_(_raw(tensors[slot.index]))
        offset += _pad8(slot.nbytes)
    if pinned:
        buf[:n_host].copy_(host, non_blocking=True)  # the caching host allocator keeps `host` until done
    return buf, size


def _slots_of(tensors: list[torch.Tensor]) -> list[_Slot]:
    return [
        _Slot(i, tuple(t.shape), t.dtype, "cpu" if t.device.type == "cpu" else "device") for i, t in enumerate(tensors)
    ]


def _layout(skeleton_or_slots: Any) -> list[_Slot]:
    """A message's slots in the order their bytes follow the skeleton: the host part first."""
    slots: list[_Slot] = []
    _collect_slots(skeleton_or_slots, slots)
    return sorted(slots, key=lambda s: (s.where == "device", s.index))


def _unpack(buf: torch.Tensor, host: np.ndarray, n_blob: int, skeleton: Any, slots: list[_Slot]) -> Any:
    received: dict[int, Any] = {}
    offset = _HEAD + _pad8(n_blob)
    for slot in slots:
        end = offset + slot.nbytes
        # clone: a tensor of its own, not a view that keeps the whole buffer alive
        if slot.where == "device":
            received[slot.index] = buf[offset:end].clone().view(slot.dtype).reshape(slot.shape)
        else:
            t = torch.from_numpy(host[offset:end].copy()).view(slot.dtype).reshape(slot.shape)
            received[slot.index] = t.numpy() if slot.where == "numpy" else t
        offset += _pad8(slot.nbytes)
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
    """``obj`` with every tensor replaced by a slot (numpy arrays stay: :func:`_encode` makes
    them slots, and a skeleton holding one never counts as the same as the last)."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Slot(len(tensors) - 1, tuple(obj.shape), obj.dtype, "cpu" if obj.device.type == "cpu" else "device")
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip(v, tensors) for v in obj)
    if isinstance(obj, dict):
        return {k: _strip(v, tensors) for k, v in obj.items()}
    return obj


def _encode(skeleton: Any, tensors: list[torch.Tensor]) -> bytes:
    """The skeleton as tagged JSON: a JSON object is always a tag (``{"$dict": [[k, v], ...]}``,
    ``{"$tuple": [...]}``, ``{"$float": "nan"}``, ``{"$dtype": "float16"}``,
    ``{"$np": ["<f8", 0.5]}``, ``{"$slot": [index, shape, dtype, where]}``); numpy arrays
    join ``tensors`` as raw slots."""

    def enc(obj: Any, path: str) -> Any:
        kind = type(obj)
        if obj is None or kind in (bool, str, int):
            return obj
        if kind is float:
            return obj if math.isfinite(obj) else {"$float": repr(obj)}
        if kind is list:
            return [enc(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        if kind is tuple:
            return {"$tuple": [enc(v, f"{path}[{i}]") for i, v in enumerate(obj)]}
        if kind is dict:
            for k in obj:
                if not _plain_key(k):
                    raise CommError(
                        f"message key {k!r} at {path or 'top level'} is a {type(k).__name__}: use str, int "
                        "or a tuple of them"
                    )
            return {"$dict": [[enc(k, path), enc(v, f"{path}[{k!r}]")] for k, v in obj.items()]}
        if kind is _Slot:
            return {"$slot": [obj.index, list(obj.shape), _dtype_name(obj.dtype), obj.where]}
        if isinstance(obj, torch.dtype):
            return {"$dtype": _dtype_name(obj)}
        if isinstance(obj, np.ndarray):
            try:
                t = torch.from_numpy(np.ascontiguousarray(obj))
            except TypeError as exc:
                raise CommError(
                    f"the numpy array at {path or 'top level'} has dtype {obj.dtype}, which torch cannot hold"
                ) from exc
            tensors.append(t)
            return {"$slot": [len(tensors) - 1, list(t.shape), _dtype_name(t.dtype), "numpy"]}
        if isinstance(obj, np.generic):
            return {"$np": [obj.dtype.str, enc(obj.item(), path)]}
        raise CommError(
            f"a message cannot hold {kind.__module__}.{kind.__qualname__} (at {path or 'top level'}): nothing crosses "
            "a process boundary pickled; send tensors, numpy arrays, numbers, str, bool, None, torch.dtype, "
            "and lists, tuples or dicts of them"
        )

    return json.dumps(enc(skeleton, ""), allow_nan=False, separators=(",", ":")).encode()


def _plain_key(key: Any) -> bool:
    """A dict key a message can hold: str, int, or a tuple of them."""
    return type(key) in (str, int) or (type(key) is tuple and all(map(_plain_key, key)))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _decode(blob: bytes) -> Any:
    """The inverse of :func:`_encode`."""

    def dec(obj: Any) -> Any:
        if isinstance(obj, list):
            return [dec(v) for v in obj]
        if not isinstance(obj, dict):
            return obj
        ((tag, value),) = obj.items()
        if tag == "$tuple":
            return tuple(dec(v) for v in value)
        if tag == "$dict":
            return {dec(k): dec(v) for k, v in value}
        if tag == "$float":
            return float(value)
        if tag == "$dtype":
            return _dtype(value)
        if tag == "$np":
            return np.dtype(value[0]).type(dec(value[1]))
        if tag == "$slot":
            index, shape, dtype, where = value
            return _Slot(index, tuple(shape), _dtype(dtype), where)
        raise CommError(f"unknown tag {tag!r} in a message: the ranks run different versions of parastep")

    return dec(json.loads(blob))


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CommError(f"unknown dtype {name!r} in a message: the ranks run different versions of torch")
    return dtype


def _collect_slots(obj: Any, slots: list[_Slot]) -> None:
    if isinstance(obj, _Slot):
        slots.append(obj)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect_slots(v, slots)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect_slots(v, slots)


def _fill(obj: Any, received: dict[int, Any]) -> Any:
    if isinstance(obj, _Slot):
        return received[obj.index]
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(v, received) for v in obj)
    if isinstance(obj, dict):
        return {k: _fill(v, received) for k, v in obj.items()}
    return obj
