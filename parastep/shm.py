"""Messages between ranks on one host through shared memory, beside the process group.

Gloo over loopback spends about 0.2 ms of a rank's core per message on a small CPU (its worker
thread, the socket, the hand-offs), more than packing the message; a mailbox in ``/dev/shm``
costs two FIFO writes (the sender packs the message straight into it, the receiver copies each
tensor straight out of it: one copy each way), and its receiver can poll for a message instead
of sleeping (see :func:`_wait`). :class:`Mailboxes` is set up by every rank of a group at
once (it uses the group's gloo collectives) and covers each pair whose two ranks see each
other's files; every other pair keeps the group's transport. ``PARASTEP_SHM_DISABLE=1`` turns it
off, like ``NCCL_SHM_DISABLE`` (for ranks that share ``/dev/shm`` but stand for separate
nodes, as a network emulation does).

One mailbox per direction: a file holding one message (a 64-byte header: its size and where it
starts, then its bytes; the file grows with the largest message), a FIFO the sender writes a
byte to once the message is in ("ready"), and a FIFO the receiver writes a byte to once it has
copied the message out ("free"). The FIFO writes and reads are system calls, so they order the
memory accesses on both sides on any CPU. A rank that dies closes its FIFOs: the peer waiting on
it gets a :class:`~parastep.CommError` at once, not at the timeout. The files are unlinked as
soon as both ends hold them: nothing is left in ``/dev/shm``, whatever happens later.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import select
import time
import weakref

import numpy as np
import torch
import torch.distributed as dist

from .errors import CommError

_DIR = "/dev/shm"
_HEADER = 64  # bytes before a message's room: int64 size, int64 "travels over the group instead", int64 lead
_LINE = 64  # a cache line: the message starts `lead` bytes into its room to put the byte it names on one
_TOKEN = 16
_NO_TOKEN = "-" * _TOKEN  # a rank that offers no mailbox
SPIN_S = 0.01  # a receiver polls its mailbox this long before it sleeps in poll() (see _wait)


def enabled() -> bool:
    return os.environ.get("PARASTEP_SHM_DISABLE", "0") in ("", "0") and os.path.isdir(_DIR)


_BY_GROUP: weakref.WeakKeyDictionary[dist.ProcessGroup, Mailboxes] = weakref.WeakKeyDictionary()


def mailboxes(group: dist.ProcessGroup, rank: int, size: int) -> Mailboxes:
    """``group``'s mailboxes, set up on its first use by every rank of it together (a collective,
    the same on every rank whatever each one's ``PARASTEP_SHM_DISABLE``: a rank that is off offers
    no mailbox) and kept as long as the group lives: ~4 ms of files and gathers, not per call."""
    boxes = _BY_GROUP.get(group)
    if boxes is None:
        boxes = _BY_GROUP[group] = Mailboxes(group, rank, size, offer=enabled())
    return boxes


class _Box:
    """One direction with one peer: the mapped file and this end of the two FIFOs."""

    def __init__(self, fd: int, wake: int, done: int):
        self.fd, self.wake, self.done = fd, wake, done  # file; FIFO we wait on; FIFO we write to
        self.map = mmap.mmap(fd, os.fstat(fd).st_size)
        self.unacked = False  # (sending) a message the receiver has not freed yet

    def remap(self, size: int) -> None:
        # the old mapping is not closed but dropped: a tensor view of it (torch.frombuffer holds no
        # buffer export, so close() would not refuse) keeps it mapped until the view is gone
        self.map = mmap.mmap(self.fd, size)


class Mailboxes:
    """Shared-memory mailboxes with the peers of ``group`` that are on this host (:attr:`peers`);
    none when this rank does not ``offer`` any. Every rank of ``group`` constructs it at once."""

    def __init__(self, group: dist.ProcessGroup, rank: int, size: int, offer: bool = True):
        self.rank, self.peers = rank, frozenset[int]()
        self._out: dict[int, _Box] = {}
        self._in: dict[int, _Box] = {}
        fds: list[int] = []
        weakref.finalize(self, _close, fds, self._out, self._in)
        token = secrets.token_hex(_TOKEN // 2) if offer else _NO_TOKEN
        mine: list[str] = []
        outgoing: dict[int, int] = {}
        free_read: dict[int, int] = {}
        try:
            try:  # our files toward each peer, and our end of each "free" FIFO
                for p in range(size):
                    if p != rank and offer:
                        base = _path(token, rank, p)
                        fd = os.open(base, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                        fds.append(fd)
                        mine.append(base)
                        os.ftruncate(fd, _HEADER)
                        outgoing[p] = fd
                        for suffix in (".ready", ".free"):
                            os.mkfifo(base + suffix, 0o600)
                            mine.append(base + suffix)
                        free_read[p] = _open(base + ".free", os.O_RDONLY, fds)
            except OSError:
                token = _NO_TOKEN  # no file of ours: no peer will see us
            # every rank takes part in every gather below, whatever failed here: none is left waiting
            tokens = [t.tobytes().decode() for t in _all_gather(group, size, _row(token.encode()))]
            seen = np.zeros(size, dtype=np.uint8)
            incoming: dict[int, tuple[int, int]] = {}
            for p in range(size):  # the peers' files toward us: can we open them?
                if p != rank and _NO_TOKEN not in (token, tokens[p]):
                    try:
                        base = _path(tokens[p], p, rank)
                        fd = _open(base, os.O_RDWR, fds)
                        incoming[p] = (fd, _open(base + ".ready", os.O_RDONLY, fds))
                        seen[p] = 1
                    except OSError:
                        pass
            both = _all_gather(group, size, seen)
            ready = np.zeros(size, dtype=np.uint8)
            for p in incoming:  # the write ends: the peer opened the read ends before the last gather
                if both[p][rank]:
                    try:
                        fd, wake = incoming[p]
                        done = _open(_path(tokens[p], p, rank) + ".free", os.O_WRONLY, fds)
                        self._in[p] = _Box(fd, wake, done)
                        sends = _open(_path(token, rank, p) + ".ready", os.O_WRONLY, fds)
                        self._out[p] = _Box(outgoing[p], free_read[p], sends)
                        ready[p] = 1
                    except OSError:
                        self._in.pop(p, None)
            final = _all_gather(group, size, ready)  # every end is open: the files can go
            self.peers = frozenset(p for p in range(size) if final[rank][p] and final[p][rank])
            for p in set(self._in) - self.peers:
                del self._in[p], self._out[p]
        finally:
            for path in mine:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def outbox(self, dst: int, size: int, timeout_s: float, aligned: int = 0) -> torch.Tensor | None:
        """A writable view of ``size`` bytes of ``dst``'s mailbox whose byte ``aligned`` starts a
        cache line, once ``dst`` has freed its last message; None when they do not fit in
        ``/dev/shm`` (``dst`` is then told to receive the message over the group instead).
        :meth:`post` sends it, in either case. The bytes are the last message's: write every one
        that means something. (A 196 KB tensor 16 bytes past a cache line took up to 1.4x as long
        to send between two cores of a VM, measured on Comm.send, as one on a line.)"""
        box = self._out[dst]
        if box.unacked:  # the receiver still copies the previous message out
            _wait(box.wake, timeout_s, dst, "taking its previous message")
            box.unacked = False
        lead = -aligned % _LINE
        fits = True
        if _HEADER + lead + size > len(box.map):
            try:  # reserve: touching a page past tmpfs's room is SIGBUS
                os.posix_fallocate(box.fd, 0, _HEADER + lead + size)
                box.remap(_HEADER + lead + size)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EFBIG):
                    raise
                fits = False
        header = np.frombuffer(box.map, dtype=np.int64, count=3)
        header[:] = (size, 0 if fits else 1, lead)
        del header
        return torch.frombuffer(box.map, dtype=torch.uint8, count=size, offset=_HEADER + lead) if fits else None

    def post(self, dst: int) -> None:
        """Tells ``dst`` that the message :meth:`outbox` gave the room for is in."""
        box = self._out[dst]
        _signal(box.done, dst)
        box.unacked = True

    def inbox(self, src: int, timeout_s: float) -> torch.Tensor | int:
        """``src``'s next message: a view of it in the mailbox, valid until :meth:`free`, or its
        size when it travels over the group (the mailbox is then free already)."""
        box = self._in[src]
        _wait(box.wake, timeout_s, src, f"sending to rank {self.rank}")
        size, over_group, lead = (int(v) for v in np.frombuffer(box.map, dtype=np.int64, count=3))
        if over_group:
            _freed(box.done)
            return size
        if _HEADER + lead + size > len(box.map):
            box.remap(os.fstat(box.fd).st_size)
        return torch.frombuffer(box.map, dtype=torch.uint8, count=size, offset=_HEADER + lead)

    def free(self, src: int) -> None:
        """Tells ``src`` its mailbox may take the next message: nothing may read the view
        :meth:`inbox` gave after this."""
        _freed(self._in[src].done)


def _path(token: str, src: int, dst: int) -> str:
    return f"{_DIR}/parastep-{token}-{src}to{dst}"


def _row(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def _open(path: str, flags: int, fds: list[int]) -> int:
    fd = os.open(path, flags | os.O_NONBLOCK)
    fds.append(fd)
    return fd


def _all_gather(group: dist.ProcessGroup, size: int, row: np.ndarray) -> list[np.ndarray]:
    mine = torch.from_numpy(row.copy())
    rows = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(rows, mine, group=group)
    return [r.numpy() for r in rows]


def _signal(fd: int, peer: int) -> None:
    try:
        os.write(fd, b"\0")
    except (BrokenPipeError, BlockingIOError) as exc:
        raise CommError(f"rank {peer} is gone (its shared-memory mailbox is closed): {exc}") from exc


def _freed(fd: int) -> None:
    """Tells the sender its mailbox is free; a sender that is gone has nothing more to send."""
    try:
        os.write(fd, b"\0")
    except BrokenPipeError:
        pass


def _wait(fd: int, timeout_s: float, peer: int, what: str) -> None:
    """Takes one byte from the FIFO ``fd``, waiting up to ``timeout_s``: polling it, yielding the
    core between tries, for the first :data:`SPIN_S`, then asleep in ``poll()``. A message is
    due within a denoiser step; a rank that sleeps for it leaves its core idle, and on a virtual
    machine waking a halted core takes the host's time (measured: a ParaStep-2 window's two
    messages 0.44 ms asleep, 0.20 ms polling; gloo 0.60 ms). Gloo cannot poll like this: its
    own thread moves the bytes and needs the core (ParaStep-2 3.3x slower when tried)."""
    start = time.monotonic()
    deadline, spin_until = start + timeout_s, start + SPIN_S
    while True:
        try:
            if os.read(fd, 1):
                return
            raise CommError(f"rank {peer} is gone: it closed its shared-memory mailbox before {what}")
        except BlockingIOError:
            pass
        now = time.monotonic()
        if now < spin_until:
            os.sched_yield()
            continue
        left = deadline - now
        if left <= 0:
            raise CommError(f"rank {peer} did not complete {what} within {timeout_s:g}s")
        poll = select.poll()
        poll.register(fd, select.POLLIN | select.POLLHUP)
        poll.poll(min(left, 1.0) * 1000)


def _close(fds: list[int], *boxes: dict[int, _Box]) -> None:
    for group in boxes:
        for box in group.values():
            box.map.close()
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
