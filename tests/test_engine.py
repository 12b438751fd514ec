"""Single-process behaviour of the engine on a toy denoiser with known outputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

import parastep
from tests.toy import DEVICE, DTYPE, ToyDenoiser, ToyPipeline, toy_embeds, toy_pipeline

T = 10


def run(pipe, steps=T, seed=0, **kw):
    pe, ne = toy_embeds()
    return pipe(pe, ne, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.fixture
def pipe():
    return toy_pipeline()


@pytest.mark.parametrize(
    "config",
    [
        parastep.ParaStepConfig(degree=1),
        parastep.ParaStepConfig(warmup_steps=0),
        parastep.ParaStepConfig(warmup_steps=T),
        parastep.BatchStepConfig(stride=1, warmup_steps=2),
        parastep.BatchStepConfig(stride=4, warmup_steps=T),
    ],
)
def test_no_parallelism_is_bit_identical(pipe, config):
    base = run(pipe)
    handle = parastep.apply(pipe, config)
    assert torch.equal(run(pipe), base)
    assert handle.last_stats.model_calls == T and handle.last_stats.steps == T
    handle.remove()
    assert torch.equal(run(pipe), base)


def test_remove_restores_the_instance_exactly(pipe):
    unet_dict, sched_dict = dict(vars(pipe.unet)), dict(vars(pipe.scheduler))
    handle = parastep.apply(pipe, parastep.BatchStepConfig(stride=2, warmup_steps=1))
    assert "forward" in vars(pipe.unet) and "step" in vars(pipe.scheduler)
    run(pipe)
    handle.remove()
    assert set(vars(pipe.unet)) == set(unet_dict) and vars(pipe.unet)["forward_calls"] > 0
    assert "step" not in vars(pipe.scheduler) and "set_timesteps" not in vars(pipe.scheduler)
    assert set(vars(pipe.scheduler)) <= set(sched_dict) | {"num_inference_steps", "timesteps"}
    assert ToyDenoiser.forward is type(pipe.unet).forward and not hasattr(pipe, "_parastep_handle")
    parastep.apply(pipe, parastep.BatchStepConfig()).remove()  # can attach again


def test_state_resets_between_calls_and_stats_describe_the_last(pipe):
    handle = parastep.apply(pipe, parastep.BatchStepConfig(stride=3, warmup_steps=2))
    first = run(pipe)
    assert torch.equal(run(pipe), first)  # nothing carried over from the first call
    run(pipe, steps=7)
    stats = handle.last_stats
    assert stats.steps == 7 and stats.model_calls == 2 + math.ceil(5 / 3)
    assert [r.step for r in stats.records] == list(range(7))
    assert all(r.seconds >= 0 for r in stats.records) and stats.wall_s > 0
    assert [r.action for r in stats.records] == ["computed"] * 3 + ["precomputed"] * 2 + ["computed", "precomputed"]


@pytest.mark.parametrize("stride,warmup,steps", [(2, 1, 10), (3, 2, 10), (4, 5, 50), (2, 5, 50), (5, 3, 11)])
def test_batchstep_model_calls(pipe, stride, warmup, steps):
    base = run(pipe, steps=steps)
    calls = pipe.unet.forward_calls
    handle = parastep.apply(pipe, parastep.BatchStepConfig(stride=stride, warmup_steps=warmup))
    out = run(pipe, steps=steps)
    expected = warmup + math.ceil((steps - warmup) / stride)
    assert handle.last_stats.model_calls == expected == pipe.unet.forward_calls - calls
    assert not torch.equal(out, base) and torch.isfinite(out).all()
    assert (out - base).abs().max() < 0.5  # an approximation of the baseline, not noise


@torch.no_grad()
def batchstep_replay(pipe, steps, warmup, stride, guidance=3.0):
    """BatchStep written out by hand on the toy pipeline, independent of the engine."""
    pe, ne = toy_embeds()
    emb = torch.cat([ne, pe])
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    ts = sched.timesteps
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)).to(DEVICE, DTYPE) * sched.init_noise_sigma

    def guide(raw):
        u, c = raw.chunk(2)
        return u + guidance * (c - u)

    eps, i = None, 0
    while i < steps:
        n = 1 if i < warmup else min(stride, steps - i)
        twin, xs = copy.deepcopy(sched), [x]
        inputs = [sched.scale_model_input(torch.cat([x, x]), ts[i])]
        for j in range(1, n):
            xs.append(twin.step(eps, ts[i + j - 1], xs[-1]).prev_sample)
            inputs.append(twin.scale_model_input(torch.cat([xs[-1]] * 2), ts[i + j]))
        tau = torch.cat([ts[i + j].reshape(1).expand(2) for j in range(n)]).float() if n > 1 else ts[i]
        raw = pipe.unet(torch.cat(inputs), tau, encoder_hidden_states=torch.cat([emb] * n)).sample
        for j, r in enumerate(raw.split(2)):
            eps = guide(r)
            x = sched.step(eps, ts[i + j], x).prev_sample
        i += n
    return x


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_batchstep_matches_the_algorithm_and_leaves_the_real_scheduler_alone(scheduler_cls):
    pipe = toy_pipeline(scheduler_cls)
    expected = batchstep_replay(toy_pipeline(scheduler_cls), steps=11, warmup=2, stride=3)
    real_steps = []
    inner = pipe.scheduler.step
    pipe.scheduler.step = lambda *a, **k: real_steps.append(1) or inner(*a, **k)
    forward = pipe.unet.forward
    pipe.unet.forward = lambda *a, **k: forward(*a, **k)  # a user's wrapper that hides the signature
    handle = parastep.apply(pipe, parastep.BatchStepConfig(stride=3, warmup_steps=2))
    out = run(pipe, steps=11, output_type="latent")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert len(real_steps) == 11  # look-ahead rolls ran on a copy only
    assert handle.last_stats.model_calls == 2 + 3


class ShiftedInputPipeline(ToyPipeline):
    """Feeds the denoiser something other than its latents: BatchStep must refuse it."""

    @torch.no_grad()
    def __call__(self, prompt_embeds, negative_prompt_embeds=None, num_inference_steps=10, generator=None, **_):  # type: ignore[override]
        latents = torch.randn((1, 4, 8, 8), generator=generator)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            noise = self.unet(latents + 1.0, t, encoder_hidden_states=prompt_embeds).sample
            latents = self.scheduler.step(noise, t, latents).prev_sample
        return latents


def test_batchstep_refuses_an_input_it_cannot_rebuild():
    pipe = ShiftedInputPipeline(ToyDenoiser(), DDIMScheduler())
    parastep.apply(pipe, parastep.BatchStepConfig(stride=2, warmup_steps=1))
    with pytest.raises(parastep.UnsupportedPipelineError, match="ShiftedInputPipeline"):
        run(pipe)


@pytest.mark.parametrize(
    "make,error,words",
    [
        (lambda: parastep.ParaStepConfig(warmup_steps=-1), parastep.ConfigError, "warmup_steps must be"),
        (lambda: parastep.ParaStepConfig(degree=0), parastep.ConfigError, "degree must be"),
        (lambda: parastep.ParaStepConfig(timeout_s=0), parastep.ConfigError, "timeout_s"),
        (lambda: parastep.BatchStepConfig(stride=0), parastep.ConfigError, "stride must be"),
        (lambda: parastep.BatchStepConfig(warmup_steps=1.5), parastep.ConfigError, "warmup_steps must be"),
        (
            lambda: parastep.apply(toy_pipeline(), parastep.ParaStepConfig(degree=2)),
            parastep.ConfigError,
            "needs a torch.distributed process group",
        ),
        (
            lambda: parastep.apply(object(), parastep.BatchStepConfig()),
            parastep.UnsupportedPipelineError,
            "no recognisable denoiser",
        ),
        (
            lambda: parastep.apply(ToyPipeline(ToyDenoiser(), None), parastep.BatchStepConfig()),
            parastep.UnsupportedPipelineError,
            "no recognisable scheduler",
        ),
        (
            lambda: parastep.apply(toy_pipeline(), "fast"),
            parastep.ConfigError,
            "config must be one of ParaStepConfig, BatchStepConfig",
        ),
    ],
)
def test_bad_configuration_says_what_to_change(make, error, words):
    with pytest.raises(error, match=words):
        make()


def test_applying_twice_is_refused(pipe):
    parastep.apply(pipe, parastep.BatchStepConfig())
    with pytest.raises(parastep.ConfigError, match="handle.remove"):
        parastep.apply(pipe, parastep.BatchStepConfig())


def test_ideal_speedup():
    assert parastep.ideal_speedup(50, 5, 2) == pytest.approx(50 / 28)
    assert parastep.ideal_speedup(50, 5, 4) == pytest.approx(50 / 17)
    assert parastep.ideal_speedup(10, 10, 4) == 1.0


def test_a_chain_of_strategies_is_the_inner_one_when_the_outer_passes_through(pipe):
    handle = parastep.apply(pipe, parastep.BatchStepConfig(stride=3, warmup_steps=2))
    alone, alone_calls = run(pipe), handle.last_stats.model_calls
    handle.remove()
    before = pipe.unet.forward_calls
    chain = [parastep.ParaStepConfig(degree=1), parastep.BatchStepConfig(stride=3, warmup_steps=2)]
    handle = parastep.apply(pipe, chain)
    assert torch.equal(run(pipe), alone)
    stats = handle.last_stats
    assert stats.model_calls == alone_calls == pipe.unet.forward_calls - before == 2 + math.ceil(8 / 3)
    assert stats.method == "parastep+batchstep" and stats.degree == 3
    assert [r.action for r in stats.records][2:5] == ["computed", "precomputed", "precomputed"]
    handle.remove()
    assert "forward" not in vars(pipe.unet) and "step" not in vars(pipe.scheduler)


def test_an_empty_chain_is_refused(pipe):
    with pytest.raises(parastep.ConfigError, match="at least one strategy config"):
        parastep.apply(pipe, [])
