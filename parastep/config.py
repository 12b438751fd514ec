"""Frozen, validated strategy configurations."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class ParaStepConfig:
    """Reuse-then-predict across ``degree`` ranks of a process group.

    Example::

        handle = parastep.apply(pipe, parastep.ParaStepConfig(warmup_steps=5), group=None)

    ``degree`` defaults to the size of the process group (1 when there is none).
    ``timeout_s`` bounds every wait on a peer; a peer that does not answer in time raises
    :class:`~parastep.CommError` naming it.
    """

    warmup_steps: int = 5
    degree: int | None = None
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        _check_int("warmup_steps", self.warmup_steps, 0)
        if self.degree is not None:
            _check_int("degree", self.degree, 1)
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0 seconds, got {self.timeout_s!r}")

    @property
    def method(self) -> str:
        return "parastep"


@dataclass(frozen=True)
class BatchStepConfig:
    """Evaluate the current step and ``stride - 1`` look-ahead steps in one batched call.

    Example::

        handle = parastep.apply(pipe, parastep.BatchStepConfig(stride=2, warmup_steps=5))
    """

    stride: int = 2
    warmup_steps: int = 5

    def __post_init__(self) -> None:
        _check_int("stride", self.stride, 1)
        _check_int("warmup_steps", self.warmup_steps, 0)

    @property
    def method(self) -> str:
        return "batchstep"


def ideal_speedup(steps: int, warmup_steps: int, parallelism: int) -> float:
    """T / (W + ceil((T - W) / P)): model calls of the baseline over those of one rank.

    >>> round(ideal_speedup(50, 5, 2), 3)
    1.786
    """
    warm = min(warmup_steps, steps)
    calls = warm + -(-(steps - warm) // parallelism)
    return steps / calls if calls else 1.0
