"""The control channel: rank 0 posts messages, peers wait for them, over the control store.

Why a store and not a broadcast on a control group: an idle peer then has no collective
pending, so no collective time-out can ever fire on it however long the app sits unused,
and rank 0 posting a message never blocks on a dead or stopped peer. Peers block in the
store's own wait (no polling: an idle app costs no CPU, and a message wakes a peer at once).

Every message and report is JSON (never pickle) with an HMAC-SHA256 over its key and body,
keyed by the token the launcher shares with the ranks: a message that does not verify is
logged and dropped. Heartbeats and readiness marks are plain counters and strings.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import socket
import threading
import time
from datetime import timedelta

import torch.distributed as dist

from launcher.protocol import Message, PeerReport, decode, encode

log = logging.getLogger(__name__)

WAKE_S = 300.0  # a blocked wait's timeout; rank 0 going away ends it at once


class ForgedMessage(ValueError):
    """A control message whose MAC does not verify."""


class ControlChannel:
    def __init__(self, store: dist.Store, rank: int, token: bytes) -> None:
        # One connection per channel: a TCPStore connection runs one operation at a time, so a
        # peer blocked in wait() must not share it with the heartbeat thread (see clone()).
        self.store = dist.PrefixStore("parastep-ctl", store.clone() if hasattr(store, "clone") else store)
        self.rank = rank
        self._token = token
        self._next_post = 0
        self._next_read = 0
        self._pruned = 0
        self._lock = threading.Lock()  # rank 0: the coordinator and the UI threads share this channel

    def clone(self) -> ControlChannel:
        """The same channel on a connection of its own, for another thread."""
        twin = ControlChannel.__new__(ControlChannel)
        twin.__dict__.update(self.__dict__)
        twin.store = self.store.clone() if hasattr(self.store, "clone") else self.store
        twin._lock = threading.Lock()
        return twin

    # ---- signed values ----
    def _seal(self, key: str, body: str) -> str:
        mac = hmac.new(self._token, f"{key}\n{body}".encode(), hashlib.sha256).hexdigest()
        return json.dumps({"body": body, "mac": mac})

    def _open(self, key: str, value: bytes) -> Message:
        try:
            sealed = json.loads(value)
            body, mac = sealed["body"], sealed["mac"]
            good = hmac.new(self._token, f"{key}\n{body}".encode(), hashlib.sha256).hexdigest()
        except (ValueError, KeyError, TypeError) as exc:
            raise ForgedMessage(f"{key}: not a sealed control message ({exc})") from None
        if not isinstance(mac, str) or not hmac.compare_digest(mac, good):
            raise ForgedMessage(f"{key}: the MAC does not verify")
        return decode(body)

    # ---- messages (rank 0 -> peers) ----
    def post(self, msg: Message) -> int:
        with self._lock:
            index = self._next_post
            key = f"msg/{index}"
            self.store.set(key, self._seal(key, encode(msg)))
            self._next_post += 1
            self.store.set("msg/next", str(self._next_post))
            return index

    def catch_up(self) -> None:
        """A peer that (re)starts: skip what was posted before it, as if processed."""
        self._next_read = int(self.store.get("msg/next")) if self.store.check(["msg/next"]) else 0
        self.mark_processed(self._next_read - 1)

    @property
    def posted(self) -> int:
        return self._next_post

    def next_message(self) -> tuple[int, Message | None]:
        """Block until the next message arrives; (index, None) for one that did not verify."""
        key = f"msg/{self._next_read}"
        while True:
            try:
                self.store.wait([key], timedelta(seconds=WAKE_S))
                break
            except dist.DistStoreError as exc:
                if "timeout" not in str(exc).lower():
                    raise  # the store is gone with rank 0
        index = self._next_read
        self._next_read += 1
        try:
            return index, self._open(key, self.store.get(key))
        except (ForgedMessage, ValueError) as exc:
            log.error("rank %d: rejected control message %d: %s", self.rank, index, exc)
            return index, None

    def mark_processed(self, index: int) -> None:
        self.store.set(f"done/{self.rank}", str(index))

    def processed(self, rank: int) -> int:
        key = f"done/{rank}"
        with self._lock:
            return int(self.store.get(key)) if self.store.check([key]) else -1

    # ---- reports (peers -> rank 0) ----
    def report(self, rep: PeerReport) -> None:
        key = f"report/{rep.run_id}/{rep.rank}"
        self.store.set(key, self._seal(key, encode(rep)))

    def wait_report(self, run_id: int, rank: int, timeout_s: float) -> PeerReport | None:
        """A peer's report, waiting up to ``timeout_s`` for it (read once: the key is removed).
        A report that does not verify is logged and reads as none."""
        key = f"report/{run_id}/{rank}"
        with self._lock:
            try:
                self.store.wait([key], timedelta(seconds=max(timeout_s, 0.001)))
            except dist.DistStoreError:
                return None
            value = self.store.get(key)
            self.store.delete_key(key)
        try:
            report = self._open(key, value)
        except (ForgedMessage, ValueError) as exc:
            log.error("rejected report of rank %d: %s", rank, exc)
            return None
        if not isinstance(report, PeerReport) or report.rank != rank or report.run_id != run_id:
            log.error("rejected report of rank %d: it is a %s for another run or rank", rank, type(report).__name__)
            return None
        return report

    def prune(self, ranks: list[int]) -> None:
        """Rank 0: forget messages every listed rank has processed (keeps the store small)."""
        upto = min((self.processed(r) for r in ranks), default=self._next_post - 1)
        with self._lock:
            while self._pruned <= upto:
                self.store.delete_key(f"msg/{self._pruned}")
                self._pruned += 1

    # ---- readiness and heartbeats ----
    def mark_ready(self) -> None:
        self.store.set(f"ready/{self.rank}", f"{socket.gethostname()}:{os.getpid()}")

    def unmark_ready(self, rank: int) -> None:
        with self._lock:
            self.store.delete_key(f"ready/{rank}")

    def is_ready(self, rank: int) -> bool:
        with self._lock:
            return self.store.check([f"ready/{rank}"])

    def where(self, rank: int) -> str:
        """'host:pid' of a ready rank."""
        with self._lock:
            key = f"ready/{rank}"
            return self.store.get(key).decode() if self.store.check([key]) else "?"

    def beat(self) -> None:
        self.store.add(f"hb/{self.rank}", 1)

    def beats(self, rank: int) -> int:
        with self._lock:
            return self.store.add(f"hb/{rank}", 0)


def start_heartbeat(channel: ControlChannel, period_s: float = 2.0) -> threading.Thread:
    """Peers: bump a counter every ``period_s`` on a connection of its own; exits the process
    if rank 0 is gone."""
    own = channel.clone()

    def _loop() -> None:
        while True:
            try:
                own.beat()
            except Exception:  # the store lives in rank 0: it is gone
                log.warning("rank %d: control store unreachable, rank 0 is gone; exiting", own.rank)
                os._exit(3)
            time.sleep(period_s)

    thread = threading.Thread(target=_loop, name="parastep-heartbeat", daemon=True)
    thread.start()
    return thread
