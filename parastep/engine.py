"""Attach one strategy, or a chain of them, to one diffusers pipeline instance.

Two per-instance wrappers do all the work: one around the denoiser's ``forward`` (which asks
the strategies to decide each denoiser call) and one around ``scheduler.step`` (which marks step
boundaries and lets the strategies act around them). ``scheduler.set_timesteps`` starts a new
pipeline call, so state is reset automatically. Nothing at class level is touched;
``Handle.remove()`` restores all. The stages a strategy sees are in
:mod:`parastep.strategies.base`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .errors import ConfigError, ParaStepError, UnsupportedPipelineError, UnsupportedSchedulerError
from .registry import spec_for
from .stats import RunStats, StepRecord
from .strategies import CONFIG_TYPES
from .strategies.base import (
    STEP_ARGS,
    WRAPPED,
    Action,
    CallState,
    DenoiserCall,
    Strategy,
    StrategyConfig,
    Target,
    main_output,
    step_signature,
)

logger = logging.getLogger(__name__)

_TIMESTEP_NAMES = ("timestep", "timesteps", "t")


class Handle:
    """Returned by :func:`apply`. ``remove()`` restores the pipeline; ``last_stats`` describes the
    last pipeline call on this rank."""

    def __init__(self, pipe: Any, configs: Sequence[StrategyConfig], group: Any):
        if not configs:
            raise ConfigError("give apply() at least one strategy config")
        for config in configs:
            if not isinstance(config, StrategyConfig):
                names = ", ".join(c.__name__ for c in CONFIG_TYPES)
                raise ConfigError(f"config must be one of {names}; got {type(config).__name__}")
        spec = spec_for(pipe)
        scheduler = getattr(pipe, "scheduler", None)
        name = type(pipe).__name__
        if not all(callable(getattr(scheduler, m, None)) for m in WRAPPED):
            raise UnsupportedPipelineError(
                f"{name} has no recognisable scheduler: expected pipe.scheduler with step() and "
                f"set_timesteps(), got {type(scheduler).__name__}"
            )
        if not all(p in step_signature(scheduler).parameters for p in STEP_ARGS):
            raise UnsupportedSchedulerError(
                f"{type(scheduler).__name__}.step must take model_output, timestep and sample"
            )
        self.pipe, self.configs = pipe, tuple(configs)
        self.config = self.configs[0]
        self.denoiser = getattr(pipe, spec.denoiser)
        self.scheduler: Any = scheduler
        self._last_stats: RunStats | None = None
        self._call: CallState | None = None
        self._armed = False
        self._start_event: Any = None  # CUDA event at the call's start (when CUDA is in use)
        self._start_device = 0
        self._originals = {m: scheduler.__dict__.get(m) for m in WRAPPED}
        self._forward_original = self.denoiser.__dict__.get("forward")
        groups = list(group) if isinstance(group, (list, tuple)) else [group] * len(self.configs)
        if len(groups) != len(self.configs):
            raise ConfigError(
                f"give apply() one process group, or one per config ({len(self.configs)}); got {len(groups)}"
            )
        target = Target(pipe, spec, self.denoiser, scheduler)
        self.strategies: list[Strategy] = []
        try:
            for config, config_group in zip(self.configs, groups):
                self.strategies.append(config.build(target, config_group))
        except BaseException:
            for built in self.strategies:
                built.detach()
            raise
        self.strategy = self.strategies[0]
        self.comm = next((s.comm for s in self.strategies if s.comm is not None), None)
        self._install()
        pipe._parastep_handle = self

    # wrappers ------------------------------------------------------------------------------
    def _install(self) -> None:
        forward, step, set_timesteps = self.denoiser.forward, self.scheduler.step, self.scheduler.set_timesteps
        forward_sig = inspect.signature(forward)
        if next(iter(forward_sig.parameters.values())).kind is inspect.Parameter.VAR_POSITIONAL:
            # a user's instance wrapper taking (*args, **kwargs): read arguments as the class names them
            sig = inspect.signature(type(self.denoiser).forward)
            forward_sig = sig.replace(parameters=list(sig.parameters.values())[1:])
        forward_names = (
            next(iter(forward_sig.parameters)),
            next((n for n in _TIMESTEP_NAMES if n in forward_sig.parameters), None),
        )
        step_names = list(step_signature(self.scheduler).parameters)
        i_output, i_timestep = step_names.index("model_output"), step_names.index("timestep")
        strategies = self.strategies

        def decide(level: int, call: CallState, index: int, args: tuple, kwargs: dict) -> tuple[Action, Any]:
            """Strategy ``level`` decides; running the call means asking the next level, and
            below the last one the real forward pass runs (and is counted). A level that ran the
            call reports what the level below did."""
            below: list[Action] = ["computed"]
            inner: Callable[..., Any]
            if level + 1 < len(strategies):

                def inner(*a: Any, **k: Any) -> Any:
                    below[0], out = decide(level + 1, call, index, a, k)
                    return out

            else:

                def inner(*a: Any, **k: Any) -> Any:
                    call.model_calls += 1
                    return forward(*a, **k)

            d = DenoiserCall(inner, forward_sig, forward_names, args, kwargs)
            action, out = strategies[level].denoise(call, index, d)
            return (below[0] if action == "computed" else action), out

        @functools.wraps(set_timesteps)
        def set_timesteps_wrapper(*args: Any, **kwargs: Any) -> Any:
            out = set_timesteps(*args, **kwargs)
            self._armed, self._call = True, None
            return out

        @functools.wraps(forward)
        def forward_wrapper(*args: Any, **kwargs: Any) -> Any:
            call = self._call
            if call is None and self._armed:
                call = self._begin()
            if call is None:
                return forward(*args, **kwargs)
            index, call.call = call.call, call.call + 1
            action, out = decide(0, call, index, args, kwargs)
            if index == 0:
                call.action = action
            return out

        @functools.wraps(step)
        def step_wrapper(*args: Any, **kwargs: Any) -> Any:
            call = self._call
            if call is None:
                return step(*args, **kwargs)
            for strategy in strategies:
                strategy.before_step(call)
            result = step(*args, **kwargs)
            for strategy in strategies:
                result = strategy.after_step(call, result)
            call.guided = kwargs["model_output"] if "model_output" in kwargs else args[i_output]
            timestep = kwargs["timestep"] if "timestep" in kwargs else args[i_timestep]
            call.records.append((call.step, timestep, call.action, time.perf_counter(), self._event(result)))
            call.step_args, call.latents, call.action = (args, kwargs), main_output(result), "none"
            call.step, call.call = call.step + 1, 0
            if call.step >= call.steps:
                self._finish(call)
            return result

        self.denoiser.forward = forward_wrapper
        self.scheduler.step = step_wrapper
        self.scheduler.set_timesteps = set_timesteps_wrapper

    def _begin(self) -> CallState:
        self._armed = False
        begin = getattr(self.scheduler, "begin_index", None) or 0
        self._call = CallState(steps=len(self.scheduler.timesteps) - begin, begin_index=begin)
        self._start_event = None
        if torch.cuda.is_initialized():
            self._start_device = torch.cuda.current_device()
            self._start_event = _cuda_event(self._start_device)
        for strategy in self.strategies:
            strategy.begin(self._call)
        return self._call

    def _finish(self, call: CallState) -> None:
        self._call = None
        for strategy in self.strategies:
            strategy.end(call)
        ends, start, syncs = [r[3] for r in call.records], call.start, 0
        events = [r[4] for r in call.records]
        if self._start_event is not None and events and all(e is not None for e in events):
            events[-1].synchronize()  # the one host wait for the timings, after the loop
            syncs, start = 1, 0.0
            ends = [self._start_event.elapsed_time(e) / 1000 for e in events]
        records, last = [], start
        for (step, timestep, action, *_), end in zip(call.records, ends):  # converted once, after the loop
            records.append(StepRecord(step, float(timestep), action, end - last))
            last = end
        comms = [s.comm for s in self.strategies if s.comm is not None]
        rank = 0
        for c in comms:  # strategies on a mesh of groups (outer axis first): the rank in the mesh
            rank = rank * c.size + c.rank
        self._last_stats = RunStats(
            method="+".join(c.method for c in self.configs),
            rank=rank,
            world_size=math.prod(c.size for c in comms),
            degree=math.prod(s.parallelism for s in self.strategies),
            steps=call.steps,
            warmup_steps=max(c.warmup_steps for c in self.configs),
            model_calls=call.model_calls,
            bytes_sent=sum(c.bytes_sent for c in comms),
            bytes_received=sum(c.bytes_received for c in comms),
            host_syncs=syncs + sum(c.host_syncs for c in comms),
            wall_s=last - start,
            records=tuple(records),
        )

    def _event(self, result: Any) -> Any:
        """A CUDA event recorded now on the step result's device, when the call's start was
        recorded there: step times then follow the device's timeline, not the host's."""
        start = self._start_event
        if start is None:
            return None
        device = main_output(result).device
        if device.type != "cuda" or device.index not in (None, self._start_device):
            return None
        return _cuda_event(self._start_device)

    @property
    def last_stats(self) -> RunStats:
        """What the last finished pipeline call did on this rank."""
        if self._last_stats is None:
            raise ParaStepError("no pipeline call has finished since parastep.apply(); call the pipeline first")
        return self._last_stats

    def remove(self) -> None:
        """Restores the denoiser's forward and the scheduler's methods exactly."""
        if getattr(self.pipe, "_parastep_handle", None) is not self:
            return
        for strategy in reversed(self.strategies):
            strategy.detach()
        if self._forward_original is None:
            del self.denoiser.forward
        else:
            self.denoiser.forward = self._forward_original
        for name, original in self._originals.items():
            if original is None:
                self.scheduler.__dict__.pop(name, None)
            else:
                self.scheduler.__dict__[name] = original
        del self.pipe._parastep_handle


def _cuda_event(device_index: int) -> Any:
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device_index))
    return event


def apply(pipe: Any, config: StrategyConfig | Sequence[StrategyConfig], group: Any = None) -> Handle:
    """Attaches a step strategy (or a chain of them, outermost first) to ``pipe``; call the
    pipeline exactly as before.

    Example::

        handle = parastep.apply(pipe, parastep.BatchStepConfig(stride=2))
        image = pipe("a red circle", num_inference_steps=50).images[0]
        print(handle.last_stats.model_calls)   # 5 + ceil(45 / 2) = 28
        handle.remove()

    With ParaStep and degree > 1 this is a collective over ``group`` (default: the default
    process group); every rank must then call the pipeline with the same arguments, and may
    pass ``output_type="latent"`` when only rank 0 needs the decoded result.

    A chain of strategies that each need ranks of their own takes one group per config, the
    axes of a mesh the caller built. CFG-parallel x ParaStep-2 on 4 ranks (rank = 2 * half + p)::

        cfg = [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2]
        steps = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
        parastep.apply(pipe, [parastep.CFGParallelConfig(), parastep.ParaStepConfig()], group=[cfg, steps])
    """
    if getattr(pipe, "_parastep_handle", None) is not None:
        raise ConfigError(
            f"{type(pipe).__name__} already has a strategy attached; call handle.remove() before applying another"
        )
    configs = [config] if isinstance(config, StrategyConfig) or not isinstance(config, Sequence) else list(config)
    return Handle(pipe, configs, group)
