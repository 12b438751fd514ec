"""The ParaStep world: which peer ranks are healthy, one process-group world per generation
over them, and what to tell the user when a peer fails.

A generation is a fresh ``init_process_group`` over the healthy ranks, on the control store
under a prefix of its own, renumbered 0..n-1 with rank 0 first. Any failure, a peer that died,
came back or was respawned, starts the next generation: every member aborts its world and joins
the new one. The only sub-group, the first two ranks for methods that run on exactly two
(CFG-parallel) in a world of more, is made by every member right after the world itself, so its
name (a counter that a fresh world resets) is the same everywhere; no NCCL communicator split
has to wait for a dead rank, and gloo and NCCL recover through the same code.

Rank 0's coordinator calls :meth:`PeerGroup.ensure` before every ParaStep run; peers join when
they read the :class:`~launcher.protocol.Regroup` that names them (:func:`join_world`).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from datetime import timedelta

import torch.distributed as dist

import parastep
from launcher.control import ControlChannel
from launcher.protocol import Regroup, RunError
from launcher.topology import Topology

log = logging.getLogger(__name__)

IDLE_LEAVE_S = 10.0  # an unused world is left: gloo's own loop wakes every 10 ms while one exists

_pair: dist.ProcessGroup | None = None  # the world's first two ranks, in a world of 3 or more


def run_group(ranks: int) -> dist.ProcessGroup | None:
    """The process group of a run on the world's first ``ranks`` ranks (None: the whole world)."""
    if not dist.is_initialized() or ranks == dist.get_world_size():
        return None
    if ranks == 2 and _pair is not None:
        return _pair
    raise RunError(f"no process group of {ranks} ranks in a world of {dist.get_world_size()}")


def leave_world() -> None:
    """Abort this process's world, if any: a failed one may hold operations that never finish."""
    global _pair
    _pair = None
    if dist.is_initialized():
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        try:
            (abort or dist.destroy_process_group)()
        except Exception:  # a broken world: nothing more to release
            log.warning("aborting the world failed", exc_info=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        gc.collect()  # the world's last references sit in cycles (a strategy's hooks): free its threads now


def join_world(topo: Topology, gen: int, members: tuple[int, ...], timeout_s: float) -> None:
    """Join generation ``gen``'s world (``members``, launcher ranks, rank 0 first)."""
    leave_world()
    topo.bind_device()
    dist.init_process_group(
        backend="cpu:gloo,cuda:nccl" if topo.backend == "nccl" else "gloo",
        store=dist.PrefixStore(f"world/{gen}", topo.store),
        rank=members.index(topo.rank),
        world_size=len(members),
        timeout=timedelta(seconds=timeout_s),
        device_id=topo.device if topo.device.type == "cuda" else None,
    )
    if len(members) > 2:
        global _pair
        _pair = dist.new_group([0, 1])


class PeerGroup:
    """Health of every peer (process state and heartbeats), respawns, and the current world."""

    def __init__(
        self, topo: Topology, channel: ControlChannel, peer_timeout_s: float, heartbeat_stale_s: float = 10.0
    ) -> None:
        self.topo, self.channel = topo, channel
        self.peer_timeout_s, self.heartbeat_stale_s = peer_timeout_s, heartbeat_stale_s
        self.members: tuple[int, ...] = ()
        self.gen = 0
        self.dirty = True
        self.events: list[str] = []  # what happened to the peers, for /status
        self.last_used = time.monotonic()
        self._last_beat = {r: (0, time.monotonic()) for r in self.peers}
        self._stop = threading.Event()
        self._watch = channel.clone()

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

    def note(self, text: str) -> None:
        log.warning("%s", text)
        self.events = [*self.events[-9:], f"{time.strftime('%H:%M:%S')} {text}"]

    def problem(self, rank: int) -> str | None:
        """Why ``rank`` cannot take part now (dead, respawning, or silent), else None."""
        problem = self.topo.child_problem(rank)
        if problem:
            return problem
        child = self.topo.children.get(rank)
        if child is not None and child.starts > 1 and not self.channel.is_ready(rank):
            return f"rank {rank} is starting again (respawned {time.monotonic() - child.started_at:.0f} s ago)"
        _, since = self._last_beat[rank]
        silent = time.monotonic() - since
        if silent > self.heartbeat_stale_s:
            return f"rank {rank} stopped answering (no heartbeat for {silent:.0f} s)"
        return None

    def heal(self) -> None:
        """Respawn spawned peers that died (under torchrun a lost rank stays lost)."""
        for rank in self.peers:
            problem = self.topo.child_problem(rank)
            if problem:
                self.note(f"{problem}; respawning it")
                self.channel.unmark_ready(rank)
                self.topo.respawn(rank)
                self._last_beat[rank] = (self._last_beat[rank][0], time.monotonic())
                self.dirty = True

    def healthy(self) -> list[int]:
        return [r for r in self.peers if self.problem(r) is None]

    def ensure(self) -> tuple[tuple[int, ...], list[str]]:
        """The current world over the healthy ranks, rebuilt after any change or failure.
        Raises RunError, before any work, when no peer can take part."""
        self.heal()
        healthy, problems = [], []
        for rank in self.peers:
            problem = self.problem(rank) or self._lagging(rank)
            if problem:
                problems.append(problem)
            else:
                healthy.append(rank)
        if not healthy:
            raise RunError(
                "ParaStep, AsyncDiff and CFG-parallel have no peer rank to run with: "
                + "; ".join(problems)
                + ". Baseline and BatchStep still work on rank 0; the others come back by themselves when a peer does."
            )
        members = (0, *healthy)
        if members != self.members or self.dirty:
            self._rebuild(members)
        self.last_used = time.monotonic()
        return self.members, problems

    def rest(self) -> None:
        """Leave a world nobody used for IDLE_LEAVE_S: every rank drops it (and gloo's threads);
        the next ParaStep request builds the next generation (~20 ms on this machine)."""
        if self.members and time.monotonic() - self.last_used > IDLE_LEAVE_S:
            self.gen += 1
            self.channel.post(Regroup(self.gen, (0,), self.peer_timeout_s))  # no peer is a member
            leave_world()
            self.members = ()
            log.info("ParaStep world left after %.0f s unused", IDLE_LEAVE_S)

    def _rebuild(self, members: tuple[int, ...]) -> None:
        self.gen += 1
        self.members, self.dirty = (), True
        self.channel.post(Regroup(self.gen, members, self.peer_timeout_s))
        started = time.monotonic()
        try:
            join_world(self.topo, self.gen, members, self.peer_timeout_s)
        except Exception as exc:
            leave_world()
            missing = [r for r in members[1:] if self.problem(r)] or list(members[1:])
            raise RunError(
                f"Could not build ParaStep's world of ranks {list(members)} (generation {self.gen}): {exc}. "
                f"Waiting for: {', '.join(f'rank {r}' for r in missing)}."
            ) from exc
        self.members, self.dirty = members, False
        log.info("ParaStep world %d: ranks %s (%.2f s)", self.gen, list(members), time.monotonic() - started)

    def collect_reports(self, run_id: int, members: tuple[int, ...]) -> tuple[list[parastep.RunStats], list[str]]:
        """Every member's stats of run ``run_id`` (rank order), and what went wrong with the rest."""
        stats, excluded = [], []
        deadline = time.monotonic() + self.peer_timeout_s
        for rank in members[1:]:
            rep = None
            while rep is None and time.monotonic() < deadline and not self.problem(rank):
                rep = self.channel.wait_report(run_id, rank, min(0.5, deadline - time.monotonic()))
            if rep is not None and rep.ok and rep.stats is not None:
                stats.append(rep.stats)
            else:
                self.dirty = True
                excluded.append(rep.error if rep is not None else (self.problem(rank) or f"rank {rank} did not report"))
        self.channel.prune([r for r in self.peers if not self.topo.child_problem(r)])
        return stats, excluded

    def abandon(self, run_id: int, members: tuple[int, ...], grace_s: float = 2.0) -> None:
        """After a failed run: a peer still inside it waits on a world nobody serves any more, and
        gloo cannot interrupt that wait before its timeout (aborting the group does not wake it).
        A spawned peer that has not reported within ``grace_s`` is killed and started again;
        under torchrun it reports when its timeout fires and then rejoins."""
        leave_world()
        self.members, self.dirty = (), True
        deadline = time.monotonic() + grace_s
        for rank in members[1:]:
            child = self.topo.children.get(rank)
            if child is None or child.proc.poll() is not None:
                continue
            rep = self.channel.wait_report(run_id, rank, max(0.0, deadline - time.monotonic()))
            if rep is None:
                self.note(f"rank {rank} is stuck in the failed run; starting it again")
                child.proc.kill()
                child.proc.wait()
        self.heal()

    def explain(self, exc: Exception, members: tuple[int, ...], label: str = "ParaStep") -> str:
        """A failed distributed run as a message that names the rank and what still works."""
        self.dirty = True
        engine_refused = isinstance(exc, parastep.ParaStepError) and not isinstance(exc, parastep.CommError)
        deadline = time.monotonic() + (0.0 if engine_refused else 3.0)  # a killed process needs a moment
        while True:
            problems = [p for r in members[1:] if (p := self.problem(r))]
            if problems or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        if not problems and not isinstance(exc, parastep.CommError):
            return f"{label} cannot run this request: {type(exc).__name__}: {exc}"
        cause = "; ".join(problems) if problems else str(exc)
        return (
            f"{label} failed: {cause}. Baseline and BatchStep still work on rank 0; "
            f"{label} goes on with the ranks that are left; a spawned rank that died or stays silent is started again."
        )

    def rank_states(self) -> list[dict[str, str | int]]:
        """One row per peer for the status endpoint."""
        rows: list[dict[str, str | int]] = []
        for rank in self.peers:
            problem = self.problem(rank)
            if problem is None and self.channel.processed(rank) < self.channel.posted - 1:
                problem = "busy with an earlier request"
            child = self.topo.children.get(rank)
            row: dict[str, str | int] = {"rank": rank, "where": self.channel.where(rank), "state": problem or "ok"}
            if child is not None:
                row["starts"] = child.starts
            rows.append(row)
        return rows

    def _lagging(self, rank: int) -> str | None:
        """A peer still busy with an earlier message (e.g. finishing a failed run)."""
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
                    count = self._watch.beats(rank)
                except Exception:  # the store is ours: it only fails at shutdown
                    return
                if count != self._last_beat[rank][0]:
                    self._last_beat[rank] = (count, time.monotonic())
            self._stop.wait(1.0)
