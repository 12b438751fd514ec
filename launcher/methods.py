"""What each method of the app is: its ranks, what it trades, and the configs every rank applies.

Rank 0 and the peers build a run's strategies from the same (request, method, ranks) with
:func:`configs`, so a :class:`~launcher.protocol.PeerRun` only carries the method's name.

Example::

    chain = configs(req, "asyncdiff", ranks=2, timeout_s=30)   # [AsyncDiffConfig(stages=2, ...)]
    handle = parastep.apply(pipe, chain)
"""

from __future__ import annotations

from dataclasses import dataclass

import parastep
from launcher.request import METHOD_LABELS, GenerateRequest

SPARSETEM_ERROR_TARGET = 0.02  # relative L2 error per layer, what the library's tests hold it to


@dataclass(frozen=True)
class MethodInfo:
    name: str
    ranks: str  # "one" (rank 0 alone), "all" (every healthy rank) or "two" (rank 0 and the next)
    trade: str  # one line: exact or approximate, and what crosses the link

    @property
    def label(self) -> str:
        return METHOD_LABELS[self.name]

    @property
    def distributed(self) -> bool:
        return self.ranks != "one"


METHOD_INFO: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo("baseline", "one", "Exact reference: every step computed on one rank; nothing crosses a link."),
        MethodInfo(
            "parastep",
            "all",
            "Approximate: each rank reuses the last prediction to reach its own step of a window; per window, "
            "P−1 predictions to rank 0 and one latent broadcast cross the link.",
        ),
        MethodInfo(
            "batchstep",
            "one",
            "Approximate: look-ahead steps reuse the last prediction and run batched on one device; "
            "nothing crosses a link.",
        ),
        MethodInfo(
            "asyncdiff",
            "all",
            "Approximate: the denoiser's blocks split into one stage per rank, each working on the previous "
            "step's activations; every step, every stage's output crosses the link.",
        ),
        MethodInfo(
            "cfg",
            "two",
            "Exact up to float rounding: the unconditional and conditional halves of the guidance batch on two "
            "ranks; every step, one half of the prediction crosses the link.",
        ),
    )
}


def run_ranks(method: str, healthy: int) -> int:
    """How many of ``healthy`` ranks (rank 0 included) a run of ``method`` uses."""
    kind = METHOD_INFO[method].ranks
    return 1 if kind == "one" else 2 if kind == "two" else healthy


def configs(req: GenerateRequest, method: str, ranks: int, timeout_s: float) -> list[parastep.StrategyConfig]:
    """The strategies one rank applies for ``method`` on ``ranks`` ranks (outer first; empty: the
    plain pipeline). SparseTem, when asked for, works inside each rank's call, so it comes first."""
    chain: list[parastep.StrategyConfig] = []
    if req.sparsetem:
        chain.append(parastep.SparseTemConfig(error_target=SPARSETEM_ERROR_TARGET))
    warmup = req.warmup_steps
    if method == "parastep":
        chain.append(parastep.ParaStepConfig(warmup_steps=warmup, timeout_s=timeout_s))
    elif method == "batchstep":
        chain.append(parastep.BatchStepConfig(stride=req.stride, warmup_steps=warmup))
    elif method == "asyncdiff":
        chain.append(parastep.AsyncDiffConfig(stages=ranks, stride=1, warmup_steps=warmup, timeout_s=timeout_s))
    elif method == "cfg":
        chain.append(parastep.CFGParallelConfig(timeout_s=timeout_s))
    elif method != "baseline":
        raise ValueError(f"unknown method {method!r}")
    return chain


def ideal_speedup(req: GenerateRequest, method: str, ranks: int) -> float:
    """Baseline model-call cost over one rank's, if communication and batching were free."""
    steps, warmup = req.steps or 0, min(req.warmup_steps, req.steps or 0)
    if method == "parastep":
        return parastep.ideal_speedup(steps, warmup, ranks)
    if method == "batchstep":
        return parastep.ideal_speedup(steps, warmup, req.stride)
    if method == "asyncdiff":  # after warm-up each rank computes 1/ranks of the denoiser per step
        cost = warmup + (steps - warmup) / ranks
        return steps / cost if cost else 1.0
    if method == "cfg":  # each rank computes half of the guidance batch
        return 2.0
    return 1.0
