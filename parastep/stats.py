"""What one pipeline call did on this rank, as a typed object that travels as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class StepRecord:
    """One denoising step on this rank.

    ``action`` is what the denoiser hook did for the step's first denoiser call:
    ``computed`` (a real forward pass), ``reused`` (the cached prediction, no forward),
    ``received`` (a peer's prediction) or ``precomputed`` (from an earlier batched call).
    ``seconds`` is the wall time from the previous step's end to this step's end: on CUDA
    measured by CUDA events on the current stream (the device's timeline, converted once after
    the loop), else host time.
    """

    step: int
    timestep: float
    action: str
    seconds: float


@dataclass(frozen=True)
class RunStats:
    """One pipeline call on one rank.

    Example::

        stats = handle.last_stats
        stats.model_calls, stats.bytes_sent
        RunStats.from_json(stats.to_json()) == stats   # True
    """

    method: str
    rank: int = 0
    world_size: int = 1
    degree: int = 1  # ranks (ParaStep) or steps per batched call (BatchStep)
    steps: int = 0
    warmup_steps: int = 0
    model_calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    host_syncs: int = 0  # times the host waited for the device (CUDA): per received message, +1 for timings
    wall_s: float = 0.0
    records: tuple[StepRecord, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "records", tuple(self.records))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunStats:
        """The inverse of :meth:`to_dict`; unknown keys are an error (a peer of another version)."""
        fields = dict(data)
        records = tuple(StepRecord(**r) for r in fields.pop("records", ()))
        return cls(**fields, records=records)

    @classmethod
    def from_json(cls, text: str | bytes) -> RunStats:
        return cls.from_dict(json.loads(text))
