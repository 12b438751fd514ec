"""Drop-in on real diffusers pipelines built from tiny random-weight components (no hub)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import parastep
from tests.distributed import run_ranks
from tests.tiny_pipelines import CASES, IDS, build, count_forwards

T, W = 8, 2


def call(pipe, kwargs, seed=0, **extra):
    out = pipe(**{**kwargs, **extra}, num_inference_steps=T, generator=torch.Generator().manual_seed(seed))
    if extra.get("output_type") == "latent":
        return out.images if hasattr(out, "images") else out.frames if hasattr(out, "frames") else out.audios
    for name in ("images", "frames", "audios"):
        if hasattr(out, name):
            value = getattr(out, name)
            return torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
    raise AssertionError(f"unexpected output {type(out)}")


@pytest.mark.parametrize("family,variant", CASES, ids=IDS)
def test_drop_in(family, variant):
    torch.set_num_threads(1)
    pipe, kwargs = build(family, **variant)
    counter = count_forwards(pipe)
    base = call(pipe, kwargs)
    base_calls, counter[0] = counter[0], 0
    per_step = base_calls / T

    for config in (parastep.ParaStepConfig(warmup_steps=W), parastep.BatchStepConfig(stride=1, warmup_steps=W)):
        handle = parastep.apply(pipe, config)
        assert torch.equal(call(pipe, kwargs), base), f"{config} changed the output"
        assert handle.last_stats.model_calls == counter[0] == base_calls
        handle.remove()
        counter[0] = 0

    if family == "cogvideox" and variant.get("scheduler") == "CogVideoXDPMScheduler":
        with pytest.raises(parastep.UnsupportedSchedulerError, match="CogVideoXDPMScheduler"):
            parastep.apply(pipe, parastep.BatchStepConfig(stride=3, warmup_steps=W))
    else:
        handle = parastep.apply(pipe, parastep.BatchStepConfig(stride=3, warmup_steps=W))
        out = call(pipe, kwargs)
        assert out.shape == base.shape and torch.isfinite(out).all() and not torch.equal(out, base)
        assert handle.last_stats.model_calls == counter[0]
        if per_step.is_integer():  # same denoiser calls on every step (not SD3 skip-layer guidance)
            assert counter[0] == (W + math.ceil((T - W) / 3)) * per_step
        else:
            assert counter[0] < base_calls
        assert [r.action for r in handle.last_stats.records][W : W + 3] == ["computed", "precomputed", "precomputed"]
        handle.remove()
    assert torch.equal(call(pipe, kwargs), base), "remove() did not restore the pipeline"


def parastep_rank(rank: int) -> dict:
    results = {}
    for (family, variant), name in zip(CASES, IDS):
        pipe, kwargs = build(family, **variant)
        counter = count_forwards(pipe)
        handle = parastep.apply(pipe, parastep.ParaStepConfig(warmup_steps=W))
        finals = []
        step = pipe.scheduler.step
        pipe.scheduler.step = lambda *a, _s=step, _f=finals, **k: _f.append(_s(*a, **k)) or _f[-1]
        # only rank 0 decodes; peers stop at the latents
        out = call(pipe, kwargs, output_type="np" if rank == 0 else "latent")
        last = finals[-1]
        latents = last[0] if isinstance(last, tuple) else last.prev_sample
        results[name] = dict(
            calls=counter[0],
            stats_calls=handle.last_stats.model_calls,
            latents=latents,
            out=torch.as_tensor(np.asarray(out)) if rank == 0 else None,
        )
    return results


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(parastep_rank, 2, timeout=600)


@pytest.mark.parametrize("family,variant", CASES, ids=IDS)
def test_parastep_on_two_ranks(two_ranks, family, variant):
    name = IDS[CASES.index((family, variant))]
    r0, r1 = two_ranks[0][name], two_ranks[1][name]
    assert torch.equal(r0["latents"], r1["latents"]), "ranks left the last window with different latents"
    assert torch.isfinite(r0["out"]).all()
    assert r0["calls"] == r0["stats_calls"] and r1["calls"] == r1["stats_calls"]
    pipe, kwargs = build(family, **variant)
    counter = count_forwards(pipe)
    call(pipe, kwargs)
    per_step = counter[0] / T
    if per_step.is_integer():
        assert r0["calls"] == (W + math.ceil((T - W) / 2)) * per_step  # W + every window
        assert r1["calls"] == (W + (T - W) // 2) * per_step  # W + the windows that reach rank 1
    else:
        assert r0["calls"] + r1["calls"] < 2 * counter[0]
