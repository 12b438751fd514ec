"""The protocol every strategy follows, and what strategies share.

The engine (:mod:`parastep.engine`) wraps the denoiser's ``forward`` and ``scheduler.step`` of
one pipeline instance and calls the attached :class:`Strategy` at four named stages of a
pipeline call:

1. :meth:`Strategy.begin` — the call begins (its first denoiser call after ``set_timesteps``);
2. :meth:`Strategy.denoise` — each denoiser call is decided: compute it, reuse a cached output,
   receive one, or take one computed earlier;
3. :meth:`Strategy.before_step` / :meth:`Strategy.after_step` — around ``scheduler.step``;
4. :meth:`Strategy.end` — the call's last step is done.

A new strategy is one module with a frozen config dataclass (a :class:`StrategyConfig`, whose
:meth:`~StrategyConfig.build` makes the strategy) and a :class:`Strategy` subclass.

Strategies compose: ``parastep.apply(pipe, [outer, inner])`` chains them, outermost first. The
outer strategy's :meth:`DenoiserCall.run` is the inner strategy's decision, and the innermost
one's is the real forward pass; the engine counts real forward passes, so no strategy counts
model calls itself. The step stages run outermost first.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist

from ..comm import Comm
from ..errors import ConfigError
from ..registry import PipelineSpec

Action = Literal["computed", "reused", "received", "precomputed", "none"]

STEP_ARGS = ("model_output", "timestep", "sample")
WRAPPED = ("step", "set_timesteps")  # the scheduler methods the engine wraps per instance


@dataclass(frozen=True)
class Target:
    """The pipeline a strategy is attached to, and the parts of it the engine found."""

    pipe: Any
    spec: PipelineSpec
    denoiser: torch.nn.Module
    scheduler: Any

    @property
    def name(self) -> str:
        return type(self.pipe).__name__


@dataclass
class CallState:
    """One pipeline call in progress: where it is and what it did."""

    steps: int
    begin_index: int
    step: int = 0
    call: int = 0  # index of the next denoiser call within the current step
    model_calls: int = 0
    action: Action = "none"
    latents: torch.Tensor | None = None  # the real latents entering the current step
    guided: torch.Tensor | None = None  # the model_output given to the last scheduler.step
    step_args: tuple[tuple, dict] = ((), {})  # the last scheduler.step's (args, kwargs)
    start: float = field(default_factory=time.perf_counter)
    records: list[tuple] = field(default_factory=list)  # (step, timestep, action, end time)


class DenoiserCall:
    """The arguments of one denoiser call; bound to its signature only when they must be rebuilt."""

    def __init__(self, forward: Callable, sig: inspect.Signature, names: tuple, args: tuple, kwargs: dict):
        self.forward, self.sig, self.args, self.kwargs = forward, sig, args, kwargs
        self.sample_name, self.timestep_name = names

    @functools.cached_property
    def bound(self) -> inspect.BoundArguments:
        return self.sig.bind(*self.args, **self.kwargs)

    @property
    def sample(self) -> torch.Tensor:
        return self.bound.arguments[self.sample_name]

    @property
    def timestep(self) -> Any:
        return self.bound.arguments.get(self.timestep_name)

    def run(self, **changes: Any) -> Any:
        """The forward pass (the next strategy's decision, or the real one), with ``changes`` to
        its arguments."""
        if not changes:
            return self.forward(*self.args, **self.kwargs)
        bound = inspect.BoundArguments(self.sig, dict(self.bound.arguments))
        bound.arguments.update(changes)
        return self.forward(*bound.args, **bound.kwargs)


class Strategy(ABC):
    """What one attached strategy does at each stage of a pipeline call (see the module doc)."""

    comm: Comm | None = None  # the strategy's messages, if it has peers
    parallelism: int = 1  # ranks (ParaStep's degree) or steps per call (BatchStep's stride)

    def begin(self, call: CallState) -> None:
        """A pipeline call begins; reset whatever the last call left."""

    @abstractmethod
    def denoise(self, call: CallState, index: int, d: DenoiserCall) -> tuple[Action, Any]:
        """Decide denoiser call ``index`` of step ``call.step``: what it did and its output."""

    def before_step(self, call: CallState) -> None:
        """Just before ``scheduler.step`` of ``call.step`` runs."""

    def after_step(self, call: CallState, result: Any) -> Any:
        """Just after it ran; returns the result the pipeline sees."""
        return result

    def end(self, call: CallState) -> None:
        """The call's last step is done."""

    def detach(self) -> None:
        """``Handle.remove()``: undo whatever the strategy installed itself (hooks on blocks, say)."""


class StrategyConfig(ABC):
    """Base of the frozen config dataclasses; ``parastep.apply(pipe, config)`` builds the strategy."""

    method: ClassVar[str]
    warmup_steps: int

    @abstractmethod
    def build(self, target: Target, group: Any) -> Strategy:
        """The strategy for ``target``; raises a :class:`~parastep.ParaStepError` if it cannot run."""


def group_comm(group: Any, ranks: int, config: StrategyConfig, target: Target, timeout_s: float) -> Comm:
    """A :class:`~parastep.comm.Comm` over ``group`` (default: the default process group), which
    must hold exactly ``ranks`` ranks, once every rank has shown that it attached the same config
    to the same model (each rank sends its own to every other, so all of them raise or none)."""
    name = type(config).__name__
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            f"{name} needs a torch.distributed process group of {ranks} ranks: call "
            f"torch.distributed.init_process_group on every rank first (parastep never starts one)"
        )
    group = dist.group.WORLD if group is None else group
    if dist.get_rank(group) < 0:
        raise ConfigError(
            "this process is not a member of the process group passed to apply(); "
            "pass a group that contains every rank that calls the pipeline"
        )
    size = dist.get_world_size(group)
    if size != ranks:
        raise ConfigError(
            f"{name} runs on exactly {ranks} ranks, but the process group has {size}: start {ranks} ranks, "
            f"or pass a group of {ranks} (torch.distributed.new_group) as group="
        )
    comm = Comm(group, timeout_s)
    agree(comm, config, target)
    return comm


def agree(comm: Comm, config: StrategyConfig, target: Target) -> None:
    """Every rank of ``comm`` shows every other the config and model it attached (as plain
    values: nothing is pickled), so that all of them raise, or none, when one differs."""
    signature = {
        "config": type(config).__name__,
        "fields": {f.name: getattr(config, f.name) for f in dataclasses.fields(config)},  # type: ignore[arg-type]
        "pipeline": target.name,
        "denoiser": type(target.denoiser).__name__,
        "parameters": sum(p.numel() for p in target.denoiser.parameters()),
    }
    device = next(target.denoiser.parameters(), torch.empty(0)).device
    others = [r for r in range(comm.size) if r != comm.rank]
    got = comm.exchange({r: signature for r in others}, others, device)
    if any(s != signature for s in got.values()):
        per_rank = {comm.rank: signature, **got}
        raise ConfigError(
            "ranks of the group attached different configurations or pipelines "
            f"(per rank: {[per_rank[r] for r in range(comm.size)]}); call parastep.apply with the same config "
            f"and model on every rank"
        )


def check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


# -- denoiser outputs: a tensor, a tuple whose first item is the tensor, or a BaseOutput ----------
def main_output(out: Any) -> torch.Tensor:
    """The prediction inside a denoiser's output."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return next(iter(out.values()))


def with_main_output(template: Any, tensor: torch.Tensor) -> Any:
    """``template`` (a denoiser output) with its prediction replaced by ``tensor``."""
    if isinstance(template, torch.Tensor):
        return tensor
    if isinstance(template, (tuple, list)):
        return type(template)((tensor, *template[1:]))
    fields = dict(template)
    fields[next(iter(fields))] = tensor
    return type(template)(**fields)


# -- schedulers --------------------------------------------------------------------------------
def step_signature(scheduler: Any) -> inspect.Signature:
    """The signature of the scheduler class's ``step`` without ``self`` (instance wrappers hide it)."""
    sig = inspect.signature(type(scheduler).step)
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def step_feeds_back(scheduler: Any) -> bool:
    """True when ``step`` takes loop state beyond (model_output, timestep, sample), as
    CogVideoXDPMScheduler does with old_pred_original_sample: then every output is shared."""
    params = inspect.signature(type(scheduler).step).parameters.values()
    required = {p.name for p in params if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD}
    return bool(required - {"self", *STEP_ARGS})
