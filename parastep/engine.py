"""Attach ParaStep or BatchStep to one diffusers pipeline instance.

Two per-instance wrappers do all the work: one around the denoiser's ``forward`` (which
decides, per denoiser call, to compute, reuse, receive or take a precomputed prediction) and
one around ``scheduler.step`` (which marks step boundaries and, for ParaStep, ends windows
with rank 0 sending every rank the latents). ``scheduler.set_timesteps`` starts a new
pipeline call, so state is reset automatically. Nothing at class level is touched;
``Handle.remove()`` restores all.
"""
from __future__ import annotations

import copy
import functools
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from .comm import Comm
from .config import BatchStepConfig, ParaStepConfig
from .errors import CommError, ConfigError, UnsupportedPipelineError, UnsupportedSchedulerError
from .registry import spec_for
from .stats import RunStats, StepRecord

logger = logging.getLogger(__name__)

_STEP_ARGS = ("model_output", "timestep", "sample")
_TIMESTEP_NAMES = ("timestep", "timesteps", "t")


# -- denoiser outputs: a tensor, a tuple whose first item is the tensor, or a BaseOutput ----------
def _main(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return next(iter(out.values()))


def _with_main(template: Any, tensor: torch.Tensor) -> Any:
    if isinstance(template, torch.Tensor):
        return tensor
    if isinstance(template, (tuple, list)):
        return type(template)((tensor, *template[1:]))
    fields = dict(template)
    fields[next(iter(fields))] = tensor
    return type(template)(**fields)


@dataclass
class _Call:
    """One pipeline call in progress: where it is and what it did."""

    steps: int
    begin_index: int
    step: int = 0
    call: int = 0
    model_calls: int = 0
    action: str = "none"
    latents: torch.Tensor | None = None  # the real latents entering the current step
    guided: torch.Tensor | None = None  # the model_output given to the last scheduler.step
    step_args: tuple = ((), {})  # the last scheduler.step's (args, kwargs)
    start: float = field(default_factory=time.perf_counter)
    records: list[tuple] = field(default_factory=list)  # (step, timestep, action, end time)


class _Denoise:
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
        if not changes:
            return self.forward(*self.args, **self.kwargs)
        bound = inspect.BoundArguments(self.sig, dict(self.bound.arguments))
        bound.arguments.update(changes)
        return self.forward(*bound.args, **bound.kwargs)


class _ParaStep:
    """Reuse-then-predict: rank r reuses its cache to reach step k+r of the window, computes it
    and sends it to rank 0; rank 0 applies the P predictions in order and sends the latents
    (and the scheduler state later steps read) to every rank."""

    def __init__(self, config: ParaStepConfig, comm: Comm | None, degree: int, scheduler: Any):
        self.warmup, self.degree, self.comm = config.warmup_steps, degree, comm
        self.rank = comm.rank if comm else 0
        self.scheduler = scheduler
        self.cache: dict[int, Any] = {}  # denoiser call index within a step -> raw output
        self.outbox: dict[int, torch.Tensor] = {}  # this rank's predictions of its step, for rank 0
        self.inbox: dict[int, torch.Tensor] = {}  # a peer's predictions of the current step (rank 0)
        self.snapshot: dict[str, Any] = {}
        self.feeds_back = _step_feeds_back(scheduler)

    def begin(self, call: _Call) -> None:
        self.cache.clear()
        self.outbox, self.inbox = {}, {}
        self.snapshot = _state_snapshot(self.scheduler)
        if self.comm:
            self.comm.begin_call()

    def _position(self, step: int) -> int | None:
        """Index of ``step`` in its window, or None during warm-up / without peers."""
        if self.degree == 1 or step < self.warmup:
            return None
        return (step - self.warmup) % self.degree

    def denoise(self, call: _Call, index: int, d: _Denoise) -> tuple[str, Any]:
        j = self._position(call.step)
        if j is not None and self.rank == 0 and j > 0:
            if index == 0:  # the prediction lives where the latents do: scheduler.step combines them
                self.inbox = self.comm.recv(j, call.latents.device)
            if index not in self.inbox:
                raise CommError(f"rank {j} sent no prediction for denoiser call {index} of step {call.step}: "
                                f"every rank must call the pipeline with the same arguments")
            return "received", _with_main(self.cache.get(index, (None,)), self.inbox.pop(index))
        if j is not None and j != self.rank and index in self.cache:
            return "reused", self.cache[index]
        out = d.run()
        call.model_calls += 1
        self.cache[index] = out
        if j is not None and self.rank == j and j > 0:
            self.outbox[index] = _main(out)
        return "computed", out

    def before_step(self, call: _Call) -> None:
        """A peer sends its step's predictions as soon as the denoiser is done with them."""
        if self.outbox:
            device = next(iter(self.outbox.values())).device
            self.comm.send(self.outbox, 0, device)
            self.outbox = {}

    def step(self, call: _Call, result: Any) -> Any:
        s, j = call.step, self._position(call.step)
        if j is not None and (j == self.degree - 1 or s == call.steps - 1):
            result = self._end_window(call, result)
        if self.comm and s + 1 < call.steps and (s == self.warmup - 1 or j == self.degree - 1):
            self._open_window(s + 1, call.steps, _main(result).device)
        return result

    def _end_window(self, call: _Call, result: Any) -> Any:
        self.comm.flush()
        keys = _result_keys(result)
        shared = keys if self.feeds_back else keys[:1]
        device = _main(result).device
        if self.rank == 0:
            message = ([result[k] for k in shared], _changed_state(self.scheduler, self.snapshot))
            for peer in range(1, self.comm.size):
                self.comm.send(message, peer, device)
            if call.step == call.steps - 1:
                self.comm.flush()
            return result
        values, state = self.comm.recv(0, device)
        for name, value in state.items():
            setattr(self.scheduler, name, value)
        for k, v in zip(shared, values):
            result = _result_set(result, k, v)
        return result

    def _open_window(self, k: int, steps: int, device: torch.device) -> None:
        """Posts the receives of the window starting at step ``k`` before any of its messages
        can be sent (see Comm.expect)."""
        if self.rank == 0:
            for peer in range(1, min(self.degree, steps - k)):
                self.comm.expect(peer, device)
        else:
            self.comm.expect(0, device)


class _BatchStep:
    """One batched denoiser call for the current step and ``stride - 1`` look-ahead steps whose
    latents are rolled forward with the last guided prediction on a copy of the scheduler."""

    def __init__(self, config: BatchStepConfig, scheduler: Any, pipe_name: str, per_sample: tuple[str, ...]):
        self.warmup, self.stride = config.warmup_steps, config.stride
        self.scheduler, self.pipe_name, self.per_sample = scheduler, pipe_name, per_sample
        self.step_sig = _step_signature(scheduler)
        self.ahead: dict[tuple[int, int], Any] = {}  # (step, call index) -> raw output

    def begin(self, call: _Call) -> None:
        self.ahead.clear()

    def denoise(self, call: _Call, index: int, d: _Denoise) -> tuple[str, Any]:
        s = call.step
        if (s, index) in self.ahead:
            return "precomputed", self.ahead.pop((s, index))
        n = min(self.stride, call.steps - s)
        if s < self.warmup or (s - self.warmup) % self.stride or n == 1:
            call.model_calls += 1
            return "computed", d.run()
        outs = self._batched(call, d, n)
        call.model_calls += 1
        for j in range(1, n):
            self.ahead[(s + j, index)] = outs[j]
        return "computed", outs[0]

    def _scheduler_copy(self) -> Any:
        twin = copy.deepcopy(self.scheduler)
        for name in _WRAPPED:  # instance-level wrappers (ours or a user's) call the real scheduler
            twin.__dict__.pop(name, None)
        return twin

    def _batched(self, call: _Call, d: _Denoise, n: int) -> list[Any]:
        x, eps, s = call.latents, call.guided, call.step
        if x is None or eps is None:
            raise UnsupportedPipelineError(
                f"BatchStep on {self.pipe_name}: no latents were seen before step {s}; "
                f"use warmup_steps >= 1")
        twin = self._scheduler_copy()
        ts = [twin.timesteps[call.begin_index + s + j] for j in range(n)]
        encode = self._encoder(twin, d.sample, x, ts[0])
        to_tau = self._timestep_map(d.timestep, ts[0])
        kb = d.sample.shape[0]
        samples, taus = [d.sample], [_expand(to_tau(ts[0]), kb)]
        step_args, step_kwargs = call.step_args
        bound = self.step_sig.bind(*step_args, **step_kwargs).arguments
        roll_kwargs = {k: v for k, v in bound.items() if k not in _STEP_ARGS}
        roll_kwargs["return_dict"] = False
        if "generator" in roll_kwargs:  # look-ahead noise must not consume the caller's RNG
            roll_kwargs["generator"] = torch.Generator(x.device).manual_seed(0)
        for j in range(1, n):
            x = twin.step(eps, ts[j - 1], x, **roll_kwargs)[0]
            samples.append(encode(x, ts[j]))
            taus.append(_expand(to_tau(ts[j]), kb))
        changes = {name: _tile(value, kb, n, name in self.per_sample) for name, value in d.bound.arguments.items()
                   if name not in (d.sample_name, d.timestep_name)}
        changes[d.sample_name] = torch.cat(samples)
        changes[d.timestep_name] = torch.cat(taus)
        try:
            out = d.run(**changes)
        except RuntimeError as exc:
            raise UnsupportedPipelineError(
                f"BatchStep's batched denoiser call failed on {self.pipe_name} ({exc}). Arguments whose "
                f"leading dimension is the batch are repeated {n} times; if one is laid out per sample "
                f"with another leading size, name it in its parastep.registry.FAMILIES entry "
                f"(per_sample=...)") from exc
        return [_with_main(out, chunk) for chunk in _main(out).split(kb)]

    def _encoder(self, twin: Any, sample: torch.Tensor, x: torch.Tensor, t: Any) -> Callable:
        """How the pipeline built ``sample`` from the latents ``x``, checked bit for bit."""
        k, rem = divmod(sample.shape[0], x.shape[0])
        scalers = [lambda y, _t: y]
        if hasattr(twin, "scale_model_input"):
            scalers.append(lambda y, tt: twin.scale_model_input(y, tt))
        for scale in (scalers if not rem else []):
            guess = torch.cat([scale(x, t)] * k)
            if guess.shape == sample.shape and torch.equal(guess, sample):
                return lambda y, tt, scale=scale: torch.cat([scale(y, tt)] * k)
            for dim in range(1, sample.dim()):  # fixed conditioning concatenated (e.g. SVD)
                if (guess.dim() == sample.dim() and guess.shape[dim] < sample.shape[dim]
                        and all(guess.shape[i] == sample.shape[i] for i in range(sample.dim()) if i != dim)
                        and torch.equal(sample.narrow(dim, 0, guess.shape[dim]), guess)):
                    extra = sample.narrow(dim, guess.shape[dim], sample.shape[dim] - guess.shape[dim])
                    return lambda y, tt, scale=scale, dim=dim, extra=extra: torch.cat(
                        [torch.cat([scale(y, tt)] * k), extra], dim)
        raise UnsupportedPipelineError(
            f"BatchStep cannot rebuild the denoiser input of {self.pipe_name} at timestep {float(t):g}: "
            f"it is not the latents (optionally scaled by the scheduler), repeated for guidance and "
            f"concatenated with fixed conditioning. Use ParaStep or the baseline for this pipeline.")

    def _timestep_map(self, tau: Any, t: Any) -> Callable:
        """How the pipeline turned the scheduler's timestep ``t`` into the denoiser's argument."""
        tau_t = torch.as_tensor(tau)
        dtype = tau_t.dtype if tau_t.is_floating_point() else torch.as_tensor(t).dtype
        for to_tau in (lambda tt: torch.as_tensor(tt).to(dtype),
                       lambda tt: torch.as_tensor(tt).to(dtype) / 1000,
                       lambda tt: (torch.as_tensor(tt) / 1000).to(dtype)):
            guess = to_tau(t).to(tau_t.device)
            if torch.equal(guess.expand_as(tau_t).to(tau_t.dtype), tau_t):
                return lambda tt, to_tau=to_tau: to_tau(tt).to(tau_t.device)
        raise UnsupportedPipelineError(
            f"BatchStep cannot map the scheduler timestep {float(t):g} to the denoiser's timestep "
            f"argument of {self.pipe_name}; use ParaStep or the baseline for this pipeline.")

    def before_step(self, call: _Call) -> None:
        pass

    def step(self, call: _Call, result: Any) -> Any:
        return result


def _expand(tau: torch.Tensor, n: int) -> torch.Tensor:
    return tau.reshape(-1)[:1].expand(n) if tau.dim() else tau.reshape(1).expand(n)


def _tile(value: Any, batch: int, n: int, per_sample: bool = False) -> Any:
    """Repeats ``n`` times every tensor whose leading dimension is the batch (or, for arguments
    known to be laid out per sample, a multiple of it)."""
    if isinstance(value, torch.Tensor) and value.dim() and (
            value.shape[0] == batch or (per_sample and value.shape[0] % batch == 0)):
        return torch.cat([value] * n)
    if isinstance(value, dict):
        return {k: _tile(v, batch, n) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_tile(v, batch, n) for v in value)
    return value


# -- scheduler results and state -----------------------------------------------------------------
def _result_keys(result: Any) -> list:
    return list(range(len(result))) if isinstance(result, tuple) else list(result.keys())


def _result_set(result: Any, key: Any, value: Any) -> Any:
    """``result`` with ``key`` set: a new tuple, or the same BaseOutput (its ``__setitem__``
    sets the attribute too) -- step() returned it just now, nothing else holds it."""
    if isinstance(result, tuple):
        return result[:key] + (value,) + result[key + 1:]
    result[key] = value
    return result


def _step_feeds_back(scheduler: Any) -> bool:
    """True when ``step`` takes loop state beyond (model_output, timestep, sample), as
    CogVideoXDPMScheduler does with old_pred_original_sample: then every output is shared."""
    params = inspect.signature(type(scheduler).step).parameters.values()
    required = {p.name for p in params if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD}
    return bool(required - {"self", *_STEP_ARGS})


_WRAPPED = ("step", "set_timesteps")


def _step_signature(scheduler: Any) -> inspect.Signature:
    """The signature of the scheduler class's ``step`` without ``self`` (instance wrappers hide it)."""
    sig = inspect.signature(type(scheduler).step)
    return sig.replace(parameters=list(sig.parameters.values())[1:])


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
    return {k: v for k, v in vars(scheduler).items()
            if k not in _WRAPPED and (k not in snapshot or not _same(v, snapshot[k]))}


# -- the handle ----------------------------------------------------------------------------------
class Handle:
    """Returned by :func:`apply`. ``remove()`` restores the pipeline; ``last_stats`` describes the
    last pipeline call on this rank."""

    def __init__(self, pipe: Any, config: ParaStepConfig | BatchStepConfig, group: Any):
        spec = spec_for(pipe)
        self.pipe, self.config = pipe, config
        self.denoiser = getattr(pipe, spec.denoiser)
        self.scheduler = getattr(pipe, "scheduler", None)
        name = type(pipe).__name__
        if not all(callable(getattr(self.scheduler, m, None)) for m in _WRAPPED):
            raise UnsupportedPipelineError(
                f"{name} has no recognisable scheduler: expected pipe.scheduler with step() and "
                f"set_timesteps(), got {type(self.scheduler).__name__}")
        if not all(p in _step_signature(self.scheduler).parameters for p in _STEP_ARGS):
            raise UnsupportedSchedulerError(
                f"{type(self.scheduler).__name__}.step must take model_output, timestep and sample")
        self.last_stats: RunStats | None = None
        self._call: _Call | None = None
        self._armed = False
        self._originals = {m: self.scheduler.__dict__.get(m) for m in _WRAPPED}
        self._forward_original = self.denoiser.__dict__.get("forward")
        self.comm: Comm | None = None
        self.degree = 1
        if isinstance(config, ParaStepConfig):
            self.degree, self.comm = _resolve_group(config, group, pipe, self.denoiser)
            self.strategy: Any = _ParaStep(config, self.comm, self.degree, self.scheduler)
        elif isinstance(config, BatchStepConfig):
            if config.stride > 1 and _step_feeds_back(self.scheduler):
                raise UnsupportedSchedulerError(
                    f"BatchStep cannot roll {type(self.scheduler).__name__} forward: its step() takes "
                    f"loop state beyond (model_output, timestep, sample). Use another scheduler "
                    f"(e.g. CogVideoXDDIMScheduler) or ParaStep.")
            self.strategy = _BatchStep(config, self.scheduler, name, spec.per_sample)
        else:
            raise ConfigError(f"config must be ParaStepConfig or BatchStepConfig, got {type(config).__name__}")
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
        forward_names = (next(iter(forward_sig.parameters)),
                         next((n for n in _TIMESTEP_NAMES if n in forward_sig.parameters), None))
        step_names = list(_step_signature(self.scheduler).parameters)
        i_output, i_timestep = step_names.index("model_output"), step_names.index("timestep")

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
            action, out = self.strategy.denoise(call, index, _Denoise(forward, forward_sig, forward_names, args, kwargs))
            if index == 0:
                call.action = action
            return out

        @functools.wraps(step)
        def step_wrapper(*args: Any, **kwargs: Any) -> Any:
            call = self._call
            if call is None:
                return step(*args, **kwargs)
            self.strategy.before_step(call)
            result = self.strategy.step(call, step(*args, **kwargs))
            call.guided = kwargs["model_output"] if "model_output" in kwargs else args[i_output]
            timestep = kwargs["timestep"] if "timestep" in kwargs else args[i_timestep]
            call.records.append((call.step, timestep, call.action, time.perf_counter()))
            call.step_args, call.latents, call.action = (args, kwargs), _main(result), "none"
            call.step, call.call = call.step + 1, 0
            if call.step >= call.steps:
                self._finish(call)
            return result

        self.denoiser.forward = forward_wrapper
        self.scheduler.step = step_wrapper
        self.scheduler.set_timesteps = set_timesteps_wrapper

    def _begin(self) -> _Call:
        self._armed = False
        begin = getattr(self.scheduler, "begin_index", None) or 0
        self._call = _Call(steps=len(self.scheduler.timesteps) - begin, begin_index=begin)
        self.strategy.begin(self._call)
        return self._call

    def _finish(self, call: _Call) -> None:
        self._call = None
        cfg = self.config
        records, last = [], call.start
        for step, timestep, action, end in call.records:  # converted once, after the loop
            records.append(StepRecord(step, float(timestep), action, end - last))
            last = end
        self.last_stats = RunStats(
            method=cfg.method, rank=self.comm.rank if self.comm else 0,
            world_size=self.comm.size if self.comm else 1,
            degree=self.degree if isinstance(cfg, ParaStepConfig) else cfg.stride,
            steps=call.steps, warmup_steps=cfg.warmup_steps, model_calls=call.model_calls,
            bytes_sent=self.comm.bytes_sent if self.comm else 0,
            bytes_received=self.comm.bytes_received if self.comm else 0,
            wall_s=last - call.start, records=records)

    def remove(self) -> None:
        """Restores the denoiser's forward and the scheduler's methods exactly."""
        if getattr(self.pipe, "_parastep_handle", None) is not self:
            return
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


def _resolve_group(config: ParaStepConfig, group: Any, pipe: Any, denoiser: torch.nn.Module) -> tuple[int, Comm | None]:
    initialised = dist.is_available() and dist.is_initialized()
    if group is not None and not initialised:
        raise ConfigError("a process group was passed but torch.distributed is not initialised: "
                          "call torch.distributed.init_process_group first, or pass group=None")
    if group is None and initialised:
        group = dist.group.WORLD
    if group is not None and dist.get_rank(group) < 0:
        raise ConfigError("this process is not a member of the process group passed to apply(); "
                          "pass a group that contains every rank that calls the pipeline")
    size = dist.get_world_size(group) if group is not None else 1
    degree = config.degree or size
    if degree > size:
        raise ConfigError(
            f"ParaStep degree {degree} is larger than the process group ({size} rank(s)): "
            f"lower degree or start more ranks" if group is not None else
            f"ParaStep degree {degree} needs a torch.distributed process group of at least {degree} "
            f"ranks: initialise one and pass it as group=, or use degree=1")
    if degree == 1:
        return 1, None
    if config.warmup_steps < 1:
        raise ConfigError("ParaStep with degree > 1 needs warmup_steps >= 1: ranks reuse the "
                          "prediction cached during warm-up")
    signature = (config, type(pipe).__name__, type(denoiser).__name__,
                 sum(p.numel() for p in denoiser.parameters()))
    gathered: list[Any] = [None] * size
    dist.all_gather_object(gathered, signature, group=group)
    if any(g != gathered[0] for g in gathered):
        raise ConfigError(
            "ranks of the group attached different configurations or pipelines "
            f"(per rank: {gathered}); call parastep.apply with the same config and model on every rank")
    return degree, Comm(group, config.timeout_s)


def apply(pipe: Any, config: ParaStepConfig | BatchStepConfig, group: Any = None) -> Handle:
    """Attaches a step strategy to ``pipe``; call the pipeline exactly as before.

    Example::

        handle = parastep.apply(pipe, parastep.BatchStepConfig(stride=2))
        image = pipe("a red circle", num_inference_steps=50).images[0]
        print(handle.last_stats.model_calls)   # 5 + ceil(45 / 2) = 28
        handle.remove()

    With ParaStep and degree > 1 this is a collective over ``group`` (default: the default
    process group); every rank must then call the pipeline with the same arguments, and may
    pass ``output_type="latent"`` when only rank 0 needs the decoded result.
    """
    if getattr(pipe, "_parastep_handle", None) is not None:
        raise ConfigError(f"{type(pipe).__name__} already has a strategy attached; call "
                          "handle.remove() before applying another")
    return Handle(pipe, config, group)
