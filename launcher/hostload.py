"""What else this machine ran during a timed run.

A parallel run's ranks use every core and wait for the slowest one each window, so another
program's load slows it more than a one-rank baseline (Compare clicked in a browser on the same
2-core machine: 1.49x on the built-in image model, 1.73x through gradio_client with no browser).
The panel says so with a figure; the benchmark reports the hypervisor's steal the same way.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import psutil

BUSY = ("user", "nice", "system", "irq", "softirq")  # guest time is counted in user already


class OtherLoad:
    """Started before a run and read after it: how many cores, on average, programs other than
    ``ours`` and its descendants kept busy meanwhile. ``ours``: this process (rank 0, which spawns
    its peer ranks and encoders), or under torchrun its agent, whose children are the local ranks."""

    def __init__(self, ours: psutil.Process | None = None) -> None:
        self._me = ours or psutil.Process()
        self._start = self._read()

    def _read(self) -> tuple[float, float, float]:
        times = psutil.cpu_times()
        busy = sum(getattr(times, name, 0.0) for name in BUSY)
        ours = 0.0
        for proc in [self._me, *self._me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a child that just exited
                own = proc.cpu_times()  # children_*: its children that exited and were waited for
                ours += own.user + own.system + own.children_user + own.children_system
        return time.monotonic(), busy, ours

    def cores(self) -> float:
        t0, busy0, ours0 = self._start
        t1, busy1, ours1 = self._read()
        return max(0.0, (busy1 - busy0 - (ours1 - ours0)) / (t1 - t0)) if t1 > t0 else 0.0


def steal_share(before: Any, after: Any) -> float:
    """The share of this machine's CPU time between two ``psutil.cpu_times()`` readings that the
    hypervisor gave to other guests (0 where the system does not report it)."""

    def total(t: Any) -> float:  # guest time is counted in user time already
        return sum(v for k, v in t._asdict().items() if not k.startswith("guest"))

    elapsed = total(after) - total(before)
    return (getattr(after, "steal", 0.0) - getattr(before, "steal", 0.0)) / elapsed if elapsed > 0 else 0.0
