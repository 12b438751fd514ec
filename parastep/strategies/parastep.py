"""ParaStep: reuse-then-predict across the ranks of a process group.

After W warm-up steps, windows of P steps: rank r reuses its cached prediction to reach step
k+r of the window, computes that step and sends it to rank 0; rank 0 applies the P
predictions in order and sends every rank the latents (and the scheduler state later steps
read) once per window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from ..comm import Comm
from ..errors import CommError, ConfigError
from .base import (
    WRAPPED,
    Action,
    CallState,
    DenoiserCall,
    Strategy,
    StrategyConfig,
    Target,
    agree,
    check_int,
    main_output,
    step_feeds_back,
    with_main_output,
)


@dataclass(frozen=True)
class ParaStepConfig(StrategyConfig):
    """Reuse-then-predict across ``degree`` ranks of a process group.

    Example::

        handle = parastep.apply(pipe, parastep.ParaStepConfig(warmup_steps=5), group=None)

    ``degree`` defaults to the size of the process group (1 when there is none).
    ``timeout_s`` bounds every wait on a peer; a peer that does not answer in time raises
    :class:`~parastep.CommError` naming it.
    """

    method: ClassVar[str] = "parastep"
    warmup_steps: int = 5
    degree: int | None = None
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        check_int("warmup_steps", self.warmup_steps, 0)
        if self.degree is not None:
            check_int("degree", self.degree, 1)
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0 seconds, got {self.timeout_s!r}")

    def build(self, target: Target, group: Any) -> ParaStep:
        degree, comm = _resolve_group(self, group, target)
        return ParaStep(self, comm, degree, target.scheduler)


def ideal_speedup(steps: int, warmup_steps: int, parallelism: int) -> float:
    """T / (W + ceil((T - W) / P)): model calls of the baseline over those of one rank.

    >>> round(ideal_speedup(50, 5, 2), 3)
    1.786
    """
    warm = min(warmup_steps, steps)
    calls = warm + -(-(steps - warm) // parallelism)
    return steps / calls if calls else 1.0


class ParaStep(Strategy):
    def __init__(self, config: ParaStepConfig, comm: Comm | None, degree: int, scheduler: Any):
        self.warmup, self.parallelism, self.comm = config.warmup_steps, degree, comm
        self.rank = comm.rank if comm else 0
        self.scheduler = scheduler
        self.cache: dict[int, Any] = {}  # denoiser call index within a step -> raw output
        self.outbox: dict[int, torch.Tensor] = {}  # this rank's predictions of its step, for rank 0
        self.inbox: dict[int, torch.Tensor] = {}  # a peer's predictions of the current step (rank 0)
        self.snapshot: dict[str, Any] = {}
        self.feeds_back = step_feeds_back(scheduler)

    def begin(self, call: CallState) -> None:
        self.cache.clear()
        self.outbox, self.inbox = {}, {}
        self.snapshot = _state_snapshot(self.scheduler)
        if self.comm:
            self.comm.begin_call()

    def _position(self, step: int) -> int | None:
        """Index of ``step`` in its window, or None during warm-up / without peers."""
        if self.parallelism == 1 or step < self.warmup:
            return None
        return (step - self.warmup) % self.parallelism

    def denoise(self, call: CallState, index: int, d: DenoiserCall) -> tuple[Action, Any]:
        j = self._position(call.step)
        if j is not None and self.rank == 0 and j > 0:
            assert self.comm is not None and call.latents is not None
            if index == 0:  # the prediction lives where the latents do: scheduler.step combines them
                self.inbox = self.comm.recv(j, call.latents.device)
            if index not in self.inbox:
                raise CommError(
                    f"rank {j} sent no prediction for denoiser call {index} of step {call.step}: "
                    f"every rank must call the pipeline with the same arguments"
                )
            return "received", with_main_output(self.cache.get(index, (None,)), self.inbox.pop(index))
        if j is not None and j != self.rank and index in self.cache:
            return "reused", self.cache[index]
        out = d.run()
        self.cache[index] = out
        if j is not None and self.rank == j and j > 0:
            self.outbox[index] = main_output(out)
        return "computed", out

    def before_step(self, call: CallState) -> None:
        """A peer sends its step's predictions as soon as the denoiser is done with them."""
        if self.outbox:
            assert self.comm is not None
            device = next(iter(self.outbox.values())).device
            self.comm.send(self.outbox, 0, device)
            self.outbox = {}

    def after_step(self, call: CallState, result: Any) -> Any:
        s, j = call.step, self._position(call.step)
        if j is not None and (j == self.parallelism - 1 or s == call.steps - 1):
            result = self._end_window(call, result)
        if self.comm and s + 1 < call.steps and (s == self.warmup - 1 or j == self.parallelism - 1):
            self._open_window(s + 1, call.steps, main_output(result).device)
        return result

    def _end_window(self, call: CallState, result: Any) -> Any:
        comm = self.comm
        assert comm is not None
        comm.flush()
        keys = _result_keys(result)
        shared = keys if self.feeds_back else keys[:1]
        device = main_output(result).device
        if self.rank == 0:
            message = ([result[k] for k in shared], _changed_state(self.scheduler, self.snapshot))
            comm.send(message, list(range(1, comm.size)), device)  # one send() for every peer
            if call.step == call.steps - 1:
                comm.flush()
            return result
        values, state = comm.recv(0, device)
        for name, value in state.items():
            setattr(self.scheduler, name, value)
        for k, v in zip(shared, values):
            result = _result_set(result, k, v)
        return result

    def _open_window(self, k: int, steps: int, device: torch.device) -> None:
        """Posts the receives of the window starting at step ``k`` before any of its messages
        can be sent (see Comm.expect)."""
        assert self.comm is not None
        if self.rank == 0:
            for peer in range(1, min(self.parallelism, steps - k)):
                self.comm.expect(peer, device)
        else:
            self.comm.expect(0, device)


# -- scheduler results and state -----------------------------------------------------------------
def _result_keys(result: Any) -> list:
    return list(range(len(result))) if isinstance(result, tuple) else list(result.keys())


def _result_set(result: Any, key: Any, value: Any) -> Any:
    """``result`` with ``key`` set: a new tuple, or the same BaseOutput (its ``__setitem__``
    sets the attribute too) -- step() returned it just now, nothing else holds it."""
    if isinstance(result, tuple):
        return result[:key] + (value,) + result[key + 1 :]
    result[key] = value
    return result


def _state_snapshot(scheduler: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, list) else v for k, v in vars(scheduler).items()}


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(x is y for x, y in zip(a, b))
    if isinstance(a, (int, float, str, bool)) and type(a) is type(b):
        return a == b
    return False


def _changed_state(scheduler: Any, snapshot: dict[str, Any]) -> dict[str, Any]:
    """Scheduler attributes that changed since ``set_timesteps``: what later steps read."""
    return {
        k: v
        for k, v in vars(scheduler).items()
        if k not in WRAPPED and (k not in snapshot or not _same(v, snapshot[k]))
    }


def _resolve_group(config: ParaStepConfig, group: Any, target: Target) -> tuple[int, Comm | None]:
    initialised = dist.is_available() and dist.is_initialized()
    if group is not None and not initialised:
        raise ConfigError(
            "a process group was passed but torch.distributed is not initialised: "
            "call torch.distributed.init_process_group first, or pass group=None"
        )
    if group is None and initialised:
        group = dist.group.WORLD
    if group is not None and dist.get_rank(group) < 0:
        raise ConfigError(
            "this process is not a member of the process group passed to apply(); "
            "pass a group that contains every rank that calls the pipeline"
        )
    size = dist.get_world_size(group) if group is not None else 1
    degree = config.degree or size
    if degree > size:
        raise ConfigError(
            f"ParaStep degree {degree} is larger than the process group ({size} rank(s)): "
            f"lower degree or start more ranks"
            if group is not None
            else f"ParaStep degree {degree} needs a torch.distributed process group of at least {degree} "
            f"ranks: initialise one and pass it as group=, or use degree=1"
        )
    if degree == 1:
        return 1, None
    if config.warmup_steps < 1:
        raise ConfigError(
            "ParaStep with degree > 1 needs warmup_steps >= 1: ranks reuse the prediction cached during warm-up"
        )
    comm = Comm(group, config.timeout_s)
    agree(comm, config, target)
    return degree, comm
