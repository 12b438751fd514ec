"""A toy denoiser and a classic diffusers loop around it: outputs are exact functions of inputs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.utils import BaseOutput

# Where the suite's single-process tests run: PARASTEP_TEST_DEVICE=cuda PARASTEP_TEST_DTYPE=float16
# (scripts/gpu_check.sh sets both); the defaults, CPU and float32, change nothing.
DEVICE = torch.device(os.environ.get("PARASTEP_TEST_DEVICE", "cpu"))
DTYPE: torch.dtype = getattr(torch, os.environ.get("PARASTEP_TEST_DTYPE", "float32"))
if DEVICE.type == "cuda":  # bit-identity asks for the same kernels every call
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class ToyOutput(BaseOutput):
    sample: torch.Tensor


class ToyDenoiser(torch.nn.Module):
    """tanh(conv(x)) scaled by the timestep, plus the mean of the text embedding."""

    def __init__(self, channels: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.forward_calls = 0

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict: bool = True):
        self.forward_calls += 1
        t = torch.as_tensor(timestep, dtype=sample.dtype, device=sample.device).reshape(-1, 1, 1, 1)
        cond = encoder_hidden_states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        out = torch.tanh(self.conv(sample)) * (t / 1000 + 0.1) + cond
        return ToyOutput(sample=out) if return_dict else (out,)


class ToyPipeline(DiffusionPipeline):
    def __init__(self, unet: ToyDenoiser, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        prompt_embeds,
        negative_prompt_embeds=None,
        num_inference_steps: int = 10,
        guidance_scale: float = 3.0,
        generator=None,
        size: int = 8,
        output_type: str = "pt",
    ):
        weight = next(self.unet.parameters())  # the denoiser's device and dtype: inputs follow it
        prompt_embeds = prompt_embeds.to(weight.device, weight.dtype)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(weight.device, weight.dtype)
        batch = prompt_embeds.shape[0]
        latents = torch.randn((batch, 4, size, size), generator=generator).to(weight.device, weight.dtype)
        cfg = negative_prompt_embeds is not None and guidance_scale > 1
        embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if cfg else prompt_embeds
        self.scheduler.set_timesteps(num_inference_steps)
        latents = latents * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise = self.unet(model_input, t, encoder_hidden_states=embeds).sample
            if cfg:
                uncond, text = noise.chunk(2)
                noise = uncond + guidance_scale * (text - uncond)
            latents = self.scheduler.step(noise, t, latents, return_dict=False)[0]
        return latents if output_type == "latent" else latents.clamp(-1, 1)


def toy_pipeline(scheduler_cls=DDIMScheduler) -> ToyPipeline:
    scheduler = scheduler_cls(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    return ToyPipeline(ToyDenoiser().to(DEVICE, DTYPE), scheduler)


def toy_embeds(batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pe, ne = torch.randn(batch, 3, 8, generator=g), torch.randn(batch, 3, 8, generator=g) * 0.1
    return pe.to(DEVICE, DTYPE), ne.to(DEVICE, DTYPE)
