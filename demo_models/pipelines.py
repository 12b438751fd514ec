"""Diffusers pipelines of the built-in demo models (shapes image, moving-shapes video, tones audio).

Each pipeline runs the classic diffusers loop (optional classifier-free guidance batch,
``scheduler.scale_model_input``, ``self.unet(...)``, guidance, ``scheduler.step``), so
step-level accelerators attach to ``pipe.unet`` and ``pipe.scheduler`` unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.schedulers import DDIMScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from . import data
from .models import AttributeUNet
from .vocab import encode_prompt

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 50
# Classifier-free guidance scale per model: the one that measured best on 100 held-out prompts
# (`python -m demo_models.evaluate <kind> --guidance 1,2,3,4,5`; figures in assets/<kind>/README.md).
DEFAULT_GUIDANCE = {"image": 2.0, "video": 3.0, "audio": 2.0}


@dataclass
class ShapesImageOutput(BaseOutput):
    """``images``: list of PIL images, or an N×H×W×3 float array in [0, 1]; latents for "latent"."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


@dataclass
class ShapesVideoOutput(BaseOutput):
    """``frames``: N×F×H×W×3 float array in [0, 1] (latents for ``output_type="latent"``)."""

    frames: np.ndarray | torch.Tensor


@dataclass
class TonesAudioOutput(BaseOutput):
    """``audios``: N×samples float array in [-1, 1] at 16 kHz (latents for "latent")."""

    audios: np.ndarray | torch.Tensor


class _AttributeDiffusionPipeline(DiffusionPipeline):
    """Shared loop; subclasses define the latent shape and the decoding."""

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]
    modality: str = ""

    def __init__(self, unet: AttributeUNet, scheduler: DDIMScheduler) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    # -- subclass hooks -------------------------------------------------------------------
    def _latent_shape(self, batch: int, **size: Any) -> tuple[int, ...]:
        raise NotImplementedError

    def _decode(self, latents: torch.Tensor, output_type: str) -> Any:
        raise NotImplementedError

    def _wrap(self, decoded: Any) -> BaseOutput:
        raise NotImplementedError

    def _initial_noise(
        self, shape: tuple[int, ...], generator: Any, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    # -- shared ---------------------------------------------------------------------------
    def _labels(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        return torch.tensor([encode_prompt(self.modality, p) for p in prompts], dtype=torch.long, device=device)

    @torch.no_grad()
    def _run(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None,
        num_inference_steps: int,
        guidance_scale: float,
        generator: torch.Generator | list[torch.Generator] | None,
        output_type: str,
        callback_on_step_end: Callable[..., dict[str, Any]] | None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] | list[str],
        return_dict: bool,
        latents: torch.Tensor | None,
        num_images_per_prompt: int,
        size: dict[str, Any],
    ) -> Any:
        if output_type not in ("np", "pil", "pt", "latent"):
            raise ValueError(f"output_type must be 'np', 'pil', 'pt' or 'latent', got {output_type!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        for name in callback_on_step_end_tensor_inputs:
            if name not in self._callback_tensor_inputs:
                raise ValueError(
                    f"callback_on_step_end_tensor_inputs may only hold {self._callback_tensor_inputs}, got {name!r}"
                )
        prompts = [prompt] if isinstance(prompt, str) or prompt is None else list(prompt)
        prompts = [p or "" for p in prompts for _ in range(num_images_per_prompt)]
        batch = len(prompts)
        if negative_prompt is None:
            negatives = [""] * batch
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * batch
        else:
            negatives = [n or "" for n in negative_prompt for _ in range(num_images_per_prompt)]
            if len(negatives) != batch:
                raise ValueError(f"negative_prompt has {len(negative_prompt)} entries for {len(prompts)} prompts")
        device = self._execution_device
        dtype = self.unet.dtype
        do_cfg = guidance_scale > 1.0
        cond = self._labels(prompts, device)
        if do_cfg:
            cond = torch.cat([self._labels(negatives, device), cond])

        shape = self._latent_shape(batch, **size)
        if latents is None:
            latents = self._initial_noise(shape, generator, device, dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        latents = latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                model_input = torch.cat([latents] * 2) if do_cfg else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                noise_pred = self.unet(model_input, t, class_labels=cond, return_dict=False)[0]
                if do_cfg:
                    noise_uncond, noise_cond = noise_pred.chunk(2)
                    noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, generator=generator).prev_sample
                if callback_on_step_end is not None:
                    local = {"latents": latents}
                    callback_kwargs = {k: local[k] for k in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = outputs.get("latents", latents)
                progress.update()

        if output_type == "latent":
            decoded: Any = latents
        else:
            decoded = self._decode(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (decoded,)
        return self._wrap(decoded)

    def decode_preview(self, latents: torch.Tensor) -> np.ndarray:
        """Cheap preview of (possibly noisy) latents as a float array in [0, 1]."""
        raise NotImplementedError

    @staticmethod
    def _to_unit(latents: torch.Tensor) -> torch.Tensor:
        return ((latents.float().clamp(-1, 1) + 1) / 2).cpu()


class ShapesImagePipeline(_AttributeDiffusionPipeline):
    """Coloured shapes at 32×32. Example:

    >>> pipe = load_pipeline("image")  # doctest: +SKIP
    >>> pipe("a large red circle in the center on a blue background").images[0]  # doctest: +SKIP
    """

    modality = "image"

    def _latent_shape(
        self, batch: int, height: int | None = None, width: int | None = None, **_: Any
    ) -> tuple[int, ...]:
        h0, w0 = self.unet.config.sample_size
        height, width = height or h0, width or w0
        if (height, width) != (h0, w0):
            raise ValueError(f"The built-in image model generates {h0}×{w0} only; got height={height}, width={width}.")
        return (batch, self.unet.config.in_channels, height, width)

    def _decode(self, latents: torch.Tensor, output_type: str) -> Any:
        images = self._to_unit(latents).permute(0, 2, 3, 1)
        if output_type == "pt":
            return images
        array = images.numpy()
        if output_type == "pil":
            return [PIL.Image.fromarray((im * 255).round().astype(np.uint8)) for im in array]
        return array

    def _wrap(self, decoded: Any) -> ShapesImageOutput:
        return ShapesImageOutput(images=decoded)

    def decode_preview(self, latents: torch.Tensor) -> np.ndarray:
        """N×H×W×3 float array in [0, 1]."""
        return self._to_unit(latents).permute(0, 2, 3, 1).numpy()

    def __call__(
        self,
        prompt: str | list[str] = "",
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE["image"],
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] | list[str] = ("latents",),
        return_dict: bool = True,
        height: int | None = None,
        width: int | None = None,
        latents: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
    ) -> ShapesImageOutput | tuple:
        """Generate images; ``output_type`` is "np" (N×H×W×3 in [0, 1]), "pil", "pt" or "latent"."""
        return self._run(
            prompt,
            negative_prompt,
            num_inference_steps,
            guidance_scale,
            generator,
            output_type,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            return_dict,
            latents,
            num_images_per_prompt,
            {"height": height, "width": width},
        )


class ShapesVideoPipeline(_AttributeDiffusionPipeline):
    """Shapes moving right/left/up/down, 8 frames of 32×32; latents are (N, 3, F, H, W)."""

    modality = "video"
    fps = 8

    def _latent_shape(
        self,
        batch: int,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        **_: Any,
    ) -> tuple[int, ...]:
        cfg = self.unet.config
        h0, w0 = cfg.sample_size
        f0 = cfg.num_frames
        num_frames, height, width = num_frames or f0, height or h0, width or w0
        if (num_frames, height, width) != (f0, h0, w0):
            raise ValueError(
                f"The built-in video model generates {f0} frames of {h0}×{w0} only; "
                f"got num_frames={num_frames}, height={height}, width={width}."
            )
        return (batch, cfg.in_channels, num_frames, height, width)

    def _initial_noise(
        self, shape: tuple[int, ...], generator: Any, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        # One noise image for all frames: the denoiser works frame by frame, and shared noise
        # keeps what the prompt leaves open (colour, shape, offset) the same in every frame.
        b, c, f, h, w = shape
        return randn_tensor((b, c, 1, h, w), generator=generator, device=device, dtype=dtype).expand(shape).contiguous()

    def _decode(self, latents: torch.Tensor, output_type: str) -> Any:
        frames = self._to_unit(latents).permute(0, 2, 3, 4, 1)
        return frames if output_type == "pt" else frames.numpy()

    def _wrap(self, decoded: Any) -> ShapesVideoOutput:
        return ShapesVideoOutput(frames=decoded)

    def decode_preview(self, latents: torch.Tensor) -> np.ndarray:
        """N×F×H×W×3 float array in [0, 1]."""
        return self._to_unit(latents).permute(0, 2, 3, 4, 1).numpy()

    def __call__(
        self,
        prompt: str | list[str] = "",
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE["video"],
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] | list[str] = ("latents",),
        return_dict: bool = True,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        latents: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
    ) -> ShapesVideoOutput | tuple:
        """Generate videos; ``.frames`` is N×F×H×W×3 in [0, 1] ("pt": a tensor, "latent": latents)."""
        return self._run(
            prompt,
            negative_prompt,
            num_inference_steps,
            guidance_scale,
            generator,
            output_type,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            return_dict,
            latents,
            num_images_per_prompt,
            {"num_frames": num_frames, "height": height, "width": width},
        )


class TonesAudioPipeline(_AttributeDiffusionPipeline):
    """Synth tones, 1 s at 16 kHz, generated as a 64×64 log-mel spectrogram and inverted by
    non-negative least squares on the mel filter bank (30 multiplicative updates) and librosa's
    fast Griffin-Lim (16 iterations, momentum 0.99, fixed phase seed: the same latents give the
    same waveform bit for bit)."""

    modality = "audio"
    sample_rate = data.SAMPLE_RATE
    griffin_lim_iters = data.GRIFFIN_LIM_ITERS

    def _latent_shape(self, batch: int, audio_length_in_s: float | None = None, **_: Any) -> tuple[int, ...]:
        length = data.AUDIO_SECONDS if audio_length_in_s is None else float(audio_length_in_s)
        if abs(length - data.AUDIO_SECONDS) > 1e-6:
            raise ValueError(
                f"The built-in audio model generates {data.AUDIO_SECONDS:g} s clips only; "
                f"got audio_length_in_s={audio_length_in_s}."
            )
        n_mels, n_frames = self.unet.config.sample_size
        return (batch, self.unet.config.in_channels, n_mels, n_frames)

    def _decode(self, latents: torch.Tensor, output_type: str) -> Any:
        mels = latents.float().cpu().numpy()[:, 0]
        audios = np.stack([data.mel_to_audio(m, n_iter=self.griffin_lim_iters) for m in mels])
        return torch.from_numpy(audios) if output_type == "pt" else audios

    def _wrap(self, decoded: Any) -> TonesAudioOutput:
        return TonesAudioOutput(audios=decoded)

    def decode_preview(self, latents: torch.Tensor) -> np.ndarray:
        """The mel spectrogram as an N×mels×frames×3 grey image in [0, 1], low pitch at the bottom."""
        mel = self._to_unit(latents)[:, 0].flip(1)
        return mel[..., None].expand(*mel.shape, 3).numpy()

    def __call__(
        self,
        prompt: str | list[str] = "",
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE["audio"],
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] | list[str] = ("latents",),
        return_dict: bool = True,
        audio_length_in_s: float | None = None,
        latents: torch.Tensor | None = None,
        num_waveforms_per_prompt: int = 1,
    ) -> TonesAudioOutput | tuple:
        """Generate tones; ``.audios`` is N×16000 in [-1, 1] at 16 kHz ("latent": the mel latents)."""
        return self._run(
            prompt,
            negative_prompt,
            num_inference_steps,
            guidance_scale,
            generator,
            output_type,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            return_dict,
            latents,
            num_waveforms_per_prompt,
            {"audio_length_in_s": audio_length_in_s},
        )


PIPELINE_CLASSES: dict[str, type[_AttributeDiffusionPipeline]] = {
    "image": ShapesImagePipeline,
    "video": ShapesVideoPipeline,
    "audio": TonesAudioPipeline,
}
