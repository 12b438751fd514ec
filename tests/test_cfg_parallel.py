"""CFG-parallel on 2 gloo ranks against a replay that runs the two halves of the guidance batch
one after the other in one process."""

from __future__ import annotations

import pytest
import torch

import parastep
from tests.distributed import run_ranks
from tests.toy import toy_embeds, toy_pipeline

T = 8
FAMILIES = ["sd", "sdxl", "sd3", "cogvideox", "latte", "svd", "animatediff", "audioldm2"]
REFUSED = [("flux", {}), ("flux", {"true_cfg": True}), ("sd3", {"skip_layer_guidance": True})]
CASES = [(f, {}) for f in FAMILIES] + REFUSED + [("sd", {"scheduler": "DPMSolverMultistepScheduler"})]


def name_of(family: str, variant: dict) -> str:
    return "-".join([family, *(str(v) if k == "scheduler" else k for k, v in variant.items())])


def run(pipe, embeds=None, steps=T):
    pe, ne = embeds or toy_embeds()
    return pipe(pe, ne, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent")


@torch.no_grad()
def cfg_replay(steps=T, guidance=3.0) -> torch.Tensor:
    """Classifier-free guidance with the unconditional and conditional predictions as two calls."""
    pipe = toy_pipeline()
    sched = pipe.scheduler
    pe, ne = toy_embeds()
    sched.set_timesteps(steps)
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    for t in sched.timesteps:
        x_in = sched.scale_model_input(x, t)
        u = pipe.unet(x_in, t, encoder_hidden_states=ne).sample
        c = pipe.unet(x_in, t, encoder_hidden_states=pe).sample
        x = sched.step(u + guidance * (c - u), t, x).prev_sample
    return x


def latents_of(pipe, kwargs) -> torch.Tensor:
    finals = []
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda *a, _s=step, **k: finals.append(_s(*a, **k)) or finals[-1]
    try:
        pipe(**{**kwargs, "output_type": "latent"}, num_inference_steps=T, generator=torch.Generator().manual_seed(0))
    finally:
        pipe.scheduler.step = step
    last = finals[-1]
    return last[0] if isinstance(last, tuple) else last.prev_sample


def cfg_rank(rank: int, pair) -> dict:
    """Ranks 0 and 1 of the spawn in tests/contestants.py; ``pair`` is their group."""
    torch.set_num_threads(1)
    pipe = toy_pipeline()
    results: dict = dict(base=run(pipe))
    handle = parastep.apply(pipe, parastep.CFGParallelConfig(), pair)
    results["out"] = run(pipe)
    s = handle.last_stats
    results["stats"] = (s.model_calls, s.bytes_sent, s.bytes_received, s.degree, s.method)
    results["unet_calls"] = pipe.unet.forward_calls
    pe, ne = toy_embeds()
    for name, embeds in [("no_negative", (pe, None)), ("two_prompts_no_guidance", (torch.cat([pe, pe]), None))]:
        try:
            run(pipe, embeds)
            results[name] = "no error"
        except parastep.UnsupportedPipelineError as exc:
            results[name] = str(exc)
    results["after_refusals"] = run(pipe)
    handle.remove()
    results["restored"] = run(pipe)
    try:
        parastep.apply(pipe, parastep.CFGParallelConfig(timeout_s=10 + rank), pair)
        results["mismatch"] = "no error"
    except parastep.ConfigError as exc:
        results["mismatch"] = str(exc)

    from tests.tiny_pipelines import build  # imported where used: spawned ranks import this module

    families: dict[str, dict] = {}
    for family, variant in CASES:
        pipe, kwargs = build(family, **variant)
        base = latents_of(pipe, kwargs)
        handle = parastep.apply(pipe, parastep.CFGParallelConfig(), pair)
        try:
            families[name_of(family, variant)] = dict(latents=latents_of(pipe, kwargs), base=base)
        except parastep.UnsupportedPipelineError as exc:
            families[name_of(family, variant)] = dict(refused=str(exc))
        handle.remove()
    results["families"] = families
    return results


@pytest.fixture(scope="module")
def two_ranks():
    from tests.contestants import spawned_ranks

    return [r["cfg"] for r in spawned_ranks()[:2]]


def test_each_rank_equals_the_halves_run_one_after_the_other(two_ranks):
    expected = cfg_replay()
    for rank in (0, 1):
        assert torch.equal(two_ranks[rank]["out"], expected)
    # against the batched baseline: equal up to the order of float reductions
    torch.testing.assert_close(two_ranks[0]["out"], two_ranks[0]["base"], rtol=1e-5, atol=1e-6)


def test_each_rank_computes_one_half_per_step_and_sends_it(two_ranks):
    half = 1 * 4 * 8 * 8 * 4  # fp32 bytes of one half of the prediction
    for rank in (0, 1):
        calls, sent, received, degree, method = two_ranks[rank]["stats"]
        assert calls == T and two_ranks[rank]["unet_calls"] == 2 * T  # the baseline's T calls, then T halves
        assert T * half <= sent < T * (half + 256) and received == two_ranks[1 - rank]["stats"][1]
        assert degree == 2 and method == "cfg_parallel"


def test_a_call_without_a_guidance_batch_is_refused_and_the_next_call_works(two_ranks):
    for rank in (0, 1):
        r = two_ranks[rank]
        assert "batch of 1, which has no unconditional and conditional halves" in r["no_negative"]
        assert "guidance_scale > 1" in r["no_negative"]
        assert "batch (2) is not twice the latents' (2)" in r["two_prompts_no_guidance"]
        assert torch.equal(r["after_refusals"], r["out"]) and torch.equal(r["restored"], r["base"])
        assert "same config" in r["mismatch"]


@pytest.mark.parametrize("name", FAMILIES + ["sd-DPMSolverMultistepScheduler"])
def test_drop_in_on_two_ranks(two_ranks, name):
    r0, r1 = two_ranks[0]["families"][name], two_ranks[1]["families"][name]
    assert torch.equal(r0["latents"], r1["latents"]) and torch.isfinite(r0["latents"]).all()
    torch.testing.assert_close(r0["latents"], r0["base"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family,variant", REFUSED, ids=[name_of(*case) for case in REFUSED])
def test_no_guidance_batch_and_separate_guidance_calls_are_refused_clearly(two_ranks, family, variant):
    r0, r1 = (two_ranks[rank]["families"][name_of(family, variant)] for rank in (0, 1))
    assert "no unconditional and conditional halves" in r0["refused"] and r0 == r1
    assert ("denoiser call 1 of step 1" if family == "sd3" else "denoiser call 0 of step 0") in r0["refused"]


def test_without_a_process_group_of_two_it_is_refused():
    with pytest.raises(parastep.ConfigError, match="process group of 2 ranks"):
        parastep.apply(toy_pipeline(), parastep.CFGParallelConfig())
    with pytest.raises(parastep.ConfigError, match="timeout_s"):
        parastep.CFGParallelConfig(timeout_s=0)


def mesh_rank(rank: int, steps: int, warmup: int) -> dict:
    """CFG-parallel x ParaStep-2 on a 2x2 mesh: rank = 2 * (guidance half) + (ParaStep rank)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    halves = [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2]
    windows = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
    pipe = toy_pipeline()
    configs = [parastep.CFGParallelConfig(), parastep.ParaStepConfig(warmup_steps=warmup)]
    handle = parastep.apply(pipe, configs, group=[halves, windows])
    out = run(pipe, steps=steps)
    s = handle.last_stats
    handle.remove()
    return dict(out=out, calls=s.model_calls, rank=s.rank, world=s.world_size, method=s.method, sent=s.bytes_sent)


@pytest.mark.slow  # four processes
def test_cfg_parallel_composes_with_parastep_on_a_two_by_two_mesh():
    import math

    import diffusers

    from tests.test_dist import parastep_replay

    steps, warmup = 11, 2
    results = run_ranks(mesh_rank, 4, steps, warmup)
    expected = parastep_replay(diffusers.DDIMScheduler, steps, warmup, 2)
    for rank, r in enumerate(results):
        assert torch.equal(r["out"], results[0]["out"])
        torch.testing.assert_close(r["out"], expected, rtol=1e-5, atol=1e-5)  # ParaStep-2, batch split in two
        assert r["rank"] == rank and r["world"] == 4 and r["method"] == "cfg_parallel+parastep" and r["sent"] > 0
        windows = math.ceil((steps - warmup) / 2) if rank % 2 == 0 else (steps - warmup) // 2
        assert r["calls"] == warmup + windows  # forward passes, each on half the guidance batch


def test_a_chain_takes_one_group_or_one_per_config():
    with pytest.raises(parastep.ConfigError, match=r"one per config \(2\); got 3"):
        parastep.apply(toy_pipeline(), [parastep.CFGParallelConfig(), parastep.ParaStepConfig()], group=[None] * 3)
