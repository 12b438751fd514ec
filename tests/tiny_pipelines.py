"""Tiny random-weight diffusers pipelines, built entirely in code (no hub, no tokenizers).

Modelled on ``get_dummy_components()`` in diffusers' own fast tests
(tests/pipelines/<family>/test_*.py), shrunk further so that a whole 8-10 step
call takes around a second or less on one CPU core.

No tokenizer is ever loaded: where a pipeline needs text conditioning, a tiny text
encoder is built from a config, run once on fixed pseudo-random token ids, and the
resulting ``prompt_embeds`` / ``negative_prompt_embeds`` / pooled embeds are passed
to the call.  Tokenizer components are ``None``.

API::

    FAMILIES = ["sd", "sdxl", "sd3", "flux", "cogvideox", "latte", "svd", "animatediff", "audioldm2"]
    pipe, call_kwargs = build(family, seed=0, scheduler=None, true_cfg=False, skip_layer_guidance=False)
    out = pipe(**call_kwargs, num_inference_steps=8, generator=torch.Generator().manual_seed(0))

``call_kwargs`` holds everything except ``num_inference_steps`` and ``generator``;
``output_type`` is ``"np"`` and classifier-free guidance is active wherever the family
supports it.  ``scheduler`` may name any diffusers scheduler class (e.g.
``"DPMSolverMultistepScheduler"``); it is built with ``from_config`` from the family's
default scheduler config.

Variants:
  * ``build("flux", true_cfg=True)``: negative embeds + ``true_cfg_scale=2.0`` (two
    transformer calls per step).
  * ``build("flux", guidance_embeds=True)``: FLUX.1-dev style guidance-distilled transformer
    (``guidance_scale`` feeds the guidance embedding; still one call per step).
  * ``build("sd3", skip_layer_guidance=True)``: 2-layer transformer,
    ``skip_guidance_layers=[0]`` with a window that covers steps 1..(n/2 - 1), so the
    extra transformer call happens on some (not all) steps.
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch
from diffusers import DiffusionPipeline

from tests.toy import DEVICE, DTYPE

FAMILIES: list[str] = ["sd", "sdxl", "sd3", "flux", "cogvideox", "latte", "svd", "animatediff", "audioldm2"]

# (family, build kwargs) for the non-default variants exercised by the verification script.
VARIANTS: list[tuple[str, dict]] = [
    ("flux", {"true_cfg": True}),
    ("flux", {"guidance_embeds": True}),
    ("sd3", {"skip_layer_guidance": True}),
    ("sd", {"scheduler": "DPMSolverMultistepScheduler"}),
    ("sd", {"scheduler": "UniPCMultistepScheduler"}),
    ("sd", {"scheduler": "EulerDiscreteScheduler"}),
    ("sdxl", {"scheduler": "DDIMScheduler"}),
    ("cogvideox", {"scheduler": "CogVideoXDPMScheduler"}),
]

_TEXT_LEN = 8  # token length of the fake prompts fed to the tiny text encoders


# --------------------------------------------------------------------------- helpers


def _seeded(seed: int, fn, *args, **kwargs):
    """Build one module right after torch.manual_seed(seed) so weights are deterministic."""
    torch.manual_seed(seed)
    module = fn(*args, **kwargs)
    if isinstance(module, torch.nn.Module):
        module.eval()
    return module


def _ids(seed: int, offset: int, vocab: int = 1000, length: int = _TEXT_LEN) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1000 + offset)
    return torch.randint(3, vocab, (1, length), generator=g)


def _scheduler(default, name: str | None):
    if name is None:
        return default
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"unknown scheduler class {name!r}")
    return cls.from_config(default.config)


def _clip_text_config(**overrides):
    from transformers import CLIPTextConfig

    kw = dict(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        pad_token_id=1,
        vocab_size=1000,
        hidden_act="gelu",
        projection_dim=32,
    )
    kw.update(overrides)
    return CLIPTextConfig(**kw)


def _t5(seed: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=1000, d_model=d_model, d_ff=37, d_kv=8, num_heads=4, num_layers=2)
    return _seeded(seed, T5EncoderModel, cfg)


@torch.no_grad()
def _t5_embeds(t5, ids):
    return t5(input_ids=ids)[0]


def _small_vae(seed: int, in_channels: int = 3, latent_channels: int = 4, block_out_channels=(4, 8), groups: int = 2):
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return _seeded(
        seed,
        AutoencoderKL,
        block_out_channels=list(block_out_channels),
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        latent_channels=latent_channels,
        norm_num_groups=groups,
    )


# --------------------------------------------------------------------------- families


def _build_sd(seed: int, scheduler: str | None):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = _seeded(
        seed,
        UNet2DConditionModel,
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    vae = _small_vae(seed)
    text_encoder = _seeded(seed, CLIPTextModel, _clip_text_config())
    default = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=None,
        unet=unet,
        scheduler=_scheduler(default, scheduler),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    with torch.no_grad():
        pe = text_encoder(_ids(seed, 1))[0]
        ne = text_encoder(_ids(seed, 2))[0]
    kwargs = dict(
        prompt_embeds=pe,
        negative_prompt_embeds=ne,
        height=32,
        width=32,
        guidance_scale=5.0,
        output_type="np",
    )
    return pipe, kwargs


def _build_sdxl(seed: int, scheduler: str | None):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = _seeded(
        seed,
        UNet2DConditionModel,
        block_out_channels=(2, 4),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
        cross_attention_dim=64,
        norm_num_groups=1,
    )
    vae = _small_vae(seed)
    cfg = _clip_text_config()
    text_encoder = _seeded(seed, CLIPTextModel, cfg)
    text_encoder_2 = _seeded(seed + 1, CLIPTextModelWithProjection, cfg)
    default = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=_scheduler(default, scheduler),
        image_encoder=None,
        feature_extractor=None,
    )

    @torch.no_grad()
    def enc(off):
        ids = _ids(seed, off)
        h1 = text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        o2 = text_encoder_2(ids, output_hidden_states=True)
        return torch.cat([h1, o2.hidden_states[-2]], dim=-1), o2.text_embeds

    pe, pooled = enc(1)
    ne, npooled = enc(2)
    kwargs = dict(
        prompt_embeds=pe,
        negative_prompt_embeds=ne,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=npooled,
        height=32,
        width=32,
        guidance_scale=5.0,
        output_type="np",
    )
    return pipe, kwargs


def _build_sd3(seed: int, scheduler: str | None, skip_layer_guidance: bool = False):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    transformer = _seeded(
        seed,
        SD3Transformer2DModel,
        sample_size=16,
        patch_size=1,
        in_channels=4,
        num_layers=2 if skip_layer_guidance else 1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    cfg = _clip_text_config()
    text_encoder = _seeded(seed, CLIPTextModelWithProjection, cfg)
    text_encoder_2 = _seeded(seed + 1, CLIPTextModelWithProjection, cfg)
    text_encoder_3 = _t5(seed + 2)
    vae = _seeded(
        seed,
        AutoencoderKL,
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    default = FlowMatchEulerDiscreteScheduler()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_scheduler(default, scheduler),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=None,
        text_encoder_2=text_encoder_2,
        tokenizer_2=None,
        text_encoder_3=text_encoder_3,
        tokenizer_3=None,
    )

    @torch.no_grad()
    def enc(off):
        ids = _ids(seed, off)
        o1 = text_encoder(ids, output_hidden_states=True)
        o2 = text_encoder_2(ids, output_hidden_states=True)
        clip = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)  # 64
        t5 = _t5_embeds(text_encoder_3, _ids(seed, off + 10))  # 32
        clip = clip[..., : t5.shape[-1]]  # SD3 pads/truncates clip to the T5 width
        pooled = torch.cat([o1.text_embeds, o2.text_embeds], dim=-1)  # 64
        return torch.cat([clip, t5], dim=-2), pooled

    pe, pooled = enc(1)
    ne, npooled = enc(2)
    kwargs = dict(
        prompt_embeds=pe,
        negative_prompt_embeds=ne,
        pooled_prompt_embeds=pooled,
        negative_pooled_prompt_embeds=npooled,
        height=16,
        width=16,
        guidance_scale=5.0,
        output_type="np",
    )
    if skip_layer_guidance:
        # extra call when start*n < i < stop*n: steps 1..3 of 8, 1..4 of 10
        kwargs.update(
            skip_guidance_layers=[0],
            skip_layer_guidance_scale=2.8,
            skip_layer_guidance_start=0.01,
            skip_layer_guidance_stop=0.5,
        )
    return pipe, kwargs


def _build_flux(seed: int, scheduler: str | None, true_cfg: bool = False, guidance_embeds: bool = False):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    transformer = _seeded(
        seed,
        FluxTransformer2DModel,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    )
    text_encoder = _seeded(seed, CLIPTextModel, _clip_text_config())
    text_encoder_2 = _t5(seed + 1)
    vae = _seeded(
        seed,
        AutoencoderKL,
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    default = FlowMatchEulerDiscreteScheduler()
    pipe = FluxPipeline(
        scheduler=_scheduler(default, scheduler),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=None,
        text_encoder_2=text_encoder_2,
        tokenizer_2=None,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )

    @torch.no_grad()
    def enc(off):
        pooled = text_encoder(_ids(seed, off)).pooler_output
        return _t5_embeds(text_encoder_2, _ids(seed, off + 10)), pooled

    pe, pooled = enc(1)
    kwargs = dict(
        prompt_embeds=pe,
        pooled_prompt_embeds=pooled,
        height=16,
        width=16,
        # Used only with guidance_embeds=True (FLUX.1-dev style distilled guidance); otherwise ignored
        # like FLUX.1-schnell.  Flux has no batch CFG: see true_cfg.
        guidance_scale=3.5,
        output_type="np",
    )
    if true_cfg:
        ne, npooled = enc(2)
        kwargs.update(negative_prompt_embeds=ne, negative_pooled_prompt_embeds=npooled, true_cfg_scale=2.0)
    return pipe, kwargs


def _build_cogvideox(seed: int, scheduler: str | None):
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    transformer = _seeded(
        seed,
        CogVideoXTransformer3DModel,
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=1,
        sample_width=2,  # latent 2 -> 16 px
        sample_height=2,
        sample_frames=9,  # latent frames (9 - 1) / 4 + 1 = 3
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
    )
    vae = _seeded(
        seed,
        AutoencoderKLCogVideoX,
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    text_encoder = _t5(seed + 1)
    # CogVideoX-2b scheduler config
    default = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        snr_shift_scale=3.0,
        steps_offset=0,
        timestep_spacing="trailing",
    )
    pipe = CogVideoXPipeline(
        tokenizer=None,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=_scheduler(default, scheduler),
    )
    pe = _t5_embeds(text_encoder, _ids(seed, 1, length=16))
    ne = _t5_embeds(text_encoder, _ids(seed, 2, length=16))
    kwargs = dict(
        prompt_embeds=pe,
        negative_prompt_embeds=ne,
        height=16,
        width=16,
        num_frames=9,  # (9 - 1) / 4 + 1 = 3 latent frames
        guidance_scale=6.0,
        max_sequence_length=16,
        output_type="np",
    )
    return pipe, kwargs


def _build_latte(seed: int, scheduler: str | None):
    from diffusers import DDIMScheduler, LattePipeline, LatteTransformer3DModel

    transformer = _seeded(
        seed,
        LatteTransformer3DModel,
        sample_size=8,
        num_layers=1,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        video_length=2,
    )
    vae = _small_vae(seed, block_out_channels=(8, 8))
    text_encoder = _t5(seed + 1)
    default = DDIMScheduler()
    pipe = LattePipeline(
        tokenizer=None,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=_scheduler(default, scheduler),
    )
    pe = _t5_embeds(text_encoder, _ids(seed, 1))
    ne = _t5_embeds(text_encoder, _ids(seed, 2))
    kwargs = dict(
        prompt_embeds=pe,
        negative_prompt_embeds=ne,
        negative_prompt=None,
        height=16,
        width=16,
        video_length=2,
        guidance_scale=5.0,
        clean_caption=False,
        mask_feature=False,
        output_type="np",
    )
    return pipe, kwargs


def _build_svd(seed: int, scheduler: str | None):
    import transformers
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = _seeded(
        seed,
        UNetSpatioTemporalConditionModel,
        block_out_channels=(32, 32),  # spatio-temporal blocks hard-code 32 norm groups
        layers_per_block=1,
        sample_size=16,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32,
        num_attention_heads=(2, 2),
        projection_class_embeddings_input_dim=24,  # 3 * addition_time_embed_dim
        addition_time_embed_dim=8,
    )
    default = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        trained_betas=None,
        use_karras_sigmas=True,
    )
    vae = _seeded(
        seed,
        AutoencoderKLTemporalDecoder,
        block_out_channels=[32, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        latent_channels=4,
        layers_per_block=1,
    )
    vcfg = CLIPVisionConfig(
        hidden_size=32,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=16,
        intermediate_size=37,
        patch_size=8,
    )
    image_encoder = _seeded(seed, CLIPVisionModelWithProjection, vcfg)
    # The PIL-backend class is what CLIPImageProcessor falls back to without torchvision; naming it
    # directly keeps the preprocessing identical whether or not torchvision is installed.
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", CLIPImageProcessor)
    feature_extractor = processor_cls(crop_size=16, size=16)
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=_scheduler(default, scheduler),
        feature_extractor=feature_extractor,
    )
    g = torch.Generator().manual_seed(seed)
    # A tensor image in [0, 1] is fed to the CLIP encoder without the 224 px resize.
    image = torch.rand((1, 3, 16, 16), generator=g)
    kwargs = dict(
        image=image,
        height=16,
        width=16,
        num_frames=2,
        decode_chunk_size=2,
        min_guidance_scale=1.0,
        max_guidance_scale=2.5,
        output_type="np",
    )
    return pipe, kwargs


def _build_animatediff(seed: int, scheduler: str | None):
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = _seeded(
        seed,
        UNet2DConditionModel,
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    default = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False)
    vae = _small_vae(seed)
    text_encoder = _seeded(seed, CLIPTextModel, _clip_text_config())
    motion_adapter = _seeded(
        seed,
        MotionAdapter,
        block_out_channels=(8, 16),
        motion_layers_per_block=1,
        motion_norm_num_groups=2,
        motion_num_attention_heads=2,
    )
    pipe = AnimateDiffPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=None,
        unet=unet,
        motion_adapter=motion_adapter,
        scheduler=_scheduler(default, scheduler),
        feature_extractor=None,
        image_encoder=None,
    )
    with torch.no_grad():
        pe = text_encoder(_ids(seed, 1))[0]
        ne = text_encoder(_ids(seed, 2))[0]
    kwargs = dict(
        prompt_embeds=pe,
        negative_prompt_embeds=ne,
        height=16,
        width=16,
        num_frames=2,
        guidance_scale=7.5,
        output_type="np",
    )
    return pipe, kwargs


def _build_audioldm2(seed: int, scheduler: str | None):
    from diffusers import (
        AudioLDM2Pipeline,
        AudioLDM2ProjectionModel,
        AudioLDM2UNet2DConditionModel,
        DDIMScheduler,
    )
    from transformers import (
        ClapAudioConfig,
        ClapConfig,
        ClapModel,
        ClapTextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
    )

    unet = _seeded(
        seed,
        AudioLDM2UNet2DConditionModel,
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=([None, 16, 32], [None, 16, 32]),
        norm_num_groups=2,
        attention_head_dim=4,
    )
    default = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    vae = _small_vae(seed, in_channels=1)
    text_branch_config = ClapTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=16,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=2,
        num_hidden_layers=2,
        pad_token_id=1,
        vocab_size=1000,
        projection_dim=16,
    )
    audio_branch_config = ClapAudioConfig(
        spec_size=64,
        window_size=4,
        num_mel_bins=64,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        depths=[2, 2],
        num_attention_heads=[2, 2],
        num_hidden_layers=2,
        hidden_size=192,
        projection_dim=16,
        patch_size=2,
        patch_stride=2,
        patch_embed_input_channels=4,
    )
    clap_config = ClapConfig(
        text_config=text_branch_config.to_dict(), audio_config=audio_branch_config.to_dict(), projection_dim=16
    )
    text_encoder = _seeded(seed, ClapModel, clap_config)
    text_encoder_2 = _t5(seed + 1)
    lm_config = GPT2Config(
        n_embd=16, n_head=2, n_layer=2, vocab_size=1000, n_ctx=99, n_positions=99, bos_token_id=0, eos_token_id=2
    )
    # GPT2LMHeadModel (the pipeline's annotated type): in transformers v5 the bare GPT2Model has no
    # generation helpers, which AudioLDM2Pipeline.generate_language_model relies on.
    language_model = _seeded(seed + 2, GPT2LMHeadModel, lm_config)
    language_model.config.max_new_tokens = 8
    projection_model = _seeded(
        seed + 3, AudioLDM2ProjectionModel, text_encoder_dim=16, text_encoder_1_dim=32, langauge_model_dim=16
    )
    vocoder_config = SpeechT5HifiGanConfig(
        model_in_dim=8,
        sampling_rate=16000,
        upsample_initial_channel=16,
        upsample_rates=[2, 2],
        upsample_kernel_sizes=[4, 4],
        resblock_kernel_sizes=[3, 7],
        resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
        normalize_before=False,
    )
    vocoder = _seeded(seed + 4, SpeechT5HifiGan, vocoder_config)
    pipe = AudioLDM2Pipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        projection_model=projection_model,
        language_model=language_model,
        tokenizer=None,
        tokenizer_2=None,
        feature_extractor=None,
        unet=unet,
        scheduler=_scheduler(default, scheduler),
        vocoder=vocoder,
    )

    @torch.no_grad()
    def enc(off):
        ids = _ids(seed, off)
        mask = torch.ones_like(ids)
        clap = text_encoder.get_text_features(input_ids=ids, attention_mask=mask)
        if hasattr(clap, "pooler_output"):  # transformers v5 returns a model output
            clap = clap.pooler_output
        clap = clap[:, None, :]
        clap_mask = torch.ones(clap.shape[:2], dtype=torch.long)
        t5 = _t5_embeds(text_encoder_2, _ids(seed, off + 10))
        proj = projection_model(hidden_states=clap, hidden_states_1=t5, attention_mask=clap_mask, attention_mask_1=mask)
        gen = pipe.generate_language_model(proj.hidden_states, attention_mask=proj.attention_mask, max_new_tokens=8)
        return t5, mask, gen

    pe, mask, gen = enc(1)
    ne, nmask, ngen = enc(2)
    kwargs = dict(
        prompt_embeds=pe,
        negative_prompt_embeds=ne,
        generated_prompt_embeds=gen,
        negative_generated_prompt_embeds=ngen,
        attention_mask=mask,
        negative_attention_mask=nmask,
        audio_length_in_s=0.016,  # 256 samples -> 64 mel frames -> 32 latent rows
        guidance_scale=3.5,
        output_type="np",
    )
    return pipe, kwargs


_BUILDERS = {
    "sd": _build_sd,
    "sdxl": _build_sdxl,
    "sd3": _build_sd3,
    "flux": _build_flux,
    "cogvideox": _build_cogvideox,
    "latte": _build_latte,
    "svd": _build_svd,
    "animatediff": _build_animatediff,
    "audioldm2": _build_audioldm2,
}


def build(
    family: str,
    seed: int = 0,
    *,
    scheduler: str | None = None,
    true_cfg: bool = False,
    skip_layer_guidance: bool = False,
    guidance_embeds: bool = False,
) -> tuple[DiffusionPipeline, dict]:
    """Return ``(pipe, call_kwargs)`` for a tiny random-weight pipeline of ``family``.

    Deterministic for a given seed.  ``call_kwargs`` has everything needed for
    ``pipe(**call_kwargs, num_inference_steps=..., generator=...)``, with
    ``output_type="np"``, a tiny size, and CFG on where the family supports it.

    ``scheduler``: optional diffusers scheduler class name, built via ``from_config``
    from the family's default scheduler.
    ``true_cfg`` (flux only): add negative embeds and ``true_cfg_scale=2.0``.
    ``skip_layer_guidance`` (sd3 only): 2-layer transformer and ``skip_guidance_layers=[0]``.
    ``guidance_embeds`` (flux only): transformer with a guidance embedding (FLUX.1-dev style).
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if true_cfg and family != "flux":
        raise ValueError("true_cfg is only supported for family 'flux'")
    if skip_layer_guidance and family != "sd3":
        raise ValueError("skip_layer_guidance is only supported for family 'sd3'")
    if guidance_embeds and family != "flux":
        raise ValueError("guidance_embeds is only supported for family 'flux'")
    extra = {}
    if family == "flux":
        extra["true_cfg"] = true_cfg
        extra["guidance_embeds"] = guidance_embeds
    if family == "sd3":
        extra["skip_layer_guidance"] = skip_layer_guidance
    with torch.no_grad():
        pipe, kwargs = _BUILDERS[family](seed, scheduler, **extra)
    pipe.set_progress_bar_config(disable=True)
    if (DEVICE, DTYPE) != (torch.device("cpu"), torch.float32):  # PARASTEP_TEST_DEVICE / _DTYPE
        pipe.to(DEVICE, DTYPE)
        kwargs = {k: _to_test_device(v) for k, v in kwargs.items()}
    return pipe, kwargs


def _to_test_device(value):
    """Call arguments on the test device; floating tensors in the test dtype."""
    if isinstance(value, torch.Tensor):
        return value.to(DEVICE, DTYPE) if value.is_floating_point() else value.to(DEVICE)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_test_device(v) for v in value)
    return value


# Every family with its default scheduler, then the variants; test ids name the variant.
CASES: list[tuple[str, dict]] = [(f, {}) for f in FAMILIES] + VARIANTS
IDS: list[str] = [f + "".join(f"-{v}" if k == "scheduler" else f"-{k}" for k, v in kw.items()) for f, kw in CASES]


def count_forwards(pipe: DiffusionPipeline) -> list[int]:
    """Counts real denoiser forward passes, beneath any strategy attached later."""
    import functools

    import parastep

    denoiser = getattr(pipe, parastep.spec_for(pipe).denoiser)
    counter = [0]
    inner = denoiser.forward

    @functools.wraps(inner)
    def counted(*args, **kwargs):
        counter[0] += 1
        return inner(*args, **kwargs)

    denoiser.forward = counted
    return counter


def save_tiny_sd(root: Path) -> Path:
    """A tiny StableDiffusionPipeline with a byte-level tokenizer, saved as a local model folder."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    pipe, _ = build("sd", seed=0)
    chars = list(bytes_to_unicode().values())  # byte-level BPE with no merges: one token per byte
    tokens = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pipe.register_modules(tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16))
    pipe.save_pretrained(root / "tiny-sd")
    return root / "tiny-sd"
