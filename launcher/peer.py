"""The serve loop of a peer rank: wait for messages from rank 0, run ParaStep, report."""

from __future__ import annotations

import logging
import traceback
from typing import Any

import parastep
from launcher.control import ControlChannel, start_heartbeat
from launcher.group import new_parastep_group
from launcher.models import LoadedModel, call_pipeline
from launcher.protocol import PeerReport, PeerRun, Regroup, Shutdown
from launcher.topology import Topology

log = logging.getLogger(__name__)


def serve(topo: Topology, channel: ControlChannel, models: dict[str, LoadedModel]) -> None:
    """Run until rank 0 posts Shutdown (or disappears: the heartbeat thread then exits us)."""
    start_heartbeat(channel)
    channel.mark_ready()
    group: Any = None
    gen = -1
    while True:
        index, msg = channel.next_message()
        try:
            if isinstance(msg, Shutdown):
                log.info("rank %d: shutdown", topo.rank)
                return
            if isinstance(msg, Regroup) and topo.rank in msg.members:
                group, gen = new_parastep_group(topo, msg.members, msg.timeout_s), msg.gen
            elif isinstance(msg, PeerRun) and topo.rank in msg.members:
                if msg.gen != gen or group is None:
                    # We missed the regroup this run relies on (we were busy or stuck).
                    channel.report(
                        PeerReport(topo.rank, msg.run_id, False, f"rank {topo.rank} is not in group {msg.gen}")
                    )
                else:
                    channel.report(_run(topo, group, models, msg))
        finally:
            channel.mark_processed(index)


def _run(topo: Topology, group: Any, models: dict[str, LoadedModel], msg: PeerRun) -> PeerReport:
    req = msg.request
    handle = None
    try:
        config = parastep.ParaStepConfig(
            warmup_steps=req.warmup_steps, degree=len(msg.members), timeout_s=msg.timeout_s
        )
        handle = parastep.apply(models[req.model].pipe, config, group=group)
        call_pipeline(models[req.model], req, latent_only=True)
        return PeerReport(topo.rank, msg.run_id, True, stats=handle.last_stats)
    except Exception as exc:  # reported to rank 0, the loop goes on
        log.warning("rank %d: run %d failed: %s", topo.rank, msg.run_id, exc)
        log.debug("%s", traceback.format_exc())
        return PeerReport(topo.rank, msg.run_id, False, f"{type(exc).__name__}: {exc}")
    finally:
        if handle is not None:
            handle.remove()
