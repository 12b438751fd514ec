"""What one pipeline call did on this rank."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class StepRecord:
    """One denoising step on this rank.

    ``action`` is what the denoiser hook did for the step's first denoiser call:
    ``computed`` (a real forward pass), ``reused`` (the cached prediction, no forward),
    ``received`` (a peer's prediction) or ``precomputed`` (from an earlier batched call).
    ``seconds`` is the wall time from the previous step's end to this step's end.
    """

    step: int
    timestep: float
    action: str
    seconds: float


@dataclass
class RunStats:
    method: str
    rank: int = 0
    world_size: int = 1
    degree: int = 1
    steps: int = 0
    warmup_steps: int = 0
    model_calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    wall_s: float = 0.0
    records: list[StepRecord] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)
