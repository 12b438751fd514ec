"""AsyncDiff (Chen et al., NeurIPS'24): the denoiser cut into stages, each working on inputs one
step stale, so that the stages of one step run at once on different ranks.

The denoiser's blocks (data in :data:`parastep.registry.BLOCKS`) are cut into ``stages``
contiguous groups in the order one forward pass calls them, one group per rank. Warm-up steps run
the whole model on every rank. After them every rank runs the denoiser's forward each step, but
only its own blocks compute; every other block returns what its owner computed at the previous
step, received after that step. The last stage's output is the prediction every rank steps with.

With stride 2 (``stages + 1`` ranks), as in the reference code (czg1225/AsyncDiff): on every
other step the owners compute their blocks at the *next* step's timestep while a shadow rank
computes the last stage at the current one; the step after reuses the last stage's output
without computing anything. Each stage then computes once per two steps.

Everything is per instance: a hook on each block's ``forward`` (removed by ``Handle.remove()``)
and the engine's wrappers. Only what another rank reads crosses the link: which block outputs
each rank reads (skip connections included) is traced once per call, in the first warm-up step,
by following tensors from block outputs through the glue code between blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from ..errors import ConfigError, UnsupportedPipelineError
from ..registry import blocks_for
from .base import (
    Action,
    CallState,
    DenoiserCall,
    Strategy,
    StrategyConfig,
    Target,
    check_int,
    group_comm,
    main_output,
    with_main_output,
)

if TYPE_CHECKING:
    from ..comm import Comm

logger = logging.getLogger(__name__)

Use = tuple[int, int]  # (block, its n-th call within one forward pass)
Leaf = tuple[int, int, int]  # (block, call, n-th tensor of that call's output)


@dataclass(frozen=True)
class AsyncDiffConfig(StrategyConfig):
    """The denoiser's blocks cut into ``stages`` groups on ``stages + stride - 1`` ranks.

    Example (on 2 ranks, every rank calling the pipeline with the same arguments)::

        handle = parastep.apply(pipe, parastep.AsyncDiffConfig(stages=2, warmup_steps=5))
        out = pipe(prompt, num_inference_steps=50, generator=torch.Generator().manual_seed(0))
        handle.strategy.split      # the blocks of each stage, by name

    ``balance`` cuts the stages by the blocks' time measured in the warm-up steps after the first
    (``"time"``; by parameter count when ``warmup_steps`` is 1) or by parameter count
    (``"params"``). ``blocks`` names the denoiser's blocks (attribute paths, ``"name.*"`` for the
    children of a ModuleList) where :data:`parastep.registry.BLOCKS` has no entry for it.
    ``stages=1`` with stride 1, or ``warmup_steps`` at least the number of steps, is the baseline.
    """

    method: ClassVar[str] = "asyncdiff"
    stages: int = 2
    stride: int = 1
    warmup_steps: int = 5
    balance: Literal["time", "params"] = "time"
    blocks: tuple[str, ...] | None = None
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        check_int("stages", self.stages, 1)
        check_int("warmup_steps", self.warmup_steps, 0)
        if self.stride not in (1, 2):
            raise ConfigError(f"stride must be 1 or 2 (as in AsyncDiff), got {self.stride!r}")
        if self.balance not in ("time", "params"):
            raise ConfigError(f"balance must be 'time' or 'params', got {self.balance!r}")
        if self.blocks is not None and not (
            isinstance(self.blocks, tuple) and self.blocks and all(isinstance(b, str) for b in self.blocks)
        ):
            raise ConfigError(f"blocks must be a non-empty tuple of attribute paths, got {self.blocks!r}")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0 seconds, got {self.timeout_s!r}")

    @property
    def ranks(self) -> int:
        """The ranks it runs on: one per stage, and a shadow of the last stage with stride 2."""
        return self.stages + self.stride - 1

    def build(self, target: Target, group: Any) -> AsyncDiff:
        blocks = _resolve_blocks(target, self.blocks)
        if len(blocks) < self.stages:
            raise UnsupportedPipelineError(
                f"AsyncDiff cannot cut the denoiser of {target.name} into {self.stages} stages: it has "
                f"{len(blocks)} block(s) ({', '.join(n for n, _ in blocks)}). Lower stages, or name finer "
                f"blocks with AsyncDiffConfig(blocks=...)"
            )
        if self.ranks == 1:
            return AsyncDiff(self, None, target, blocks)
        if self.warmup_steps < 1:
            raise ConfigError(
                "AsyncDiff on more than one rank needs warmup_steps >= 1: the stages start from the "
                "block outputs of the last warm-up step"
            )
        return AsyncDiff(self, group_comm(group, self.ranks, self, target, self.timeout_s), target, blocks)


def _resolve_blocks(target: Target, paths: tuple[str, ...] | None) -> list[tuple[str, torch.nn.Module]]:
    denoiser = target.denoiser
    paths = paths or blocks_for(denoiser)
    if paths is None:
        raise UnsupportedPipelineError(
            f"AsyncDiff cannot split the denoiser of {target.name} ({type(denoiser).__name__}): its blocks "
            f"are unknown. Name them with AsyncDiffConfig(blocks=('blocks.*', ...)), or add its class to "
            f"parastep.registry.BLOCKS"
        )
    found: dict[int, tuple[str, torch.nn.Module]] = {}
    for path in paths:
        name = path.removesuffix(".*")
        module: Any = denoiser
        for part in name.split(".") if name else []:
            module = getattr(module, part, None)
        if not isinstance(module, torch.nn.Module):
            continue
        children = [(f"{name}.{n}", m) for n, m in module.named_children()] if path.endswith(".*") else [(name, module)]
        for child_name, child in children:
            if not isinstance(child, torch.nn.Identity):  # nothing to compute: glue
                found.setdefault(id(child), (child_name, child))
    blocks = list(found.values())
    inner = {id(m) for _, b in blocks for m in b.modules() if m is not b}
    nested = [n for n, b in blocks if id(b) in inner]
    if nested:
        raise ConfigError(f"AsyncDiff blocks must not contain one another; {', '.join(nested)} lie inside other blocks")
    return blocks


@dataclass
class _Pass:
    """One denoiser forward pass in progress: which blocks compute, what is traced or timed."""

    index: int  # the denoiser call within the step
    compute: frozenset[int] | None  # None: every block
    tracer: _Provenance | None = None
    times: dict[int, float] | None = None
    sync: Callable[[], None] | None = None
    calls: Counter = dataclasses.field(default_factory=Counter)


class AsyncDiff(Strategy):
    def __init__(
        self, config: AsyncDiffConfig, comm: Comm | None, target: Target, blocks: list[tuple[str, torch.nn.Module]]
    ):
        self.stages, self.stride, self.warmup, self.balance = (
            config.stages,
            config.stride,
            config.warmup_steps,
            config.balance,
        )
        self.parallelism = config.stages * config.stride
        self.comm, self.ranks = comm, config.ranks
        self.rank = comm.rank if comm else 0
        self.pipe_name, self.scheduler = target.name, target.scheduler
        self.names = [n for n, _ in blocks]
        self.modules = [m for _, m in blocks]
        self.params = [sum(p.numel() for p in m.parameters()) for m in self.modules]
        self.split: list[list[str]] | None = None  # the last call's stages, by block name
        self._pass: _Pass | None = None
        self._saved: list[tuple[torch.nn.Module, Any]] = []
        self.begin(None)
        if comm is not None:
            self._install()

    # hooks ------------------------------------------------------------------------------------
    def _install(self) -> None:
        for b, module in enumerate(self.modules):
            self._saved.append((module, module.__dict__.get("forward")))
            original = module.forward

            def forward(*args: Any, _b: int = b, _original: Callable = original, **kwargs: Any) -> Any:
                return self._block(_b, _original, args, kwargs)

            module.forward = functools.update_wrapper(forward, original)

    def detach(self) -> None:
        for module, saved in reversed(self._saved):
            if saved is None:
                del module.forward
            else:
                module.forward = saved
        self._saved = []

    def _block(self, b: int, original: Callable, args: tuple, kwargs: dict) -> Any:
        run = self._pass
        if run is None:
            return original(*args, **kwargs)
        n = run.calls[b]
        run.calls[b] += 1
        key = (run.index, b, n)
        if run.compute is not None and b not in run.compute:
            if key not in self.cache:
                raise UnsupportedPipelineError(
                    f"AsyncDiff on {self.pipe_name}: block {self.names[b]} ran (call {n} of denoiser call "
                    f"{run.index}) where it never ran in the warm-up, so no output of it exists to reuse. "
                    f"Raise warmup_steps, or use another method for this pipeline"
                )
            return self.cache[key]
        tracer = run.tracer
        if tracer is not None:
            self.deps[run.index][(b, n)] = tracer.origins((args, kwargs))
            tracer.inside += 1
        if run.sync is not None:
            run.sync()
        start = time.perf_counter()
        try:
            out = original(*args, **kwargs)
        finally:
            if tracer is not None:
                tracer.inside -= 1
        if run.times is not None:
            if run.sync is not None:
                run.sync()
            run.times[b] = run.times.get(b, 0.0) + time.perf_counter() - start
        if tracer is not None:
            tracer.mark(out, (b, n))
            if b not in self.order:
                self.order.append(b)
        self.cache[key] = out
        return out

    # stages -------------------------------------------------------------------------------------
    def begin(self, call: CallState | None) -> None:
        self.cache: dict[tuple[int, int, int], Any] = {}  # (denoiser call, block, its call) -> output
        self.outputs: dict[int, Any] = {}  # denoiser call -> its last output on this rank
        self.deps: dict[int, dict[Use, frozenset[Leaf]]] = {}  # block outputs each block call reads
        self.final: dict[int, frozenset[Leaf]] = {}  # block outputs the prediction reads
        self.order: list[int] = []  # blocks in the order of their first call
        self.times: dict[int, dict[int, float]] = {}  # warm-up step -> block -> seconds
        self.traced: set[int] = set()  # warm-up steps that traced (their times are off)
        self.owner: dict[int, int] | None = None  # block -> stage, once the warm-up is done
        self.mine: frozenset[int] = frozenset()
        self.routes: dict[int, tuple[dict[int, list[Leaf]], list[int]]] = {}
        self.split = None
        if call is not None and self.comm is not None:
            self.comm.begin_call()

    def denoise(self, call: CallState, index: int, d: DenoiserCall) -> tuple[Action, Any]:
        k = call.step
        if self.comm is None or self.warmup >= call.steps:
            return "computed", d.run()
        if k < self.warmup:
            return "computed", self._warm(call, index, d)
        if self.owner is None:
            self._cut(d.sample.device)
        if index not in self.deps:
            raise UnsupportedPipelineError(
                f"AsyncDiff on {self.pipe_name}: denoiser call {index} of step {k} has no counterpart in the "
                f"warm-up steps, so AsyncDiff cannot tell what its stages exchange. Raise warmup_steps to "
                f"cover a step with {index + 1} denoiser calls, or use another method for this pipeline"
            )
        last = self.stages - 1
        if self.stride == 1:
            return "computed", self._share(index, self._forward(d, index, self.mine), last)
        if (k - self.warmup) % 2 == 0:  # the owners compute the next step, the shadow this one
            changes = {}
            if self.rank < self.stages and k + 1 < call.steps:
                changes = self._next_timestep(call, d)
            return "computed", self._share(index, self._forward(d, index, self.mine, **changes), self.stages)
        comm = self.comm
        assert comm is not None
        if self.rank == last:  # the last stage's output of the step before is this step's prediction
            out = self._forward(d, index, frozenset())
            eps = main_output(out)
            comm.exchange({r: eps for r in range(self.ranks) if r != last}, [], eps.device)
            return "reused", out
        template = self.outputs[index]
        eps = comm.exchange({}, [last], main_output(template).device)[last]
        return "received", with_main_output(template, eps)

    # warm-up --------------------------------------------------------------------------------------
    def _warm(self, call: CallState, index: int, d: DenoiserCall) -> Any:
        """The whole model; the first pass of each denoiser call is traced, the others timed."""
        run = _Pass(index, None)
        if d.sample.device.type == "cuda":
            run.sync = functools.partial(torch.cuda.synchronize, d.sample.device)
        if index not in self.deps:
            self.deps[index], run.tracer = {}, _Provenance()
            self.traced.add(call.step)
        else:
            run.times = self.times.setdefault(call.step, {})
        self._pass = run
        try:
            if run.tracer is not None:
                with run.tracer:
                    out = d.run()
                self.final[index] = run.tracer.origins(main_output(out))
            else:
                out = d.run()
        finally:
            self._pass = None
        self.outputs[index] = out
        return out

    def _cut(self, device: torch.device) -> None:
        """Rank 0 cuts the blocks into stages and tells the others (timings differ by rank)."""
        assert self.comm is not None
        order = self.order
        if len(order) < self.stages:
            raise UnsupportedPipelineError(
                f"AsyncDiff cannot cut the denoiser of {self.pipe_name} into {self.stages} stages: a forward "
                f"pass calls only {len(order)} of its blocks. Lower stages, or name finer blocks with "
                f"AsyncDiffConfig(blocks=...)"
            )
        if self.rank == 0:
            costs, basis = self._costs()
            starts = balanced_cuts(costs, self.stages)
            self.comm.exchange({r: starts for r in range(1, self.ranks)}, [], device)
            logger.info("AsyncDiff on %s: stages cut by %s", self.pipe_name, basis)
        else:
            starts = self.comm.exchange({}, [0], device)[0]
        ends = [*starts[1:], len(order)]
        self.owner = {b: s for s, (lo, hi) in enumerate(zip(starts, ends)) for b in order[lo:hi]}
        self.split = [[self.names[b] for b in order[lo:hi]] for lo, hi in zip(starts, ends)]
        self.mine = self._computes(self.rank)

    def _costs(self) -> tuple[list[float], str]:
        timed = [t for step, t in self.times.items() if step not in self.traced]
        if self.balance == "time" and timed:
            costs = [min(t.get(b, 0.0) for t in timed) for b in self.order]
            basis = f"time measured in {len(timed)} warm-up step(s)"
        else:
            costs = [float(self.params[b]) for b in self.order]
            basis = "parameter count" + ("" if self.balance == "params" else " (warmup_steps=1: nothing timed)")
        return (costs if sum(costs) > 0 else [1.0] * len(costs)), basis

    def _computes(self, rank: int) -> frozenset[int]:
        """The blocks ``rank`` computes: its stage's (a shadow's is the last stage)."""
        assert self.owner is not None
        stage = min(rank, self.stages - 1)
        return frozenset(b for b, s in self.owner.items() if s == stage)

    # after each step ----------------------------------------------------------------------------
    def _forward(self, d: DenoiserCall, index: int, compute: frozenset[int], **changes: Any) -> Any:
        self._pass = _Pass(index, compute)
        try:
            out = d.run(**changes)
        finally:
            self._pass = None
        self.outputs[index] = out
        return out

    def _routes(self, index: int) -> tuple[dict[int, list[Leaf]], list[int]]:
        """What this rank sends to whom after a step of denoiser call ``index``, and who sends to it:
        each rank reads the block outputs its blocks (and, where it predicts, the prediction) read
        from other stages."""
        if index not in self.routes:
            owner = self.owner
            assert owner is not None
            reads = {r: self._reads(index, r) for r in range(self.ranks)}
            send = {r: sorted(x for x in leaves if owner[x[0]] == self.rank) for r, leaves in reads.items()}
            sources = sorted({owner[x[0]] for x in reads[self.rank]})
            self.routes[index] = ({r: keys for r, keys in send.items() if keys and r != self.rank}, sources)
        return self.routes[index]

    def _reads(self, index: int, rank: int) -> set[Leaf]:
        assert self.owner is not None
        computes = self._computes(rank)
        leaves = {x for (b, _), deps in self.deps[index].items() if b in computes for x in deps}
        if rank >= self.stages - 1:  # it makes predictions
            leaves |= self.final[index]
        return {x for x in leaves if x[0] not in computes}

    def _share(self, index: int, out: Any, predictor: int) -> Any:
        """Sends the block outputs computed in this pass to the ranks that read them, and the
        prediction from ``predictor`` to every rank; returns ``out`` with that prediction."""
        assert self.comm is not None
        send, sources = self._routes(index)
        eps = main_output(out)
        outgoing: dict[int, dict[str, Any]] = {r: {"blocks": self._pack(index, keys)} for r, keys in send.items()}
        if self.rank == predictor:
            for r in range(self.ranks):
                if r != self.rank:
                    outgoing.setdefault(r, {})["eps"] = eps
        else:
            sources = sorted({*sources, predictor})
        for message in self.comm.exchange(outgoing, sources, eps.device).values():
            if "blocks" in message:
                self._unpack(index, *message["blocks"])
            if "eps" in message:
                eps = message["eps"]
        return out if self.rank == predictor else with_main_output(out, eps)

    def _pack(self, index: int, keys: list[Leaf]) -> tuple[dict[Leaf, torch.Tensor], dict[Leaf, Leaf]]:
        """The tensors of ``keys``; one that is also an earlier key's (a down block returns its
        output both as the next input and as a skip) travels once, as an alias."""
        tensors: dict[Leaf, torch.Tensor] = {}
        aliases: dict[Leaf, Leaf] = {}
        first: dict[int, Leaf] = {}
        for key in keys:
            b, n, leaf = key
            out = self.cache.get((index, b, n))
            if out is None:
                continue
            t = _tensors(out)[leaf]
            if id(t) in first:
                aliases[key] = first[id(t)]
            else:
                first[id(t)], tensors[key] = key, t
        return tensors, aliases

    def _unpack(self, index: int, tensors: dict[Leaf, torch.Tensor], aliases: dict[Leaf, Leaf]) -> None:
        updates: dict[Use, dict[int, torch.Tensor]] = {}
        for (b, n, leaf), t in [*tensors.items(), *((k, tensors[a]) for k, a in aliases.items())]:
            updates.setdefault((b, n), {})[leaf] = t
        for (b, n), leaves in updates.items():
            self.cache[(index, b, n)] = _replace(self.cache[(index, b, n)], leaves)

    def _next_timestep(self, call: CallState, d: DenoiserCall) -> dict[str, Any]:
        """The denoiser's timestep argument for the next step, mapped as the pipeline maps this one."""
        if d.timestep_name is None:
            raise UnsupportedPipelineError(
                f"AsyncDiff with stride 2 on {self.pipe_name}: its denoiser takes no timestep argument "
                f"(timestep, timesteps or t) to set to the next step's; use stride 1"
            )
        timesteps = self.scheduler.timesteps
        now, then = timesteps[call.begin_index + call.step], timesteps[call.begin_index + call.step + 1]
        tau = d.timestep
        tau_t = torch.as_tensor(tau)
        dtype = tau_t.dtype if tau_t.is_floating_point() else torch.as_tensor(now).dtype
        for to_tau in (
            lambda t: torch.as_tensor(t).to(dtype),
            lambda t: torch.as_tensor(t).to(dtype) / 1000,
            lambda t: (torch.as_tensor(t) / 1000).to(dtype),
        ):
            if torch.equal(to_tau(now).to(tau_t.device).expand_as(tau_t).to(tau_t.dtype), tau_t):
                nxt = to_tau(then).to(tau_t.device).expand_as(tau_t).to(tau_t.dtype)
                return {d.timestep_name: nxt if isinstance(tau, torch.Tensor) else type(tau)(nxt.item())}
        raise UnsupportedPipelineError(
            f"AsyncDiff with stride 2 cannot map the scheduler timestep {float(now):g} to the denoiser's "
            f"timestep argument of {self.pipe_name}; use stride 1"
        )


def balanced_cuts(costs: list[float], stages: int) -> list[int]:
    """Where each of ``stages`` contiguous groups of ``costs`` starts, so that the largest group
    sum is as small as it can be.

    >>> balanced_cuts([1, 1, 1, 3], 2)
    [0, 3]
    """
    n, inf = len(costs), float("inf")
    prefix = [0.0, *itertools.accumulate(costs)]
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    start = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                worst = max(best[s - 1][j], prefix[i] - prefix[j])
                if worst < best[s][i]:
                    best[s][i], start[s][i] = worst, j
    starts, i = [], n
    for s in range(stages, 0, -1):
        i = start[s][i]
        starts.append(i)
    return starts[::-1]


# -- following block outputs through the glue between blocks --------------------------------------
class _Provenance(TorchFunctionMode):
    """While active, labels each tensor the glue code computes with the block outputs (block,
    call, tensor) it was computed from. Blocks mark their outputs; inside a block nothing is
    followed. In-place updates of a view do not reach its base (no diffusers glue does that)."""

    def __init__(self) -> None:
        super().__init__()
        self.labels: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.inside = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.inside:
            found = self.origins((args, kwargs))
            if found:
                targets = _tensors(out)
                if getattr(func, "__name__", "") == "__setitem__" and args:
                    targets.append(args[0])
                for t in targets:
                    self.labels[t] = self.labels.get(t, frozenset()) | found
        return out

    def origins(self, obj: Any) -> frozenset[Leaf]:
        found: frozenset[Leaf] = frozenset()
        for t in _tensors(obj):
            found |= self.labels.get(t, frozenset())
        return found

    def mark(self, out: Any, use: Use) -> None:
        per_tensor: dict[int, tuple[torch.Tensor, set[Leaf]]] = {}
        for i, t in enumerate(_tensors(out)):
            per_tensor.setdefault(id(t), (t, set()))[1].add((*use, i))
        for t, leaves in per_tensor.values():
            self.labels[t] = frozenset(leaves)


def _tensors(obj: Any) -> list[torch.Tensor]:
    """The tensors in a (nested) tuple, list or dict (a BaseOutput is one), in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    return []


def _replace(obj: Any, new: dict[int, torch.Tensor]) -> Any:
    """``obj`` with its i-th tensor (in :func:`_tensors` order) replaced by ``new[i]``."""
    position = itertools.count()

    def walk(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            return new.get(next(position), o)
        if isinstance(o, tuple) and hasattr(o, "_fields"):
            return type(o)(*map(walk, o))
        if isinstance(o, (list, tuple)):
            return type(o)(walk(v) for v in o)
        if isinstance(o, dict):
            items = {k: walk(v) for k, v in o.items()}
            return type(o)(**items) if dataclasses.is_dataclass(o) else type(o)(items)
        return o

    return walk(obj)
