"""The serve loop of a peer rank: wait for rank 0's messages, join worlds, run methods, report."""

from __future__ import annotations

import logging
import traceback

import parastep
from launcher.control import ControlChannel, start_heartbeat
from launcher.group import join_world, leave_world, run_group
from launcher.methods import configs
from launcher.models import LoadedModel, call_pipeline
from launcher.protocol import PeerReport, PeerRun, Regroup, Shutdown
from launcher.topology import Topology

log = logging.getLogger(__name__)


def serve(topo: Topology, channel: ControlChannel, models: dict[str, LoadedModel]) -> None:
    """Run until rank 0 posts Shutdown (or disappears: the heartbeat thread then exits us)."""
    start_heartbeat(channel)
    channel.catch_up()
    channel.mark_ready()
    gen = -1
    while True:
        index, msg = channel.next_message()
        try:
            if isinstance(msg, Shutdown):
                log.info("rank %d: shutdown", topo.rank)
                return
            if isinstance(msg, Regroup):
                gen = -1
                leave_world()
                if topo.rank in msg.members:
                    try:
                        join_world(topo, msg.gen, msg.members, msg.timeout_s)
                        gen = msg.gen
                    except Exception as exc:  # rank 0 builds the next generation without us
                        log.warning("rank %d: could not join world %d: %s", topo.rank, msg.gen, exc)
                        leave_world()
            elif isinstance(msg, PeerRun) and topo.rank in msg.members:
                if msg.gen != gen:  # we missed the world this run relies on (we were busy or stuck)
                    error = f"rank {topo.rank} is not in world {msg.gen}"
                    channel.report(PeerReport(topo.rank, msg.run_id, False, error))
                else:
                    channel.report(_run(topo, models, msg))
        finally:
            channel.mark_processed(index)


def _run(topo: Topology, models: dict[str, LoadedModel], msg: PeerRun) -> PeerReport:
    req = msg.request
    handle = None
    try:
        chain = configs(req, msg.method, len(msg.members), msg.timeout_s)
        handle = parastep.apply(models[req.model].pipe, chain, group=run_group(len(msg.members)))
        call_pipeline(models[req.model], req, latent_only=True)
        return PeerReport(topo.rank, msg.run_id, True, stats=handle.last_stats)
    except Exception as exc:  # reported to rank 0, the loop goes on
        log.warning("rank %d: run %d failed: %s", topo.rank, msg.run_id, exc)
        log.debug("%s", traceback.format_exc())
        return PeerReport(topo.rank, msg.run_id, False, f"{type(exc).__name__}: {exc}")
    finally:
        if handle is not None:
            handle.remove()
