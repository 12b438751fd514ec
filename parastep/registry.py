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

_DENOISER_ATTRS = ("transformer", "unet")


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
