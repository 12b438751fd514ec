"""Typed messages: rank 0's coordinator to the UI (events), and rank 0 to the peer ranks (JSON).

The coordinator streams :class:`Progress` events followed by one :class:`RunOutput` (or a
:class:`CompareOutput` for compare mode). Peers only ever see :class:`Regroup`,
:class:`PeerRun` and :class:`Shutdown`, and answer with a :class:`PeerReport`; these travel
as JSON (:func:`encode` / :func:`decode`), never as pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from launcher.request import METHOD_LABELS, METHODS, GenerateRequest, Modality
from parastep import RunStats, SparseTemStats


class RunError(RuntimeError):
    """The request was valid but failed (e.g. a peer died); the message names the rank."""


# ---- coordinator -> UI -------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    """A denoising step finished on rank 0 (``preview`` is an HxWx3 float image or None)."""

    label: str
    step: int
    total: int
    preview: np.ndarray | None = None


@dataclass
class RunOutput:
    """One finished pipeline call: the decoded media and the stats of every rank."""

    method: str
    modality: Modality
    media: np.ndarray
    sample_rate: int | None
    wall_s: float
    stats: list[RunStats] = field(default_factory=list)  # one per rank, rank 0 first
    ideal_speedup: float = 1.0
    note: str = ""
    fps: int = 8
    denoise_s: float | None = None  # until the last denoising step ended (no decoding)
    sparsetem: SparseTemStats | None = None  # rank 0's, when SparseTem ran
    other_cores: float | None = None  # cores other programs on rank 0's machine kept busy meanwhile

    @property
    def model_calls(self) -> list[int]:
        return [s.model_calls for s in self.stats]

    @property
    def bytes_communicated(self) -> int:
        return sum(s.bytes_sent for s in self.stats)

    @property
    def label(self) -> str:
        """E.g. "ParaStep (2 ranks)", "SparseTem + ParaStep (2 ranks)", "Baseline"."""
        name = METHOD_LABELS[self.method]
        if self.sparsetem is not None:
            name = "SparseTem" if self.method == "baseline" else f"SparseTem + {name}"
        return f"{name} ({len(self.stats)} ranks)" if len(self.stats) > 1 else name


@dataclass
class CompareOutput:
    baseline: RunOutput
    method: RunOutput
    speedup: float
    speedup_denoise: float | None
    psnr: float
    ssim: float


@dataclass
class RaceOutput:
    """Several methods on the same request, one after another: each against the baseline, which
    runs first (``baseline_picked``: the user asked for it; else it ran as the reference)."""

    baseline: RunOutput
    results: list[CompareOutput]
    baseline_picked: bool = True

    @property
    def runs(self) -> list[RunOutput]:
        return ([self.baseline] if self.baseline_picked else []) + [r.method for r in self.results]


# ---- rank 0 -> peers, and back (through the control store, as JSON) ---------------------------
@dataclass(frozen=True)
class Regroup:
    """Members build a fresh ParaStep process group (generation ``gen``)."""

    gen: int
    members: tuple[int, ...]
    timeout_s: float


@dataclass(frozen=True)
class PeerRun:
    """Members of group ``gen`` run ``request`` with ``method`` (see :mod:`launcher.methods`)
    and report their stats."""

    run_id: int
    gen: int
    members: tuple[int, ...]
    request: GenerateRequest
    timeout_s: float
    method: str = "parastep"


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class PeerReport:
    """What a peer writes back after a :class:`PeerRun`."""

    rank: int
    run_id: int
    ok: bool
    error: str = ""
    stats: RunStats | None = None


Message = Regroup | PeerRun | Shutdown | PeerReport


def encode(msg: Message) -> str:
    """``msg`` as JSON text, tagged with its type."""
    body: dict[str, Any] = {"type": type(msg).__name__}
    if isinstance(msg, Regroup):
        body.update(gen=msg.gen, members=list(msg.members), timeout_s=msg.timeout_s)
    elif isinstance(msg, PeerRun):
        body.update(
            run_id=msg.run_id,
            gen=msg.gen,
            members=list(msg.members),
            request=msg.request.to_dict(),
            timeout_s=msg.timeout_s,
            method=msg.method,
        )
    elif isinstance(msg, PeerReport):
        body.update(
            rank=msg.rank,
            run_id=msg.run_id,
            ok=msg.ok,
            error=msg.error,
            stats=msg.stats.to_dict() if msg.stats is not None else None,
        )
    elif not isinstance(msg, Shutdown):
        raise TypeError(f"not a control message: {type(msg).__name__}")
    return json.dumps(body, allow_nan=False)


def _method(name: Any) -> str:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}")
    return str(name)


def decode(data: str | bytes) -> Message:
    """The message :func:`encode` wrote; ``ValueError`` for anything else."""
    body = json.loads(data)
    kind = body.pop("type", None) if isinstance(body, dict) else None
    try:
        if kind == "Regroup":
            return Regroup(int(body["gen"]), tuple(int(r) for r in body["members"]), float(body["timeout_s"]))
        if kind == "PeerRun":
            return PeerRun(
                int(body["run_id"]),
                int(body["gen"]),
                tuple(int(r) for r in body["members"]),
                GenerateRequest.from_dict(body["request"]),
                float(body["timeout_s"]),
                _method(body["method"]),
            )
        if kind == "PeerReport":
            stats = RunStats.from_dict(body["stats"]) if body.get("stats") is not None else None
            return PeerReport(int(body["rank"]), int(body["run_id"]), bool(body["ok"]), str(body["error"]), stats)
        if kind == "Shutdown":
            return Shutdown()
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed {kind} message: {exc}") from exc
    raise ValueError(f"unknown control message type {kind!r}")
