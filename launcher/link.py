"""Two nodes on one machine: two Linux network namespaces joined by a veth pair whose each
direction is limited to a rate, so that ranks started in them talk over a slow link.

    with two_nodes("100mbit") as link:
        subprocess.run(link.exec(0, ["ip", "addr"]))     # node 0 at 10.77.0.1, node 1 at 10.77.0.2

The rate is a token bucket (``tc qdisc ... tbf``) on the egress of each veth end: every byte
waits its turn at RATE, beyond a burst of 1 ms worth of it (at least two full-size frames, since
a token bucket cannot send a frame larger than its burst). Nothing is added to the latency:
``netem`` (which could add it, and pace per packet) is not in every kernel. The namespaces and
the veth pair go away on leaving the block, however it is left; their names carry this process's
id and a counter, so that runs side by side do not clash. Needs root (CAP_NET_ADMIN).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)

ADDRESSES = ("10.77.0.1", "10.77.0.2")
INTERFACE = "veth0"  # its name in both namespaces
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_counter = itertools.count()


class LinkError(RuntimeError):
    """The namespaces or the link could not be made; the message says why and what to change."""


def rate_bits(rate: str) -> int:
    """``"100mbit"`` -> 100_000_000 bits per second (tc's decimal units)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)", rate.strip().lower())
    if not m:
        raise LinkError(f"link rate {rate!r}: write a number and one of {', '.join(_UNITS)}, e.g. 100mbit")
    bits = int(float(m.group(1)) * _UNITS[m.group(2)])
    if bits < 8000:
        raise LinkError(f"link rate {rate!r} is below 8kbit: too slow to carry anything")
    return bits


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode:
        raise LinkError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip() or proc.returncode}")


def unavailable() -> str | None:
    """Why network namespaces cannot be made here (None: they can)."""
    name = f"parastep-probe-{os.getpid()}-{next(_counter)}"
    try:
        _ip("netns", "add", name)
    except FileNotFoundError:
        return "the `ip` command (iproute2) is not installed"
    except LinkError as exc:
        return f"cannot create network namespaces (needs root or CAP_NET_ADMIN): {exc}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


@dataclass(frozen=True)
class Link:
    namespaces: tuple[str, str]
    rate: str | None  # None: unlimited

    def exec(self, node: int, argv: list[str]) -> list[str]:
        """``argv`` run inside node ``node``'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[node], *argv]

    def sent_bytes(self, node: int) -> int:
        """Bytes node ``node`` has sent over the link so far (its veth end's counter)."""
        path = f"/sys/class/net/{INTERFACE}/statistics/tx_bytes"  # sysfs as seen inside the namespace
        return int(subprocess.run(self.exec(node, ["cat", path]), capture_output=True, text=True, check=True).stdout)


@contextmanager
def two_nodes(rate: str | None) -> Iterator[Link]:
    """Two namespaces joined by a veth pair, each direction limited to ``rate`` (None: unlimited)."""
    bits = rate_bits(rate) if rate else 0
    tag = f"parastep-{os.getpid()}-{next(_counter)}"
    names = (f"{tag}-0", f"{tag}-1")
    made: list[str] = []
    try:
        for ns in names:
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", INTERFACE, "netns", names[0], "type", "veth", "peer", "name", INTERFACE, "netns", names[1])
        for ns, addr in zip(names, ADDRESSES):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", INTERFACE)
            _ip("-n", ns, "link", "set", INTERFACE, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if bits:
                burst = max(bits // 8 // 1000, 2 * 1514)  # 1 ms of the rate, at least two frames
                tc = ["tc", "-n", ns, "qdisc", "add", "dev", INTERFACE, "root", "tbf", "rate", rate or ""]
                tc += ["burst", str(burst), "latency", "1s"]  # a deep queue: TCP is slowed, not dropped
                proc = subprocess.run(tc, capture_output=True, text=True)
                if proc.returncode:
                    raise LinkError(f"`{' '.join(tc)}` failed: {proc.stderr.strip()}")
        log.info("link %s: %s (%s) <-> %s (%s)", rate or "unlimited", names[0], ADDRESSES[0], names[1], ADDRESSES[1])
        yield Link(names, rate)
    finally:
        for ns in made:  # the veth pair goes with its namespaces
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
