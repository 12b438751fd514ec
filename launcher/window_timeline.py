"""Where a ParaStep-2 window's time goes on this machine: the figures in docs/BENCHMARKS.md.

    .venv/bin/python -m launcher.window_timeline [--model image] [--calls 5]

Two gloo ranks, pinned as the app pins them, run the built-in model (T=50, W=5) after a
baseline call on rank 0. Every denoiser call, scheduler step and message of rank 0 and rank
1 is timestamped (time.perf_counter: one clock for both processes); the table gives, per
window after warm-up, the median time of each phase and the window itself. A diagnostic,
not part of the product: it wraps methods from outside to time them.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import parastep
from launcher.bench import request_for
from launcher.models import call_pipeline, load_models
from launcher.topology import core_share, free_port
from parastep import comm

STEPS, WARMUP = 50, 5
# (label, event, top level?): _pack runs inside send, _unpack inside recv
PHASES = (
    ("denoiser call", "denoiser", True),
    ("scheduler.step", "scheduler.step", True),
    ("post a receive (Comm.expect)", "expect", True),
    ("Comm.send", "send", True),
    ("  of which packing", "_pack", False),
    ("Comm.recv (waiting included)", "recv", True),
    ("  of which unpacking", "_unpack", False),
)


def _timed(owner: object, name: str, label: str, events: list) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)  # keeps the signature the engine reads
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            events.append((label, start, time.perf_counter()))

    setattr(owner, name, timed)


def _rank(rank: int, port: int, kind: str, calls: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.sched_setaffinity(0, core_share(rank, 2) or os.sched_getaffinity(0))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ((name, model),) = load_models([kind], [], torch.device("cpu")).items()
    req = request_for(name, model, STEPS, WARMUP, seed=0)
    events: list = []
    _timed(model.pipe.unet, "forward", "denoiser", events)
    _timed(type(model.pipe.scheduler), "step", "scheduler.step", events)
    for method in ("expect", "send", "recv"):
        _timed(comm.Comm, method, method, events)
    for function in ("_pack", "_unpack"):
        _timed(comm, function, function, events)
    call_pipeline(model, req, latent_only=True)  # first-call costs stay out
    walls = []
    for _ in range(calls):
        dist.barrier()
        base = call_pipeline(model, req, latent_only=True)[1] if rank == 0 else 0.0
        dist.barrier()
        handle = parastep.apply(model.pipe, parastep.ParaStepConfig(warmup_steps=WARMUP, degree=2))
        events.clear()
        walls.append((base, call_pipeline(model, req, latent_only=True)[1]))
        handle.remove()
    queue.put((rank, list(events), walls))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="image", choices=["image", "video", "audio"])
    p.add_argument("--calls", type=int, default=5)
    args = p.parse_args()
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, args.model, args.calls, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    results = dict((rank, (events, walls)) for rank, events, walls in (queue.get(timeout=600) for _ in procs))
    for proc in procs:
        proc.join()
    (events0, walls), (events1, _) = results[0], results[1]
    # rank 0's window-end sends bound the windows of the last call; skip the call's first window
    ends = [e[2] for e in events0 if e[0] == "send"][1:]
    windows = list(zip(ends, ends[1:]))
    print(f"built-in {args.model}, T={STEPS}, W={WARMUP}, 2 ranks; last of {args.calls} calls, {len(windows)} windows")
    print(f"{'phase (median per window, ms)':32s}{'rank 0':>10s}{'rank 1':>10s}")
    spans = [b - a for a, b in windows]
    rest = {0: spans, 1: spans}  # minus each top-level phase below
    for label, event, top in PHASES:
        cells = []
        for rank, events in enumerate((events0, events1)):
            per_window = [sum(e - s for name, s, e in events if name == event and a <= s < b) for a, b in windows]
            if top:
                rest[rank] = [r - t for r, t in zip(rest[rank], per_window)]
            cells.append(f"{1e3 * statistics.median(per_window):10.3f}")
        print(f"{label:32s}{''.join(cells)}")
    print(f"{'rest (pipeline loop, hooks)':32s}{''.join(f'{1e3 * statistics.median(r):10.3f}' for r in rest.values())}")
    print(
        f"{'window (rank 0 send to send)':32s}{1e3 * statistics.median(spans):10.3f}"
        f"   mean {1e3 * statistics.mean(spans):.3f}, max {1e3 * max(spans):.3f}, "
        f"{sum(w > 1.25 * statistics.median(spans) for w in spans)} over 1.25x the median"
    )
    base, para = (statistics.median(w) for w in zip(*walls))
    print(
        f"\nwhole call, median of {args.calls}: baseline {base:.4f} s, ParaStep-2 {para:.4f} s: "
        f"x{base / para:.2f} = {base / para / parastep.ideal_speedup(STEPS, WARMUP, 2):.2f} of ideal"
    )


if __name__ == "__main__":
    main()
