"""BatchStep: the current step and ``stride - 1`` look-ahead steps in one batched denoiser call.

After W warm-up steps, the latents are rolled S−1 steps ahead with the last guided prediction
on a deep copy of the scheduler; the denoiser runs once on [x_i, x̂_{i+1}, …] at their own
timesteps, and the S predictions are applied in order to the real latents.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import UnsupportedPipelineError, UnsupportedSchedulerError
from .base import (
    STEP_ARGS,
    WRAPPED,
    Action,
    CallState,
    DenoiserCall,
    Strategy,
    StrategyConfig,
    Target,
    check_int,
    main_output,
    step_feeds_back,
    step_signature,
    with_main_output,
)


@dataclass(frozen=True)
class BatchStepConfig(StrategyConfig):
    """Evaluate the current step and ``stride - 1`` look-ahead steps in one batched call.

    Example::

        handle = parastep.apply(pipe, parastep.BatchStepConfig(stride=2, warmup_steps=5))
    """

    method: ClassVar[str] = "batchstep"
    stride: int = 2
    warmup_steps: int = 5

    def __post_init__(self) -> None:
        check_int("stride", self.stride, 1)
        check_int("warmup_steps", self.warmup_steps, 0)

    def build(self, target: Target, group: Any) -> BatchStep:
        if self.stride > 1 and step_feeds_back(target.scheduler):
            raise UnsupportedSchedulerError(
                f"BatchStep cannot roll {type(target.scheduler).__name__} forward: its step() takes "
                f"loop state beyond (model_output, timestep, sample). Use another scheduler "
                f"(e.g. CogVideoXDDIMScheduler) or ParaStep."
            )
        return BatchStep(self, target.scheduler, target.name, target.spec.per_sample)


class BatchStep(Strategy):
    def __init__(self, config: BatchStepConfig, scheduler: Any, pipe_name: str, per_sample: tuple[str, ...]):
        self.warmup, self.parallelism = config.warmup_steps, config.stride
        self.scheduler, self.pipe_name, self.per_sample = scheduler, pipe_name, per_sample
        self.step_sig = step_signature(scheduler)
        self.ahead: dict[tuple[int, int], Any] = {}  # (step, call index) -> raw output

    def begin(self, call: CallState) -> None:
        self.ahead.clear()

    def denoise(self, call: CallState, index: int, d: DenoiserCall) -> tuple[Action, Any]:
        s = call.step
        if (s, index) in self.ahead:
            return "precomputed", self.ahead.pop((s, index))
        n = min(self.parallelism, call.steps - s)
        if s < self.warmup or (s - self.warmup) % self.parallelism or n == 1:
            return "computed", d.run()
        outs = self._batched(call, d, n)
        for j in range(1, n):
            self.ahead[(s + j, index)] = outs[j]
        return "computed", outs[0]

    def _scheduler_copy(self) -> Any:
        twin = copy.deepcopy(self.scheduler)
        for name in WRAPPED:  # instance-level wrappers (ours or a user's) call the real scheduler
            twin.__dict__.pop(name, None)
        return twin

    def _batched(self, call: CallState, d: DenoiserCall, n: int) -> list[Any]:
        x, eps, s = call.latents, call.guided, call.step
        if x is None or eps is None:
            raise UnsupportedPipelineError(
                f"BatchStep on {self.pipe_name}: no latents were seen before step {s}; use warmup_steps >= 1"
            )
        twin = self._scheduler_copy()
        ts = [twin.timesteps[call.begin_index + s + j] for j in range(n)]
        encode = self._encoder(twin, d.sample, x, ts[0])
        to_tau = self._timestep_map(d.timestep, ts[0])
        kb = d.sample.shape[0]
        samples, taus = [d.sample], [_expand(to_tau(ts[0]), kb)]
        step_args, step_kwargs = call.step_args
        bound = self.step_sig.bind(*step_args, **step_kwargs).arguments
        roll_kwargs = {k: v for k, v in bound.items() if k not in STEP_ARGS}
        roll_kwargs["return_dict"] = False
        if "generator" in roll_kwargs:  # look-ahead noise must not consume the caller's RNG
            roll_kwargs["generator"] = torch.Generator(x.device).manual_seed(0)
        for j in range(1, n):
            x = twin.step(eps, ts[j - 1], x, **roll_kwargs)[0]
            samples.append(encode(x, ts[j]))
            taus.append(_expand(to_tau(ts[j]), kb))
        changes = {
            name: _tile(value, kb, n, name in self.per_sample)
            for name, value in d.bound.arguments.items()
            if name not in (d.sample_name, d.timestep_name)
        }
        changes[d.sample_name] = torch.cat(samples)
        changes[d.timestep_name] = torch.cat(taus)
        try:
            out = d.run(**changes)
        except RuntimeError as exc:
            raise UnsupportedPipelineError(
                f"BatchStep's batched denoiser call failed on {self.pipe_name} ({exc}). Arguments whose "
                f"leading dimension is the batch are repeated {n} times; if one is laid out per sample "
                f"with another leading size, name it in its parastep.registry.FAMILIES entry "
                f"(per_sample=...)"
            ) from exc
        return [with_main_output(out, chunk) for chunk in main_output(out).split(kb)]

    def _encoder(self, twin: Any, sample: torch.Tensor, x: torch.Tensor, t: Any) -> Callable:
        """How the pipeline built ``sample`` from the latents ``x``, checked bit for bit."""
        k, rem = divmod(sample.shape[0], x.shape[0])
        scalers: list[Callable] = [lambda y, _t: y]
        if hasattr(twin, "scale_model_input"):
            scalers.append(lambda y, tt: twin.scale_model_input(y, tt))
        for scale in scalers if not rem else []:
            guess = torch.cat([scale(x, t)] * k)
            if guess.shape == sample.shape and torch.equal(guess, sample):
                return lambda y, tt, scale=scale: torch.cat([scale(y, tt)] * k)
            for dim in range(1, sample.dim()):  # fixed conditioning concatenated (e.g. SVD)
                if (
                    guess.dim() == sample.dim()
                    and guess.shape[dim] < sample.shape[dim]
                    and all(guess.shape[i] == sample.shape[i] for i in range(sample.dim()) if i != dim)
                    and torch.equal(sample.narrow(dim, 0, guess.shape[dim]), guess)
                ):
                    extra = sample.narrow(dim, guess.shape[dim], sample.shape[dim] - guess.shape[dim])
                    return lambda y, tt, scale=scale, dim=dim, extra=extra: torch.cat(
                        [torch.cat([scale(y, tt)] * k), extra], dim
                    )
        raise UnsupportedPipelineError(
            f"BatchStep cannot rebuild the denoiser input of {self.pipe_name} at timestep {float(t):g}: "
            f"it is not the latents (optionally scaled by the scheduler), repeated for guidance and "
            f"concatenated with fixed conditioning. Use ParaStep or the baseline for this pipeline."
        )

    def _timestep_map(self, tau: Any, t: Any) -> Callable:
        """How the pipeline turned the scheduler's timestep ``t`` into the denoiser's argument."""
        tau_t = torch.as_tensor(tau)
        dtype = tau_t.dtype if tau_t.is_floating_point() else torch.as_tensor(t).dtype
        candidates: list[Callable] = [
            lambda tt: torch.as_tensor(tt).to(dtype),
            lambda tt: torch.as_tensor(tt).to(dtype) / 1000,
            lambda tt: (torch.as_tensor(tt) / 1000).to(dtype),
        ]
        for to_tau in candidates:
            guess = to_tau(t).to(tau_t.device)
            if torch.equal(guess.expand_as(tau_t).to(tau_t.dtype), tau_t):
                return lambda tt, to_tau=to_tau: to_tau(tt).to(tau_t.device)
        raise UnsupportedPipelineError(
            f"BatchStep cannot map the scheduler timestep {float(t):g} to the denoiser's timestep "
            f"argument of {self.pipe_name}; use ParaStep or the baseline for this pipeline."
        )


def _expand(tau: torch.Tensor, n: int) -> torch.Tensor:
    return tau.reshape(-1)[:1].expand(n) if tau.dim() else tau.reshape(1).expand(n)


def _tile(value: Any, batch: int, n: int, per_sample: bool = False) -> Any:
    """Repeats ``n`` times every tensor whose leading dimension is the batch (or, for arguments
    known to be laid out per sample, a multiple of it)."""
    if (
        isinstance(value, torch.Tensor)
        and value.dim()
        and (value.shape[0] == batch or (per_sample and value.shape[0] % batch == 0))
    ):
        return torch.cat([value] * n)
    if isinstance(value, dict):
        return {k: _tile(v, batch, n) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_tile(v, batch, n) for v in value)
    return value
