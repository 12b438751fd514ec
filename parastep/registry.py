"""Per-family knowledge as data: where the denoiser lives and what the pipeline makes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UnsupportedPipelineError


@dataclass(frozen=True)
class PipelineSpec:
    denoiser: str  # attribute of the pipeline holding the denoiser module
    modality: str  # "image" | "video" | "audio"
    # denoiser arguments laid out per sample even though their leading dimension is a multiple
    # of the batch (e.g. text embeddings repeated per frame); BatchStep tiles them with the batch
    per_sample: tuple[str, ...] = ()


FAMILIES: dict[str, PipelineSpec] = {
    "StableDiffusionPipeline": PipelineSpec("unet", "image"),
    "StableDiffusionXLPipeline": PipelineSpec("unet", "image"),
    "StableDiffusion3Pipeline": PipelineSpec("transformer", "image"),
    "FluxPipeline": PipelineSpec("transformer", "image"),
    "PixArtAlphaPipeline": PipelineSpec("transformer", "image"),
    "PixArtSigmaPipeline": PipelineSpec("transformer", "image"),
    "CogVideoXPipeline": PipelineSpec("transformer", "video"),
    "LattePipeline": PipelineSpec("transformer", "video"),
    "StableVideoDiffusionPipeline": PipelineSpec("unet", "video"),
    "AnimateDiffPipeline": PipelineSpec("unet", "video", per_sample=("encoder_hidden_states",)),
    "AudioLDMPipeline": PipelineSpec("unet", "audio"),
    "AudioLDM2Pipeline": PipelineSpec("unet", "audio"),
}

# The blocks AsyncDiff cuts into stages, per denoiser class (or a base class): attribute paths of
# the denoiser, "name.*" for every child of a ModuleList. Their order here does not matter: stages
# follow the order in which one forward pass calls them. Everything else in the forward pass
# (embeddings, activations, reshapes) runs on every rank.
_UNET_BLOCKS = ("conv_in", "down_blocks.*", "mid_block", "up_blocks.*", "conv_norm_out", "conv_out")
BLOCKS: dict[str, tuple[str, ...]] = {
    "UNet2DConditionModel": _UNET_BLOCKS,
    "UNetSpatioTemporalConditionModel": _UNET_BLOCKS,
    "UNetMotionModel": _UNET_BLOCKS,
    "AudioLDM2UNet2DConditionModel": _UNET_BLOCKS,
    "SD3Transformer2DModel": ("transformer_blocks.*", "norm_out", "proj_out"),
    "FluxTransformer2DModel": ("transformer_blocks.*", "single_transformer_blocks.*", "norm_out", "proj_out"),
    "CogVideoXTransformer3DModel": ("transformer_blocks.*", "norm_final", "norm_out", "proj_out"),
    "LatteTransformer3DModel": ("transformer_blocks.*", "temporal_transformer_blocks.*", "norm_out", "proj_out"),
    # the built-in demo models (demo_models.models.AttributeUNet)
    "AttributeUNet": ("conv_in", "down.*", "downsample.*", "mid.*", "up.*", "upsample.*", "norm_out", "conv_out"),
}

_DENOISER_ATTRS = ("transformer", "unet")


def blocks_for(denoiser: torch.nn.Module) -> tuple[str, ...] | None:
    """The :data:`BLOCKS` entry of ``denoiser``'s class or a base class, else None."""
    return next((BLOCKS[c.__name__] for c in type(denoiser).__mro__ if c.__name__ in BLOCKS), None)


def spec_for(pipe: object) -> PipelineSpec:
    """The spec of ``pipe``'s family (its class or a base class), else one detected from its parts."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__]
    for attr in _DENOISER_ATTRS:
        if isinstance(getattr(pipe, attr, None), torch.nn.Module):
            return PipelineSpec(attr, getattr(pipe, "modality", "image"))
    raise UnsupportedPipelineError(
        f"{type(pipe).__name__} has no recognisable denoiser: expected a torch.nn.Module at "
        f"pipe.{' or pipe.'.join(_DENOISER_ATTRS)}, or an entry in parastep.registry.FAMILIES "
        f"naming the attribute that holds it"
    )
