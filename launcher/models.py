"""Loading pipelines and calling them the same way on every rank."""

from __future__ import annotations

import inspect
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from launcher.request import GenerateRequest, Modality, ModelInfo
from parastep.strategies.sparsetem import supported_parts

log = logging.getLogger(__name__)

BUILTIN_KINDS = ("image", "video", "audio")


@dataclass
class LoadedModel:
    pipe: Any
    info: ModelInfo
    builtin_kind: str | None = None

    def prompt_warnings(self, prompt: str) -> list[str]:
        """What the model will ignore in ``prompt`` (built-in models know a small vocabulary)."""
        if self.builtin_kind is None:
            return []
        import demo_models

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            demo_models.parse_prompt(self.builtin_kind, prompt, warn=True)
        return [str(w.message) for w in caught]


def builtin_name(kind: str) -> str:
    return f"built-in {kind}"


def load_models(builtins: list[str], extra: list[str], device: torch.device) -> dict[str, LoadedModel]:
    """Load the built-in demo models (by kind) and diffusers models from the local HF cache.

    Every rank calls this with the same arguments, so every rank holds the same models.
    """
    models: dict[str, LoadedModel] = {}
    for kind in builtins:
        import demo_models

        pipe = demo_models.load_pipeline(kind)
        name = builtin_name(kind)
        models[name] = LoadedModel(_to_device(pipe, device), describe(name, pipe, kind), kind)
    for ident in extra:
        from diffusers import DiffusionPipeline

        dtype = torch.float16 if device.type == "cuda" else torch.float32
        try:
            pipe = DiffusionPipeline.from_pretrained(ident, local_files_only=True, torch_dtype=dtype)
        except Exception as exc:  # re-raised with what to do about it
            raise SystemExit(
                f"--model {ident!r}: could not load it from a local path or the local Hugging Face cache "
                f"({type(exc).__name__}: {exc}). Download it first, e.g. `huggingface-cli download {ident}`."
            ) from exc
        models[ident] = LoadedModel(_to_device(pipe, device), describe(ident, pipe, None))
    return models


def _to_device(pipe: Any, device: torch.device) -> Any:
    if device.type != "cpu":
        pipe = pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def _call_params(pipe: Any) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(pipe.__call__).parameters)


def _default(params: dict[str, inspect.Parameter], name: str, fallback: Any) -> Any:
    value = params[name].default if name in params else None
    return fallback if value is None or value is inspect.Parameter.empty else value


def describe(name: str, pipe: Any, kind: str | None) -> ModelInfo:
    """Read what the UI needs from a pipeline: modality, defaults, size constraints."""
    params = _call_params(pipe)
    found = kind or getattr(pipe, "modality", None)
    modality: Modality = (
        cast(Modality, found)
        if found in ("image", "video", "audio")
        else "audio"
        if "audio_length_in_s" in params
        else "video"
        if "num_frames" in params
        else "image"
    )
    multiple = getattr(pipe, "size_multiple", None) or getattr(pipe, "vae_scale_factor", None) or 8
    sample_rate = getattr(pipe, "sample_rate", None)
    if sample_rate is None and getattr(pipe, "vocoder", None) is not None:
        sample_rate = getattr(pipe.vocoder.config, "sampling_rate", None)
    denoiser_config = getattr(denoiser_of(pipe), "config", None)
    sample_size = getattr(denoiser_config, "sample_size", None)
    if isinstance(sample_size, int):
        sample_size = (sample_size, sample_size)
    fixed = kind is not None  # the built-in models make one size only: the one they were trained at
    if kind is not None and sample_size is not None:
        default_h, default_w = int(sample_size[0]), int(sample_size[1])
    elif sample_size is not None and modality != "audio":
        default_h, default_w = int(sample_size[0]) * int(multiple), int(sample_size[1]) * int(multiple)
    else:
        default_h = default_w = 512
    default_frames = int(
        getattr(denoiser_config, "num_frames", None) or getattr(pipe, "default_num_frames", None) or 16
    )
    default_duration = 1.0 if kind is not None else 5.0
    examples: tuple[str, ...] = ()
    vocabulary = ""
    if kind is not None:
        import demo_models
        from demo_models import data

        if kind == "audio":
            default_duration = float(data.AUDIO_SECONDS)
        examples = tuple(demo_models.random_prompts(kind, 3))
        vocabulary = demo_models.describe_vocabulary(kind)
    return ModelInfo(
        name=name,
        examples=examples,
        vocabulary=vocabulary,
        modality=modality,
        default_steps=int(_default(params, "num_inference_steps", 30)),
        default_guidance=float(_default(params, "guidance_scale", 7.5)),
        size_multiple=int(multiple),
        default_height=default_h if modality != "audio" else None,
        default_width=default_w if modality != "audio" else None,
        default_frames=default_frames if modality == "video" else None,
        default_duration_s=default_duration if modality == "audio" else None,
        sample_rate=int(sample_rate or 16000) if modality == "audio" else None,
        fixed_size=fixed,
        fps=int(getattr(pipe, "fps", 8)),
        sparsetem_parts=supported_parts(pipe) if modality == "video" else (),
    )


def denoiser_of(pipe: Any) -> torch.nn.Module | None:
    for attr in ("transformer", "unet", "prior", "decoder"):
        module = getattr(pipe, attr, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


StepCallback = Callable[[int, Any], None]


def call_pipeline(
    model: LoadedModel,
    req: GenerateRequest,
    *,
    latent_only: bool,
    on_step: StepCallback | None = None,
    timing: dict[str, float] | None = None,
) -> tuple[Any, float]:
    """Call the pipeline for ``req``; the same arguments on every rank. Returns (output, seconds).

    ``timing``, if given, receives ``denoise_s``: the seconds until the last denoising step
    ended (prompt encoding + denoising, without decoding), where the pipeline has step callbacks.
    """
    pipe, info = model.pipe, model.info
    params = _call_params(pipe)
    kwargs: dict[str, Any] = {
        "prompt": req.prompt,
        "num_inference_steps": req.steps,
        "guidance_scale": req.guidance_scale,
        # A CPU generator draws the same noise on every rank and device.
        "generator": torch.Generator(device="cpu").manual_seed(req.seed),
        "output_type": "latent" if latent_only else "np",
    }
    if req.negative_prompt:
        kwargs["negative_prompt"] = req.negative_prompt
    if info.modality in ("image", "video"):
        kwargs["height"], kwargs["width"] = req.height, req.width
    if info.modality == "video":
        kwargs["num_frames"] = req.num_frames
    if info.modality == "audio":
        kwargs["audio_length_in_s"] = req.duration_s
    start = time.perf_counter()
    if (on_step is not None or timing is not None) and "callback_on_step_end" in params:

        def _callback(_pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if timing is not None:
                timing["denoise_s"] = time.perf_counter() - start
            if on_step is not None:
                on_step(step, tensors.get("latents"))
            return tensors

        kwargs["callback_on_step_end"] = _callback
        kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
    kwargs = {k: v for k, v in kwargs.items() if k in params or "kwargs" in params}
    start = time.perf_counter()
    out = pipe(**kwargs)
    return out, time.perf_counter() - start


def warm_up(models: dict[str, LoadedModel], *, latent_only: bool) -> None:
    """One short local call per model (no collectives), so that first-call costs (lazy
    initialisation, allocator growth) do not land in the first measured request."""
    for name, model in models.items():
        info = model.info
        req = GenerateRequest(
            model=name,
            prompt=info.examples[0] if info.examples else "warm-up",
            steps=2,
            guidance_scale=info.default_guidance,
            seed=0,
            height=info.default_height,
            width=info.default_width,
            num_frames=info.default_frames,
            duration_s=info.default_duration_s,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, seconds = call_pipeline(model, req, latent_only=latent_only)
        log.info("warmed up %s (%.2f s)", name, seconds)


def extract_media(out: Any, modality: str) -> np.ndarray:
    """The first sample of a pipeline output as float numpy: HxWx3, FxHxWx3 or a waveform."""
    for attr in ("images", "frames", "audios"):
        value = getattr(out, attr, None)
        if value is None:
            continue
        first = value[0]
        if isinstance(first, list):  # list of PIL frames
            first = np.stack([np.asarray(f, dtype=np.float32) / 255.0 for f in first])
        elif hasattr(first, "convert"):  # PIL image
            first = np.asarray(first.convert("RGB"), dtype=np.float32) / 255.0
        elif isinstance(first, torch.Tensor):
            first = first.detach().float().cpu().numpy()
        arr = np.asarray(first, dtype=np.float32)
        if modality == "audio":
            arr = arr.reshape(-1) if arr.ndim > 1 and min(arr.shape) == 1 else arr
            return np.clip(arr, -1.0, 1.0)
        return np.clip(arr, 0.0, 1.0)
    raise RuntimeError(f"pipeline output {type(out).__name__} has no images, frames or audios")


def preview_of(model: LoadedModel, latents: Any) -> np.ndarray | None:
    """A cheap preview of the current latents, if the pipeline can make one."""
    decode = getattr(model.pipe, "decode_preview", None)
    if decode is None or latents is None:
        return None
    try:
        return np.asarray(decode(latents), dtype=np.float32)
    except Exception:  # a preview must never break a run
        log.debug("preview failed", exc_info=True)
        return None
