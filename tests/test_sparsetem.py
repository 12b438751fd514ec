"""SparseTem: frame-difference computation of per-frame layers (built-in video model, tiny video VAEs)."""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

import demo_models
import parastep
from parastep.strategies.sparsetem import SparseTem, _Diff, _Part, supported_parts
from tests.distributed import run_ranks
from tests.tiny_pipelines import build

PROMPT = "a red circle moving right on a black background"
# every changed tile goes through the delta path (no dense frames, no resting layers, no audits)
EXACT = dict(threshold=0.0, adaptive=False, audit_every=0, min_macs=0, retry_every=1)


def latents(pipe, steps: int = 4, prompt: str = PROMPT, **kw) -> torch.Tensor:
    # Unguided unless asked: the clip counts and error targets below were sized on one clip per
    # call (the video model's default guidance is 3, a guidance batch of two clips, since issue 12).
    kw.setdefault("guidance_scale", 1.0)
    gen = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=steps, generator=gen, output_type="latent", **kw).frames


@pytest.fixture(scope="module")
def video():
    return demo_models.load_pipeline("video")


def diff_layers(stats: parastep.SparseTemStats) -> list[parastep.strategies.sparsetem.LayerStats]:
    return [layer for layer in stats.layers if layer.mode == "diff"]


@pytest.mark.parametrize("dense_above", [1.0, pytest.param(0.3, marks=pytest.mark.slow)])
def test_zero_threshold_gives_the_dense_result_within_float_tolerance(video, dense_above):
    base = latents(video)
    handle = parastep.apply(video, parastep.SparseTemConfig(**EXACT, dense_above=dense_above))
    out = latents(video)
    stats = parastep.SparseTemStats.of(handle)
    handle.remove()
    # y_f = y_{f-1} + W * (x_f - x_{f-1}) sums in another order than W * x_f: equal up to rounding
    assert (out - base).abs().max() < 1e-5
    layers = diff_layers(stats)
    assert {layer.name for layer in layers} >= {"denoiser.conv_in", "denoiser.time_mlp.0", "denoiser.conv_out"}
    assert all(layer.calls == 4 and layer.tiles > 0 for layer in layers)
    if dense_above == 1.0:  # the delta path ran: nothing computed densely after a clip's first frame
        assert all(layer.dense_frames == 0 for layer in layers)
        assert stats.skipped_work > 0  # step 0: every frame starts from the same noise


def test_identical_frames_cost_nothing_after_the_first(video):
    handle = parastep.apply(video, parastep.SparseTemConfig(**EXACT))
    strategy = handle.strategies[0]
    assert isinstance(strategy, SparseTem)
    unet = video.unet
    frame = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[1, 2, 1, 3, 1, 0]]).repeat(8, 1)  # the same tokens for every frame
    t = torch.full((8,), 500)
    with torch.no_grad():
        dense = unet.denoise(frame.repeat(8, 1, 1, 1), t, labels)
        with strategy.clips(8):
            out = unet.denoise(frame.repeat(8, 1, 1, 1), t, labels)
    stats = strategy.stats
    handle.remove()
    layers = diff_layers(stats)
    assert len(layers) > 20 and all(layer.skipped_fraction == 1.0 and layer.first_frames == 1 for layer in layers)
    assert stats.skipped_work == pytest.approx(7 / 8)
    assert torch.equal(out[1:], out[:1].expand(7, -1, -1, -1))  # later frames are the first frame's outputs
    assert (out - dense).abs().max() < 1e-5  # the first frame alone vs in a batch of 8: rounding


def test_adaptive_thresholds_keep_the_error_within_the_target(video):
    target = 0.02
    config = parastep.SparseTemConfig(threshold=0.5, error_target=target, verify=True, dense_above=1.0)
    handle = parastep.apply(video, config)
    latents(video, steps=6, prompt=demo_models.random_prompts("video", 1, seed=1)[0])
    seen = diff_layers(parastep.SparseTemStats.of(handle))
    handle.remove()
    audited = [layer for layer in seen if layer.audits]
    assert audited and sum(layer.skipped for layer in seen) > 0
    # an audited frame above the target made the layer's call dense and halved its threshold ...
    assert any(layer.fallbacks for layer in audited) and any(layer.threshold < 0.5 for layer in audited)
    # ... so what each layer returned (every frame, measured against the layer computed densely)
    # stays within twice the target, the riskiest frame of every audited call within it
    assert max(layer.verified_error or 0.0 for layer in seen) <= 2 * target


def hooked(layer: torch.nn.Module, **config) -> tuple[_Diff, _Part]:
    """``layer`` with SparseTem's hook alone (no pipeline); ``part.clip`` switches it on."""
    part = _Part("denoiser", stream=False)
    hook = _Diff("layer", part, layer, parastep.SparseTemConfig(**{**EXACT, "dense_above": 1.0, **config}))
    HookRegistry.check_if_exists_or_initialize(layer).register_hook(hook, "sparsetem")
    return hook, part


@pytest.mark.parametrize(
    "layer, size",
    [
        (torch.nn.Conv2d(4, 6, 3, padding=1), (16, 16)),
        (torch.nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), (13, 11)),  # tiles overhang
        (torch.nn.Conv2d(4, 6, (1, 5), padding="same"), (9, 12)),
        (torch.nn.Conv2d(4, 6, 4, stride=3), (17, 17)),
    ],
)
def test_any_conv_geometry_matches_dense_at_zero_threshold(layer, size):
    torch.manual_seed(0)
    x = torch.randn(2 * 5, 4, *size)  # 2 clips of 5 frames
    x[1:5] = x[0]  # the first clip is still, but for a corner of frame 3
    x[3, :, :3, :3] += 1.0
    hook, part = hooked(layer)
    with torch.no_grad():
        dense = layer(x)
        part.clip = 5
        out = layer(x)
    assert (out - dense).abs().max() < 1e-5
    assert 0 < hook.tally.skipped < hook.tally.tiles


def test_a_linear_layer_over_tokens_is_diffed_tile_by_tile():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 32)
    x = torch.randn(1, 64, 16).repeat(4, 1, 1)  # 4 frames of 64 tokens; tile=4: 16 tokens a tile
    x[1:, 0] += 1.0  # later frames change their first token only
    hook, part = hooked(layer)
    with torch.no_grad():
        dense = layer(x)
        part.clip = 4
        out = layer(x)
    assert out.shape == dense.shape and (out - dense).abs().max() < 1e-5
    # frame 1 computes the first tile; frames 2, 3 (same as frame 1) reuse every tile
    assert (hook.tally.tiles, hook.tally.skipped) == (3 * 4, 3 * 4 - 1)


def test_remove_restores_the_pipeline_exactly(video):
    before = latents(video, steps=2)
    modules = list(video.unet.modules())
    dicts = [set(vars(m)) for m in modules]
    handle = parastep.apply(video, parastep.SparseTemConfig())
    assert "_diffusers_hook" in vars(video.unet.conv_in) and "forward" in vars(video.unet.conv_in)
    latents(video, steps=2)
    handle.remove()
    assert [set(vars(m)) for m in modules] == dicts
    assert torch.equal(latents(video, steps=2), before)
    assert not hasattr(video, "_parastep_handle")


def test_removal_keeps_a_hook_registered_by_someone_else(video):
    class Double(ModelHook):
        def post_forward(self, module, output):
            return output * 2

    conv = video.unet.conv_out
    x = torch.randn(2, conv.in_channels, 8, 8)
    plain = conv(x)
    handle = parastep.apply(video, parastep.SparseTemConfig())
    HookRegistry.check_if_exists_or_initialize(conv).register_hook(Double(), "double")
    handle.remove()
    assert torch.equal(conv(x), 2 * plain)
    conv._diffusers_hook.remove_hook("double", recurse=False)
    assert torch.equal(conv(x), plain)


def test_vae_decoding_of_identical_frames_carries_over_between_chunks():
    pipe, _ = build("animatediff")
    handle = parastep.apply(pipe, parastep.SparseTemConfig(parts="vae", **EXACT))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = pipe.vae.decode(z.repeat(3, 1, 1, 1)).sample
        second = pipe.vae.decode(z.repeat(2, 1, 1, 1)).sample  # a second chunk of the same stream
    stats = parastep.SparseTemStats.of(handle)
    handle.remove()
    with torch.no_grad():
        dense = pipe.vae.decode(z).sample
    layers = diff_layers(stats)
    assert layers and all(layer.name.startswith("vae.") for layer in layers)
    # only the stream's very first frame is computed; the second chunk continues from the first's last
    assert all(layer.first_frames == 1 and layer.frames == 5 and layer.skipped_fraction == 1.0 for layer in layers)
    assert any(layer.mode.startswith("dense: non-local") for layer in stats.layers)
    assert (torch.cat([first, second]) - dense).abs().max() < 1e-5


def test_a_vae_decoding_one_frame_per_call_still_diffs_against_the_previous_frame():
    pipe, _ = build("animatediff")
    pipe.vae.enable_slicing()  # decode() then calls the decoder once per frame
    handle = parastep.apply(pipe, parastep.SparseTemConfig(parts="vae", **EXACT))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = pipe.vae.decode(z.repeat(3, 1, 1, 1)).sample
    stats = parastep.SparseTemStats.of(handle)
    handle.remove()
    layers = diff_layers(stats)
    assert all(layer.calls == 3 and layer.first_frames == 1 and layer.skipped_fraction == 1.0 for layer in layers)
    assert torch.equal(out[1:], out[:1].expand(2, -1, -1, -1))


@pytest.mark.parametrize("family", ["animatediff", "latte"])
def test_vae_part_of_the_tiny_video_families_matches_dense_at_zero_threshold(family):
    pipe, kwargs = build(family)
    run = lambda: pipe(**kwargs, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).frames
    base = run()
    handle = parastep.apply(pipe, parastep.SparseTemConfig(**EXACT))
    out = run()
    stats = parastep.SparseTemStats.of(handle)
    handle.remove()
    assert stats.parts == ("vae",)
    assert all(layer.frames == 2 for layer in diff_layers(stats))  # the decoder saw the 2 frames
    assert abs(out - base).max() < 1e-5


def test_a_chain_with_batchstep_keeps_the_clip_layout(video):
    handle = parastep.apply(video, parastep.BatchStepConfig(stride=2, warmup_steps=1))
    alone = latents(video, steps=5)
    handle.remove()
    handle = parastep.apply(
        video, [parastep.SparseTemConfig(**EXACT), parastep.BatchStepConfig(stride=2, warmup_steps=1)]
    )
    chained = latents(video, steps=5)
    stats, sparse = handle.last_stats, parastep.SparseTemStats.of(handle)
    handle.remove()
    assert stats.method == "sparsetem+batchstep" and stats.model_calls == 3
    assert all(layer.first_frames == 1 + 2 + 2 for layer in diff_layers(sparse))  # a clip per step and call
    assert (chained - alone).abs().max() < 1e-5


def sparsetem_with_parastep(rank: int, order: list[str]) -> dict:
    torch.manual_seed(0)
    pipe = demo_models.load_pipeline("video")
    configs = {
        "sparsetem": parastep.SparseTemConfig(error_target=0.05),
        "parastep": parastep.ParaStepConfig(warmup_steps=2),
    }
    handle = parastep.apply(pipe, [configs[name] for name in order])
    out = latents(pipe, steps=6)
    stats, sparse = handle.last_stats, parastep.SparseTemStats.of(handle)
    handle.remove()
    return dict(out=out, calls=stats.model_calls, layer_calls=max(layer.calls for layer in sparse.layers))


@pytest.mark.parametrize(
    "order",
    [
        pytest.param(["sparsetem", "parastep"], marks=pytest.mark.slow),
        pytest.param(["parastep", "sparsetem"], marks=pytest.mark.slow),
    ],
)
def test_sparsetem_with_parastep_on_two_ranks_leaves_every_rank_with_the_same_latents(order):
    results = run_ranks(sparsetem_with_parastep, 2, order)
    assert torch.equal(results[0]["out"], results[1]["out"])
    # 2 warm-up steps, then windows of 2 steps: each rank computes 2 + 2 of the 6 steps, and
    # SparseTem works inside exactly those forward passes
    assert [r["calls"] for r in results] == [4, 4] and [r["layer_calls"] for r in results] == [4, 4]


def test_stats_travel_as_json_and_need_a_sparsetem_handle(video):
    handle = parastep.apply(video, parastep.SparseTemConfig())
    latents(video, steps=2)
    stats = parastep.SparseTemStats.of(handle)
    handle.remove()
    assert parastep.SparseTemStats.from_dict(stats.to_dict()) == stats
    names = [layer.name for layer in stats.layers]
    assert names.index("denoiser.conv_in") < names.index("denoiser.down.0.norm1") < names.index("denoiser.conv_out")
    assert stats.seconds > 0 and 0 <= stats.skipped_work < 1
    handle = parastep.apply(video, parastep.ParaStepConfig())
    with pytest.raises(parastep.ParaStepError, match="apply a SparseTemConfig"):
        parastep.SparseTemStats.of(handle)
    handle.remove()


@pytest.mark.parametrize(
    "family, parts, words, supported",
    [
        ("builtin-image", "auto", "ShapesImagePipeline makes image", ()),
        ("sd", "auto", "StableDiffusionPipeline makes image", ()),
        ("builtin-video", "vae", "vae of ShapesVideoPipeline: vae: it has no VAE.*Use parts='denoiser'", ("denoiser",)),
        ("animatediff", "denoiser", "denoiser of AnimateDiffPipeline: .*UNetMotionModel.*Use parts='vae'", ("vae",)),
        ("animatediff", "both", "denoiser of AnimateDiffPipeline", ("vae",)),
        (
            "svd",
            "auto",
            "StableVideoDiffusionPipeline.*AutoencoderKLTemporalDecoder does not decode frame by frame",
            (),
        ),
        ("cogvideox", "auto", "CogVideoXPipeline.*CogVideoXTransformer3DModel is not a known per-frame network", ()),
    ],
)
def test_what_cannot_be_diffed_is_refused_naming_the_pipeline(family, parts, words, supported):
    if family.startswith("builtin-"):
        pipe = demo_models.load_pipeline(family.removeprefix("builtin-"))
    else:
        pipe, _ = build(family)
    assert supported_parts(pipe) == supported
    with pytest.raises(parastep.UnsupportedPipelineError, match=words):
        parastep.apply(pipe, parastep.SparseTemConfig(parts=parts))
    assert not hasattr(pipe, "_parastep_handle")
    assert not any("_diffusers_hook" in vars(m) for m in pipe.components.values() if isinstance(m, torch.nn.Module))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(parts="frames"), "parts must be one of auto, denoiser, vae, both"),
        (dict(threshold=-0.1), "threshold must be a number"),
        (dict(error_target=0), "error_target must be a relative error > 0"),
        (dict(audit_every=0), "adaptive thresholds need audits"),
        (dict(dense_above=0), "dense_above must be a fraction"),
        (dict(tile=0), "tile must be an integer >= 1"),
    ],
)
def test_bad_configuration_says_what_to_change(kwargs, words):
    with pytest.raises(parastep.ConfigError, match=words):
        parastep.SparseTemConfig(**kwargs)
