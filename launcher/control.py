"""The control channel: rank 0 posts messages, peers poll them, over the c10d store.

Why a store and not a broadcast on a control group: an idle peer then has no collective
pending, so no collective time-out can ever fire on it however long the app sits unused,
and rank 0 posting a message never blocks on a dead or stopped peer. The store is the
rendezvous store every rank (on every node) already reaches. Heartbeats and peer reports
travel the same way.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from torch.distributed import PrefixStore, Store

from launcher.protocol import Message, PeerReport, decode, encode

log = logging.getLogger(__name__)


class ControlChannel:
    def __init__(self, store: Store, rank: int, world_size: int) -> None:
        self.store = PrefixStore("parastep-ctl/", store)
        self.rank = rank
        self.world_size = world_size
        self._next_post = 0
        self._next_read = 0
        self._pruned = 0

    # ---- messages (rank 0 -> peers) ----
    def post(self, msg: Message) -> int:
        index = self._next_post
        self.store.set(f"msg/{index}", encode(msg))
        self._next_post += 1
        return index

    @property
    def posted(self) -> int:
        return self._next_post

    def next_message(self, poll_s: float = 0.02) -> tuple[int, Message]:
        """Block (polling, never a collective) until the next message arrives."""
        key = f"msg/{self._next_read}"
        while not self.store.check([key]):
            time.sleep(poll_s)
        msg = decode(self.store.get(key))
        index = self._next_read
        self._next_read += 1
        return index, msg

    def mark_processed(self, index: int) -> None:
        self.store.set(f"done/{self.rank}", str(index))

    def processed(self, rank: int) -> int:
        key = f"done/{rank}"
        return int(self.store.get(key)) if self.store.check([key]) else -1

    # ---- reports (peers -> rank 0) ----
    def report(self, rep: PeerReport) -> None:
        self.store.set(f"report/{rep.run_id}/{rep.rank}", encode(rep))

    def try_report(self, run_id: int, rank: int) -> PeerReport | None:
        """A peer's report, if it has arrived (read once: the key is then removed)."""
        key = f"report/{run_id}/{rank}"
        if not self.store.check([key]):
            return None
        report = decode(self.store.get(key))
        if not isinstance(report, PeerReport):
            raise ValueError(f"rank {rank} wrote a {type(report).__name__} where its report belongs")
        self.store.delete_key(key)
        return report

    def prune(self, ranks: list[int]) -> None:
        """Rank 0: forget messages every listed rank has processed (keeps the store small)."""
        upto = min((self.processed(r) for r in ranks), default=self._next_post - 1)
        while self._pruned <= upto:
            self.store.delete_key(f"msg/{self._pruned}")
            self._pruned += 1

    # ---- readiness and heartbeats ----
    def mark_ready(self) -> None:
        self.store.set(f"ready/{self.rank}", f"{socket.gethostname()}:{os.getpid()}")

    def is_ready(self, rank: int) -> bool:
        return self.store.check([f"ready/{rank}"])

    def where(self, rank: int) -> str:
        """'host:pid' of a ready rank."""
        return self.store.get(f"ready/{rank}").decode() if self.is_ready(rank) else "?"

    def beat(self) -> None:
        self.store.add(f"hb/{self.rank}", 1)

    def beats(self, rank: int) -> int:
        return self.store.add(f"hb/{rank}", 0)


def start_heartbeat(channel: ControlChannel, period_s: float = 1.0) -> threading.Thread:
    """Peers: bump a counter every ``period_s``; exits the process if rank 0 is gone."""

    def _loop() -> None:
        while True:
            try:
                channel.beat()
            except Exception:
                log.warning("rank %d: control store unreachable, rank 0 is gone; exiting", channel.rank)
                os._exit(3)
            time.sleep(period_s)

    thread = threading.Thread(target=_loop, name="parastep-heartbeat", daemon=True)
    thread.start()
    return thread
