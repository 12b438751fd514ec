"""AsyncDiff on real processes (2 and 3 gloo ranks) against replays of its algorithm written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import parastep
from parastep.strategies.asyncdiff import AsyncDiff, balanced_cuts
from tests.toy import ToyOutput, ToyPipeline, toy_embeds, toy_pipeline

T, W = 8, 2
BLOCKS = ("conv_in", "blocks.*", "conv_out")
ORDER = ["conv_in", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "conv_out"]
FAMILIES = ["sd", "sdxl", "sd3", "flux", "cogvideox", "latte", "image"]  # image: the built-in model


class Block(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb):
        return x + torch.tanh(self.conv(x)) * emb


class SkipChain(torch.nn.Module):
    """conv_in -> four blocks -> conv_out, with a long skip from conv_in to conv_out; the timestep
    and text embedding are glue every rank computes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv_in = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.blocks = torch.nn.ModuleList(Block(8) for _ in range(4))
        self.conv_out = torch.nn.Conv2d(8, 4, 3, padding=1)

    def embed(self, timestep, encoder_hidden_states, like):
        t = torch.as_tensor(timestep, dtype=like.dtype).reshape(-1, 1, 1, 1)
        return t / 1000 + 0.1 + encoder_hidden_states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        emb = self.embed(timestep, encoder_hidden_states, sample)
        h = skip = self.conv_in(sample)
        for block in self.blocks:
            h = block(h, emb)
        out = self.conv_out(h + skip)
        return ToyOutput(sample=out) if return_dict else (out,)


def skip_pipeline() -> ToyPipeline:
    base = toy_pipeline()
    return ToyPipeline(SkipChain(), base.scheduler)


def split_of(handle) -> list[list[str]]:
    strategy = handle.strategy
    assert isinstance(strategy, AsyncDiff) and strategy.split is not None
    return strategy.split


def run(pipe, steps=T):
    return pipe(
        *toy_embeds(), num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent"
    )


# -- the algorithm, by hand, in one process ------------------------------------------------------
def stage_outputs(net: SkipChain, names: list[str], x_in, emb, before: dict) -> dict:
    """The blocks ``names`` of one stage; what other stages compute comes from ``before`` (their
    outputs of the step before)."""
    now: dict = {}

    def latest(name):
        return now[name] if name in now else before[name]

    for name in names:
        if name == "conv_in":
            now[name] = net.conv_in(x_in)
        elif name == "conv_out":
            now[name] = net.conv_out(latest("blocks.3") + latest("conv_in"))
        else:
            i = int(name[-1])
            now[name] = net.blocks[i](latest(ORDER[i]), emb)
    return now


@torch.no_grad()
def asyncdiff_replay(split: list[list[str]], stride: int, steps=T, warmup=W, guidance=3.0) -> torch.Tensor:
    pipe = skip_pipeline()
    net, sched = pipe.unet, pipe.scheduler
    pe, ne = toy_embeds()
    text = torch.cat([ne, pe])
    sched.set_timesteps(steps)
    ts = sched.timesteps
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    before: dict = {}
    pending = None
    for k in range(steps):
        x_in = sched.scale_model_input(torch.cat([x, x]), ts[k])

        def emb(t, x_in=x_in):
            return net.embed(t, text, x_in)

        if k < warmup:  # the whole model
            before = stage_outputs(net, ORDER, x_in, emb(ts[k]), {})
            eps = before["conv_out"]
        elif stride == 1:  # every stage on the others' outputs of step k-1
            now: dict = {}
            for names in split:
                now.update(stage_outputs(net, names, x_in, emb(ts[k]), before))
            before, eps = now, now["conv_out"]
        elif (k - warmup) % 2 == 0:  # owners compute step k+1, the shadow step k
            t_own = ts[k + 1] if k + 1 < steps else ts[k]
            now = {}
            for names in split:
                now.update(stage_outputs(net, names, x_in, emb(t_own), before))
            eps = stage_outputs(net, split[-1], x_in, emb(ts[k]), before)["conv_out"]
            before, pending = now, now["conv_out"]
        else:  # the last stage's output at step k-1 (for step k)
            eps = pending
        u, c = eps.chunk(2)
        x = sched.step(u + guidance * (c - u), ts[k], x).prev_sample
    return x


@torch.no_grad()
def upstream_replay(family: str, split: list[list[str]], steps=T, warmup=W) -> torch.Tensor:
    """The reference code's way on any pipeline, in one process: each stage's rank runs the whole
    forward, its own blocks computing and every other block returning what its owner computed at
    the step before, and every block output goes to every rank (forward hooks, no tracing)."""
    torch.set_num_threads(1)  # as on the ranks: the same reduction order
    pipe, kwargs = load(family)
    denoiser = getattr(pipe, parastep.spec_for(pipe).denoiser)
    owner = {name: s for s, names in enumerate(split) for name in names}
    state = {"step": 0, "rank": 0}
    cache: dict = {}
    fresh: dict = {}

    def hook(name):
        def replace(module, args, output):
            if state["step"] < warmup or owner[name] == state["rank"]:
                fresh[name] = output
                return output
            return cache[name]

        return replace

    for name in owner:
        denoiser.get_submodule(name).register_forward_hook(hook(name))
    forward, step = denoiser.forward, pipe.scheduler.step

    def staged(*args, **kw):
        if state["step"] < warmup:
            out = forward(*args, **kw)
        else:
            for rank in range(len(split)):
                state["rank"] = rank
                out = forward(*args, **kw)  # the last stage's rank makes the prediction
        cache.update(fresh)
        return out

    def counted(*args, **kw):
        state["step"] += 1
        return step(*args, **kw)

    denoiser.forward, pipe.scheduler.step = staged, counted
    return latents_of(pipe, kwargs, steps)


def load(family: str):
    if family == "image":
        from demo_models import load_pipeline

        prompt = "a large red circle in the center on a blue background"
        return load_pipeline("image"), dict(prompt=prompt, guidance_scale=3.0, output_type="np")
    from tests.tiny_pipelines import build  # imported where used: spawned ranks import this module

    return build(family)


def latents_of(pipe, kwargs, steps=T, decode=False):
    """The latents the last step left (and, with ``decode``, the decoded output as well)."""
    finals = []
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda *a, _s=step, **k: finals.append(_s(*a, **k)) or finals[-1]
    out = pipe(
        **{**kwargs, **({} if decode else {"output_type": "latent"})},
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
    )
    pipe.scheduler.step = step
    last = finals[-1]
    latents = last[0] if isinstance(last, tuple) else last.prev_sample
    return (latents, torch.as_tensor(np.asarray(next(iter(out.values()))))) if decode else latents


# -- 2 ranks ---------------------------------------------------------------------------------------
def two_rank_checks(rank: int, pair) -> dict:
    pipe = skip_pipeline()
    base = run(pipe)
    results: dict = dict(base=base)
    handle = parastep.apply(
        pipe, parastep.AsyncDiffConfig(stages=2, warmup_steps=W, balance="params", blocks=BLOCKS), pair
    )
    out = run(pipe)
    s = handle.last_stats
    results["params"] = dict(
        out=out,
        split=split_of(handle),
        calls=s.model_calls,
        sent=s.bytes_sent,
        received=s.bytes_received,
        actions=[r.action for r in s.records],
    )
    handle.remove()
    hooks_left = [n for n, m in pipe.unet.named_modules() if "forward" in vars(m)]
    results["restored"] = (torch.equal(run(pipe), base), hooks_left)

    handle = parastep.apply(pipe, parastep.AsyncDiffConfig(stages=2, warmup_steps=3, blocks=BLOCKS), pair)  # by time
    results["timed"] = dict(out=run(pipe), split=split_of(handle))
    handle.remove()
    for name, config in [
        ("full_warmup", parastep.AsyncDiffConfig(stages=2, warmup_steps=T, blocks=BLOCKS)),
        ("one_stage", parastep.AsyncDiffConfig(stages=1, blocks=BLOCKS)),
    ]:
        handle = parastep.apply(pipe, config, pair)
        results[name] = (run(pipe), handle.last_stats.model_calls, handle.last_stats.bytes_sent)
        handle.remove()
    for name, config in [
        ("mismatch", parastep.AsyncDiffConfig(warmup_steps=2 + rank, blocks=BLOCKS)),
        ("too_few_ranks", parastep.AsyncDiffConfig(stages=3, blocks=BLOCKS)),
        ("stride_needs_more", parastep.AsyncDiffConfig(stages=2, stride=2, blocks=BLOCKS)),
    ]:
        try:
            parastep.apply(pipe, config, pair)
            results[name] = "no error"
        except parastep.ConfigError as exc:
            results[name] = str(exc)
    results["families"] = families_on(rank, pair)
    return results


def families_on(rank: int, pair) -> dict:
    """Drop-in: every family with 2 stages, and with a warm-up as long as the call."""
    out = {}
    for family in FAMILIES:
        pipe, kwargs = load(family)
        handle = parastep.apply(pipe, parastep.AsyncDiffConfig(stages=2, warmup_steps=W), pair)
        latents, decoded = latents_of(pipe, kwargs, decode=True)
        split, calls = split_of(handle), handle.last_stats.model_calls
        handle.remove()
        base = latents_of(pipe, kwargs)
        handle = parastep.apply(pipe, parastep.AsyncDiffConfig(stages=2, warmup_steps=T), pair)
        full = latents_of(pipe, kwargs)
        handle.remove()
        out[family] = dict(latents=latents, split=split, calls=calls, decoded=decoded, base=base, full=full)
    return out


@pytest.fixture(scope="module")
def ranks():
    from tests.contestants import spawned_ranks

    return spawned_ranks()


@pytest.fixture(scope="module")
def two_ranks(ranks):
    return [r["two"] for r in ranks[:2]]


@pytest.fixture(scope="module")
def three_ranks(ranks):
    return [r["three"] for r in ranks]


def test_two_stages_equal_the_replayed_algorithm(two_ranks):
    r0, r1 = two_ranks[0]["params"], two_ranks[1]["params"]
    split = [["conv_in", "blocks.0", "blocks.1"], ["blocks.2", "blocks.3", "conv_out"]]  # by parameter count
    assert r0["split"] == r1["split"] == split
    expected = asyncdiff_replay(split, stride=1)
    assert torch.equal(r0["out"], r1["out"])
    torch.testing.assert_close(r0["out"], expected, rtol=1e-6, atol=1e-7)
    assert (r0["out"] - two_ranks[0]["base"]).abs().max() > 1e-3  # stale stages: not the baseline
    assert r0["calls"] == r1["calls"] == T  # every rank runs the forward each step (its own stage only)
    assert r0["actions"] == r1["actions"] == ["computed"] * T


def test_only_what_the_other_stage_reads_crosses_the_link(two_ranks):
    r0, r1 = two_ranks[0]["params"], two_ranks[1]["params"]
    activation, prediction = 2 * 8 * 8 * 8 * 4, 2 * 4 * 8 * 8 * 4  # fp32 bytes of one block output, of eps
    # rank 0 -> 1: blocks.1 (the stage input) and conv_in (the long skip), not blocks.0; rank 1 -> 0: eps
    assert r0["sent"] == r1["received"] and r1["sent"] == r0["received"]
    assert (T - W) * 2 * activation <= r0["sent"] < (T - W) * (3 * activation)
    assert (T - W) * prediction <= r1["sent"] < (T - W) * (prediction + activation)


def test_a_time_balanced_split_is_agreed_by_every_rank(two_ranks):
    r0, r1 = two_ranks[0]["timed"], two_ranks[1]["timed"]
    assert r0["split"] == r1["split"] and len(r0["split"]) == 2 and all(r0["split"])
    assert [n for stage in r0["split"] for n in stage] == ORDER
    assert torch.equal(r0["out"], r1["out"])
    torch.testing.assert_close(r0["out"], asyncdiff_replay(r0["split"], stride=1, warmup=3), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["full_warmup", "one_stage"])
def test_one_stage_or_a_full_warmup_is_the_baseline_bit_for_bit(two_ranks, name):
    for rank in (0, 1):
        out, calls, sent = two_ranks[rank][name]
        assert torch.equal(out, two_ranks[rank]["base"])
        assert calls == T and sent == 0


def test_remove_restores_every_block(two_ranks):
    for rank in (0, 1):
        same, hooks_left = two_ranks[rank]["restored"]
        assert same and hooks_left == []


def test_wrong_configurations_are_refused_on_every_rank(two_ranks):
    for rank in (0, 1):
        assert "same config" in two_ranks[rank]["mismatch"]
        assert "exactly 3 ranks, but the process group has 2" in two_ranks[rank]["too_few_ranks"]
        assert "exactly 3 ranks" in two_ranks[rank]["stride_needs_more"]


@pytest.mark.parametrize("family", FAMILIES)
def test_drop_in_on_two_ranks(two_ranks, family):
    r0, r1 = two_ranks[0]["families"][family], two_ranks[1]["families"][family]
    assert torch.equal(r0["latents"], r1["latents"]), "ranks left with different latents"
    assert torch.isfinite(r0["decoded"]).all() and torch.isfinite(r0["latents"]).all()
    assert r0["split"] == r1["split"] and len(r0["split"]) == 2 and all(r0["split"])
    assert r0["calls"] == r1["calls"] == T
    assert torch.equal(r0["full"], r0["base"]) and torch.equal(r1["full"], r1["base"])  # warm-up >= steps
    # only what is read crossed the link, yet the result is the reference's, where every block output does
    assert torch.equal(r0["latents"], upstream_replay(family, r0["split"]))


# -- 3 ranks: stride 2 (a shadow of the last stage), and 3 stages ----------------------------------
def three_rank_checks(rank: int) -> dict:
    pipe = skip_pipeline()
    results: dict = {}
    for name, config in [
        ("stride2", parastep.AsyncDiffConfig(stages=2, stride=2, warmup_steps=W, balance="params", blocks=BLOCKS)),
        ("stages3", parastep.AsyncDiffConfig(stages=3, warmup_steps=W, balance="params", blocks=BLOCKS)),
    ]:
        handle = parastep.apply(pipe, config)
        out = run(pipe)
        s = handle.last_stats
        results[name] = dict(
            out=out,
            split=split_of(handle),
            calls=s.model_calls,
            sent=s.bytes_sent,
            received=s.bytes_received,
            actions=[r.action for r in s.records],
        )
        handle.remove()
    try:
        parastep.apply(pipe, parastep.AsyncDiffConfig(stages=2, blocks=BLOCKS))  # on all 3
        results["wrong_size"] = "no error"
    except parastep.ConfigError as exc:
        results["wrong_size"] = str(exc)
    return results


def test_stride_two_equals_the_replayed_algorithm(three_ranks):
    results = [r["stride2"] for r in three_ranks]
    split = [["conv_in", "blocks.0", "blocks.1"], ["blocks.2", "blocks.3", "conv_out"]]
    assert all(r["split"] == split for r in results)
    assert torch.equal(results[0]["out"], results[1]["out"]) and torch.equal(results[0]["out"], results[2]["out"])
    torch.testing.assert_close(results[0]["out"], asyncdiff_replay(split, stride=2), rtol=1e-6, atol=1e-7)
    assert not torch.equal(asyncdiff_replay(split, stride=2), asyncdiff_replay(split, stride=1))
    rounds = (T - W + 1) // 2  # each stage computes once per two steps
    assert [r["calls"] for r in results] == [W + rounds, T, W + rounds]  # the last stage's rank reruns its glue
    assert results[0]["actions"][W:] == ["computed", "received"] * rounds
    assert results[1]["actions"][W:] == ["computed", "reused"] * rounds
    assert sum(r["sent"] for r in results) == sum(r["received"] for r in results) > 0


def test_three_stages_equal_the_replayed_algorithm(three_ranks):
    results = [r["stages3"] for r in three_ranks]
    split = [["conv_in", "blocks.0"], ["blocks.1", "blocks.2"], ["blocks.3", "conv_out"]]
    assert all(r["split"] == split for r in results)
    assert all(torch.equal(r["out"], results[0]["out"]) for r in results)
    torch.testing.assert_close(results[0]["out"], asyncdiff_replay(split, stride=1), rtol=1e-6, atol=1e-7)
    assert [r["calls"] for r in results] == [T] * 3


def test_stride_two_on_three_ranks_needs_three(three_ranks):
    for r in three_ranks:
        assert "exactly 2 ranks, but the process group has 3" in r["wrong_size"]


# -- one process ---------------------------------------------------------------------------------
def test_a_denoiser_without_known_blocks_is_refused_naming_the_pipeline():
    with pytest.raises(parastep.UnsupportedPipelineError, match="ToyPipeline.*ToyDenoiser.*BLOCKS"):
        parastep.apply(toy_pipeline(), parastep.AsyncDiffConfig())
    with pytest.raises(parastep.UnsupportedPipelineError, match="ToyPipeline into 3 stages: it has 2 block"):
        parastep.apply(skip_pipeline(), parastep.AsyncDiffConfig(stages=3, blocks=("conv_in", "conv_out")))


def test_configurations_that_cannot_run_are_refused():
    pipe = skip_pipeline()
    with pytest.raises(parastep.ConfigError, match="stride must be 1 or 2"):
        parastep.AsyncDiffConfig(stride=3)
    with pytest.raises(parastep.ConfigError, match="balance"):
        parastep.AsyncDiffConfig(balance="flops")
    with pytest.raises(parastep.ConfigError, match="warmup_steps >= 1"):
        parastep.apply(pipe, parastep.AsyncDiffConfig(warmup_steps=0, blocks=BLOCKS))
    with pytest.raises(parastep.ConfigError, match="process group of 2 ranks"):
        parastep.apply(pipe, parastep.AsyncDiffConfig(blocks=BLOCKS))
    with pytest.raises(parastep.ConfigError, match="must not contain one another"):
        parastep.apply(pipe, parastep.AsyncDiffConfig(blocks=("blocks", "blocks.*")))
    assert not hasattr(pipe, "_parastep_handle")


def test_one_stage_in_one_process_is_the_baseline():
    pipe = skip_pipeline()
    base = run(pipe)
    handle = parastep.apply(pipe, parastep.AsyncDiffConfig(stages=1, blocks=BLOCKS))
    assert torch.equal(run(pipe), base) and handle.last_stats.model_calls == T
    handle.remove()


def test_balanced_cuts_minimise_the_largest_stage():
    assert balanced_cuts([296, 584, 584, 584, 584, 292], 2) == [0, 3]
    assert balanced_cuts([296, 584, 584, 584, 584, 292], 3) == [0, 2, 4]
    assert balanced_cuts([1, 1, 1, 1], 4) == [0, 1, 2, 3]
    assert balanced_cuts([10, 1, 1, 1], 2) == [0, 1]
