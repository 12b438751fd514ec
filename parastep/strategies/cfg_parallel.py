"""CFG-parallel: the two halves of the classifier-free-guidance batch on two ranks.

A pipeline with guidance calls its denoiser on the batch [unconditional, conditional]. Rank 0
computes the first half, rank 1 the second; they exchange their halves after each denoiser call,
so both hold the whole prediction, guide and step exactly as the pipeline does, and stay
bitwise equal to each other. Against the baseline the result is exact up to the order of float
reductions: kernels reduce a batch of one in another order than a batch of two (fp32 on CPU:
differences of about 1e-6 in a prediction).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import ConfigError, UnsupportedPipelineError
from .base import (
    Action,
    CallState,
    DenoiserCall,
    Strategy,
    StrategyConfig,
    Target,
    group_comm,
    main_output,
    with_main_output,
)

if TYPE_CHECKING:
    from ..comm import Comm


@dataclass(frozen=True)
class CFGParallelConfig(StrategyConfig):
    """The unconditional and conditional halves of each denoiser call on two ranks.

    Example (on 2 ranks, every rank calling the pipeline with the same arguments)::

        handle = parastep.apply(pipe, parastep.CFGParallelConfig())
        out = pipe(prompt, guidance_scale=5.0, generator=torch.Generator().manual_seed(0))

    It needs a guidance batch: a call without one (guidance 1, a guidance-distilled model, a
    pipeline that guides with separate denoiser calls) raises
    :class:`~parastep.UnsupportedPipelineError`.
    """

    method: ClassVar[str] = "cfg_parallel"
    timeout_s: float = 60.0
    warmup_steps: int = field(default=0, init=False)  # none: every step is split

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0 seconds, got {self.timeout_s!r}")

    def build(self, target: Target, group: Any) -> CFGParallel:
        return CFGParallel(group_comm(group, 2, self, target, self.timeout_s), target)


class CFGParallel(Strategy):
    parallelism = 2
    comm: Comm

    def __init__(self, comm: Comm, target: Target):
        self.comm, self.rank, self.peer = comm, comm.rank, 1 - comm.rank
        self.pipe_name, self.per_sample = target.name, target.spec.per_sample
        self.batch: int | None = None  # the denoiser's batch in this call's first step

    def begin(self, call: CallState) -> None:
        self.comm.begin_call()
        self.batch = None

    def denoise(self, call: CallState, index: int, d: DenoiserCall) -> tuple[Action, Any]:
        full = d.sample.shape[0]
        if full % 2:
            raise UnsupportedPipelineError(
                f"CFG-parallel on {self.pipe_name}: denoiser call {index} of step {call.step} has a batch of "
                f"{full}, which has no unconditional and conditional halves: the call runs without "
                f"classifier-free guidance (guidance_scale <= 1, or a guidance-distilled model), or the "
                f"pipeline guides with separate denoiser calls (true_cfg_scale, skip-layer guidance). Use "
                f"guidance_scale > 1 on a pipeline that batches its guidance, or another method"
            )
        changes = {}
        for name, value in d.bound.arguments.items():
            half = _half(value, full, self.rank, name in self.per_sample)
            if half is not value:
                changes[name] = half
        out = d.run(**changes)
        mine = main_output(out)
        theirs = self.comm.exchange({self.peer: mine}, [self.peer], mine.device)[self.peer]
        if self.batch is None:
            self.batch = full
        return "computed", with_main_output(out, torch.cat([mine, theirs] if self.rank == 0 else [theirs, mine]))

    def after_step(self, call: CallState, result: Any) -> Any:
        latents = main_output(result).shape[0]
        if call.step == 0 and self.batch is not None and self.batch != 2 * latents:
            raise UnsupportedPipelineError(
                f"CFG-parallel on {self.pipe_name}: the denoiser's batch ({self.batch}) is not twice the "
                f"latents' ({latents}), so it holds no unconditional and conditional halves (no "
                f"classifier-free guidance in this call). Use guidance_scale > 1, or another method"
            )
        return result


def _half(value: Any, full: int, rank: int, per_sample: bool = False) -> Any:
    """``rank``'s half of every tensor whose leading dimension is the batch (or, for arguments laid
    out per sample, a multiple of it: [unconditional x F, conditional x F])."""
    if (
        isinstance(value, torch.Tensor)
        and value.dim()
        and (value.shape[0] == full or (per_sample and value.shape[0] % full == 0))
    ):
        return value.chunk(2)[rank]
    if isinstance(value, dict):
        return {k: _half(v, full, rank) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_half(v, full, rank) for v in value)
    return value
