"""The window's message order cannot deadlock on NCCL: every rank's point-to-point operations,
recorded on gloo ranks in the order they are posted, replayed under NCCL's semantics."""

from __future__ import annotations

import os
from collections import defaultdict, deque
from typing import Any

import diffusers
import pytest
import torch
import torch.distributed as dist

import parastep
import parastep.comm
from parastep.comm import Comm
from tests.distributed import run_ranks
from tests.toy import toy_embeds, toy_pipeline

SCHEDULERS = ["DDIMScheduler", "DPMSolverMultistepScheduler"]
PROTOCOLS = ["when_due", "gloo"]  # the order NCCL gets (receives posted when due), gloo's (early)
T, W = 11, 2

# A trace is one rank's events in program order: ("post", id, "send" | "recv", peer, bytes)
# when an operation is posted, ("wait", id) when the host waits for it.
Trace = list[tuple]


class _Recorded:
    """A dist.Work that records the host waiting for it."""

    def __init__(self, work: Any, op: int, trace: Trace):
        self._work, self._op, self._trace = work, op, trace

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        self._trace.append(("wait", self._op))
        return self._work.wait(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


def _record(trace: Trace) -> None:
    """Wraps torch.distributed.isend/irecv (what parastep.comm calls) in this process."""
    isend, irecv = dist.isend, dist.irecv

    def op(kind: str, fn: Any) -> Any:
        def posted(tensor: torch.Tensor, peer: int, group: Any = None, *args: Any, **kwargs: Any) -> Any:
            n = sum(1 for e in trace if e[0] == "post")
            trace.append(("post", n, kind, peer, tensor.numel() * tensor.element_size()))
            return _Recorded(fn(tensor, peer, group, *args, **kwargs), n, trace)

        return posted

    dist.isend, dist.irecv = op("send", isend), op("recv", irecv)


def record_rank(rank: int, protocol: str) -> dict:
    """Every rank's trace of one ParaStep call per scheduler (and of Comm.exchange), over the
    group's own operations (shared memory off: the trace is what a GPU group would run)."""
    os.environ["PARASTEP_SHM_DISABLE"] = "1"
    trace: Trace = []
    _record(trace)
    if protocol == "when_due":  # force the order the function gives NCCL (and unknown backends)
        parastep.comm.receives_may_be_posted_early = lambda group, device: False
    traces = {}
    for name in SCHEDULERS:
        pipe = toy_pipeline(getattr(diffusers, name))
        handle = parastep.apply(pipe, parastep.ParaStepConfig(warmup_steps=W))
        trace.clear()
        pipe(*toy_embeds(), num_inference_steps=T, generator=torch.Generator().manual_seed(0), output_type="latent")
        traces[name] = list(trace)
        handle.remove()
    comm = Comm(dist.group.WORLD, timeout_s=30)
    cpu, others = torch.device("cpu"), [r for r in range(comm.size) if r != rank]
    trace.clear()
    for size in (4, 64):
        comm.exchange({r: {"x": torch.full((size,), float(rank))} for r in others}, others, cpu)
    comm.exchange({0: torch.tensor([rank])} if rank else {}, others if rank == 0 else [], cpu)
    traces["exchange"] = list(trace)
    return traces


def simulate(traces: dict[int, Trace], per_pair: bool) -> str | None:
    """Replays the traces under NCCL's semantics; None when every operation completes, else
    what went wrong. A rank's operations run in posting order on one stream per peer
    (``per_pair``: NCCL without ``device_id``) or one stream for the whole group (with
    ``device_id``/eager init); a send completes with the peer's receive only when both are at
    the head of their streams (a rendezvous: NCCL may buffer a small send, never more), and
    their sizes must agree. The host of a rank stops at a wait until its operation completed.
    Matching only removes heads and posting only appends, so every execution reaches the same
    end: one replay decides whether any execution can deadlock."""
    pc = dict.fromkeys(traces, 0)
    streams: dict[tuple[int, int | None], deque] = defaultdict(deque)
    done: dict[int, set[int]] = {r: set() for r in traces}
    progress = True
    while progress:
        progress = False
        for r, trace in traces.items():
            while pc[r] < len(trace):
                event = trace[pc[r]]
                if event[0] == "post":
                    _, op, kind, peer, n = event
                    streams[(r, peer if per_pair else None)].append((op, kind, peer, n))
                elif event[1] not in done[r]:
                    break
                pc[r] += 1
                progress = True
        for (r, _), stream in list(streams.items()):
            if not stream or stream[0][1] != "send":
                continue
            op, _, peer, n = stream[0]
            other = streams.get((peer, r if per_pair else None))
            if other and other[0][1] == "recv" and other[0][2] == r:
                if other[0][3] != n:
                    return f"size mismatch: rank {r} sends {n} bytes to rank {peer}, which receives {other[0][3]}"
                done[r].add(op)
                done[peer].add(other[0][0])
                stream.popleft()
                other.popleft()
                progress = True
    stuck = {f"rank {r}": list(s)[:2] for (r, _), s in streams.items() if s}
    waiting = {r: traces[r][pc[r]] for r in traces if pc[r] < len(traces[r])}
    if stuck or waiting:
        return f"deadlock: stream heads {stuck}, hosts waiting at {waiting}"
    return None


# P = 2 in the fast suite; 3 and 4 ranks (a spawn each) in the slow one
@pytest.fixture(
    scope="module",
    params=[2, pytest.param(3, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)],
    ids=lambda p: f"P{p}",
)
def traces(request) -> dict[str, list[dict]]:
    p = request.param
    return {protocol: run_ranks(record_rank, p, protocol) for protocol in PROTOCOLS}


@pytest.mark.parametrize("per_pair", [True, False], ids=["stream-per-pair", "stream-per-group"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_the_nccl_order_completes_and_the_gloo_order_would_deadlock(traces, name, per_pair):
    nccl = {r: t[name] for r, t in enumerate(traces["when_due"])}
    size = len(nccl)
    for r, trace in nccl.items():  # every rank really talks to every peer it should
        peers = {e[3] for e in trace if e[0] == "post"}
        assert peers == (set(range(1, size)) if r == 0 else {0}), (r, peers)
    assert simulate(nccl, per_pair) is None, simulate(nccl, per_pair)
    gloo = {r: t[name] for r, t in enumerate(traces["gloo"])}
    assert [len(t) for t in gloo.values()] == [len(t) for t in nccl.values()]
    failure = simulate(gloo, per_pair)  # the simulator can fail: receives posted early deadlock
    assert failure is not None and failure.startswith("deadlock"), failure


@pytest.mark.parametrize("per_pair", [True, False], ids=["stream-per-pair", "stream-per-group"])
def test_exchange_completes_under_nccl_semantics(traces, per_pair):
    for protocol in PROTOCOLS:  # exchange never posts a receive early, whatever the backend
        recorded = {r: t["exchange"] for r, t in enumerate(traces[protocol])}
        assert all(len(t) > 0 for t in recorded.values())
        assert simulate(recorded, per_pair) is None, simulate(recorded, per_pair)


def test_the_simulator_finds_a_size_mismatch_and_a_crossed_pair():
    mismatch = {0: [("post", 0, "send", 1, 16), ("wait", 0)], 1: [("post", 0, "recv", 0, 32), ("wait", 0)]}
    assert str(simulate(mismatch, True)).startswith("size mismatch")
    crossed = {  # both ranks receive first: gloo completes this, NCCL never does
        0: [("post", 0, "recv", 1, 8), ("post", 1, "send", 1, 8), ("wait", 0)],
        1: [("post", 0, "recv", 0, 8), ("post", 1, "send", 0, 8), ("wait", 0)],
    }
    assert str(simulate(crossed, True)).startswith("deadlock")
    ordered = {0: crossed[0], 1: [("post", 0, "send", 0, 8), ("post", 1, "recv", 0, 8), ("wait", 1)]}
    assert simulate(ordered, True) is None
    three = {  # on one stream per group rank 0's order matters across peers too
        0: [("post", 0, "recv", 2, 8), ("post", 1, "recv", 1, 8), ("wait", 1)],
        1: [("post", 0, "send", 0, 8), ("post", 1, "recv", 2, 8), ("wait", 1)],
        2: [("post", 0, "send", 1, 8), ("post", 1, "send", 0, 8), ("wait", 1)],
    }
    assert simulate(three, True) is None and str(simulate(three, False)).startswith("deadlock")


def test_a_skeleton_travels_as_tagged_json_never_pickled():
    import numpy as np

    from parastep.comm import _decode, _encode, _strip

    state = {
        "lower": 2,
        "f": 2.0,
        "flag": True,
        "inf": float("inf"),
        "nan": float("nan"),
        3: ("dpm", None, [1, 2.5]),
        "dtype": torch.float16,
        "np": np.float32(0.5),
        "sigmas": np.array([1.0, 0.5]),
        "x": [torch.zeros(2, 3, dtype=torch.bfloat16)],
    }
    tensors: list[torch.Tensor] = []
    blob = _encode(_strip(state, tensors), tensors)
    assert b"pickle" not in blob and blob.startswith(b"{")
    back = _decode(blob)
    assert [type(back[k]) for k in ("lower", "f", "flag")] == [int, float, bool]
    assert back["inf"] == float("inf") and back["nan"] != back["nan"] and back[3] == ("dpm", None, [1, 2.5])
    assert back["dtype"] is torch.float16 and back["np"] == np.float32(0.5) and type(back["np"]) is np.float32
    assert [s.where for s in (back["x"][0], back["sigmas"])] == ["cpu", "numpy"] and len(tensors) == 2
    with pytest.raises(parastep.CommError, match=r"cannot hold .*object .*\['obj'\]"):
        _encode({"obj": object()}, [])
    assert _decode(_encode({(1, "a"): 0}, [])) == {(1, "a"): 0}  # tuple keys round-trip
    with pytest.raises(parastep.CommError, match="is a float: use str, int or a tuple of them"):
        _encode({1.5: 0}, [])


@pytest.mark.parametrize(
    "spec,early_cpu,early_cuda",
    [
        ("gloo", True, True),
        ("nccl", False, False),
        ("cpu:gloo,cuda:nccl", True, False),
        ("cuda:nccl", False, False),
        ("mpi", False, False),  # unknown: when due
    ],
)
def test_the_groups_backend_for_the_device_decides_the_order(monkeypatch, spec, early_cpu, early_cuda):
    from parastep import comm

    monkeypatch.setattr(comm.dist, "get_backend", lambda group: spec)
    assert comm.receives_may_be_posted_early(None, torch.device("cpu")) is early_cpu
    assert comm.receives_may_be_posted_early(None, torch.device("cuda", 1)) is early_cuda


def test_cpu_tensors_on_an_nccl_only_group_are_a_clear_error(monkeypatch):
    from parastep import comm

    monkeypatch.setattr(comm.dist, "get_backend", lambda group: "nccl")
    monkeypatch.setattr(comm.dist, "get_rank", lambda group: 0)
    monkeypatch.setattr(comm.dist, "get_world_size", lambda group: 2)
    c = Comm(None, timeout_s=1)
    for attempt in (lambda: c.send(torch.ones(1), 1, torch.device("cpu")), lambda: c.recv(1, torch.device("cpu"))):
        with pytest.raises(parastep.CommError, match="cpu:gloo,cuda:nccl"):
            attempt()
