"""The ParaStep group: which peer ranks are healthy, the process group over them, and what
to tell the user when a peer fails.

Rank 0's coordinator asks :meth:`PeerGroup.ensure` before every ParaStep run; the group is
rebuilt from the healthy ranks after any failure. Peers build their side with
:func:`new_parastep_group` when the coordinator posts a :class:`~launcher.protocol.Regroup`.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

import parastep
from launcher.control import ControlChannel
from launcher.protocol import Regroup, RunError
from launcher.topology import Topology

log = logging.getLogger(__name__)


def new_parastep_group(topo: Topology, members: tuple[int, ...], timeout_s: float) -> Any:
    """A fresh group for ParaStep traffic; only its members take part in building it."""
    return dist.new_group(
        ranks=list(members),
        timeout=timedelta(seconds=timeout_s),
        backend=topo.backend,
        use_local_synchronization=True,
    )


class PeerGroup:
    """Health of every peer (process state and heartbeats) and the ParaStep group over the healthy."""

    def __init__(
        self, topo: Topology, channel: ControlChannel, peer_timeout_s: float, heartbeat_stale_s: float = 10.0
    ) -> None:
        self.topo, self.channel = topo, channel
        self.peer_timeout_s, self.heartbeat_stale_s = peer_timeout_s, heartbeat_stale_s
        self.group: Any = None
        self.members: tuple[int, ...] = ()
        self.gen = 0
        self.dirty = True
        self._last_beat = {r: (0, time.monotonic()) for r in self.peers}
        self._stop = threading.Event()

    @property
    def peers(self) -> list[int]:
        return list(range(1, self.topo.world_size))

    def wait_ready(self, timeout_s: float) -> None:
        """Until every peer has loaded its models; then heartbeats are watched."""
        deadline = time.monotonic() + timeout_s
        for rank in self.peers:
            while not self.channel.is_ready(rank):
                problem = self.topo.child_problem(rank)
                if problem:
                    raise RuntimeError(f"{problem} while loading models; see its log above")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rank {rank} did not become ready within {timeout_s:.0f} s")
                time.sleep(0.1)
        self._last_beat = {r: (self.channel.beats(r), time.monotonic()) for r in self.peers}
        if self.peers:
            threading.Thread(target=self._watch_heartbeats, name="parastep-heartbeats", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def problem(self, rank: int) -> str | None:
        """Why ``rank`` cannot take part now (dead, or silent), else None."""
        problem = self.topo.child_problem(rank)
        if problem:
            return problem
        _, since = self._last_beat[rank]
        silent = time.monotonic() - since
        if silent > self.heartbeat_stale_s:
            return f"rank {rank} stopped answering (no heartbeat for {silent:.0f} s)"
        return None

    def ensure(self) -> tuple[tuple[int, ...], list[str]]:
        """The healthy ranks, in a ParaStep group; rebuilt after any failure. Raises RunError."""
        healthy, problems = [], []
        for rank in self.peers:
            problem = self.problem(rank) or self._lagging(rank)
            if problem:
                problems.append(problem)
            else:
                healthy.append(rank)
        if not healthy:
            raise RunError(
                "ParaStep has no peer rank to run with: "
                + "; ".join(problems)
                + ". Baseline and BatchStep still work on rank 0; restart the app to bring ParaStep back."
            )
        members = (0, *healthy)
        if members != self.members or self.dirty:
            self.gen += 1
            self.channel.post(Regroup(self.gen, members, self.peer_timeout_s))
            try:
                self.group = new_parastep_group(self.topo, members, self.peer_timeout_s)
            except Exception as exc:
                raise RunError(f"Could not build the ParaStep group of ranks {list(members)}: {exc}") from exc
            self.members, self.dirty = members, False
            log.info("ParaStep group %d: ranks %s", self.gen, list(members))
        return members, problems

    def collect_reports(self, run_id: int, members: tuple[int, ...]) -> tuple[list[parastep.RunStats], list[str]]:
        """Every member's stats of run ``run_id`` (rank order), and what went wrong with the rest."""
        stats, excluded = [], []
        deadline = time.monotonic() + self.peer_timeout_s
        for rank in members[1:]:
            while (rep := self.channel.try_report(run_id, rank)) is None:
                if self.problem(rank) or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            if rep is not None and rep.ok and rep.stats is not None:
                stats.append(rep.stats)
            else:
                self.dirty = True
                excluded.append(rep.error if rep is not None else (self.problem(rank) or f"rank {rank} did not report"))
        self.channel.prune([r for r in self.peers if not self.topo.child_problem(r)])
        return stats, excluded

    def explain(self, exc: Exception, members: tuple[int, ...]) -> str:
        """A failed ParaStep run as a message that names the rank and what still works."""
        self.dirty = True
        engine_refused = isinstance(exc, parastep.ParaStepError) and not isinstance(exc, parastep.CommError)
        deadline = time.monotonic() + (0.0 if engine_refused else 3.0)  # a killed process needs a moment
        while True:
            problems = [p for r in members[1:] if (p := self.problem(r))]
            if problems or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if not problems and not isinstance(exc, parastep.CommError):
            return f"ParaStep cannot run this request: {type(exc).__name__}: {exc}"
        cause = "; ".join(problems) if problems else str(exc)
        return (
            f"ParaStep failed: {cause}. Baseline and BatchStep still work on rank 0; "
            "ParaStep will use the ranks that are left."
        )

    def rank_states(self) -> list[dict[str, Any]]:
        """One row per peer for the status endpoint."""
        rows = []
        for rank in self.peers:
            problem = self.problem(rank)
            if problem is None and self.channel.processed(rank) < self.channel.posted - 1:
                problem = "busy with an earlier request"
            rows.append({"rank": rank, "where": self.channel.where(rank), "state": problem or "ok"})
        return rows

    def _lagging(self, rank: int) -> str | None:
        """A peer still busy with an earlier message (e.g. stuck in a timed-out run)."""
        deadline = time.monotonic() + 2.0
        while self.channel.processed(rank) < self.channel.posted - 1:
            if time.monotonic() > deadline:
                return f"rank {rank} is still busy with an earlier request"
            time.sleep(0.02)
        return None

    def _watch_heartbeats(self) -> None:
        while not self._stop.is_set():
            for rank in self.peers:
                try:
                    count = self.channel.beats(rank)
                except Exception:  # the store is ours: it only fails at shutdown
                    return
                if count != self._last_beat[rank][0]:
                    self._last_beat[rank] = (count, time.monotonic())
            time.sleep(0.5)
