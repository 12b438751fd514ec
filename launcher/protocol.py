"""Typed, picklable messages between the UI, rank 0's coordinator and the peer ranks.

The UI builds a :class:`GenerateRequest`; the coordinator validates it, runs it, and
streams :class:`Progress` events followed by one :class:`RunOutput` (or a
:class:`CompareOutput` for compare mode). Peers only ever see :class:`PeerRun`,
:class:`Regroup` and :class:`Shutdown`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Method = Literal["baseline", "parastep", "batchstep"]
METHODS: tuple[str, ...] = ("baseline", "parastep", "batchstep")
METHOD_LABELS: dict[str, str] = {"baseline": "Baseline", "parastep": "ParaStep", "batchstep": "BatchStep"}
Modality = Literal["image", "video", "audio"]


class InputError(ValueError):
    """The request cannot run as given; the message says what to change."""


class RunError(RuntimeError):
    """The request was valid but failed (e.g. a peer died); the message names the rank."""


@dataclass(frozen=True)
class GenerateRequest:
    """One generation, exactly as the user asked for it (validated by the coordinator)."""

    model: str
    prompt: str
    negative_prompt: str = ""
    method: str = "parastep"
    steps: int = 10
    warmup_steps: int = 2
    stride: int = 2
    guidance_scale: float = 3.0
    seed: int = 0
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    duration_s: float | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What the UI needs to know about a loaded model."""

    name: str
    modality: str
    default_steps: int = 10
    default_guidance: float = 3.0
    size_multiple: int = 8
    default_height: int | None = None
    default_width: int | None = None
    default_frames: int | None = None
    default_duration_s: float | None = None
    sample_rate: int | None = None
    fixed_size: bool = False  # only the defaults (size, frames, duration) are accepted
    fps: int = 8
    examples: tuple[str, ...] = ()
    vocabulary: str = ""  # what a built-in model understands, for the prompt's help text


@dataclass(frozen=True)
class Progress:
    """A denoising step finished on rank 0 (``preview`` is an HxWx3 float image or None)."""

    label: str
    step: int
    total: int
    preview: np.ndarray | None = None


@dataclass
class RunOutput:
    """One finished pipeline call: the decoded media and the stats of every rank."""

    method: str
    modality: str
    media: np.ndarray
    sample_rate: int | None
    wall_s: float
    stats: list[dict[str, Any]] = field(default_factory=list)  # one per rank, rank 0 first
    ideal_speedup: float = 1.0
    note: str = ""
    fps: int = 8
    denoise_s: float | None = None  # until the last denoising step ended (no decoding)


@dataclass
class CompareOutput:
    baseline: RunOutput
    method: RunOutput
    speedup: float
    speedup_denoise: float | None
    psnr: float
    ssim: float


# ---- rank 0 -> peers (through the control store) ----------------------------------


@dataclass(frozen=True)
class Regroup:
    """Members build a fresh ParaStep process group (generation ``gen``)."""

    gen: int
    members: tuple[int, ...]
    timeout_s: float


@dataclass(frozen=True)
class PeerRun:
    """Members of group ``gen`` run ``request`` with ParaStep and report their stats."""

    run_id: int
    gen: int
    members: tuple[int, ...]
    request: GenerateRequest
    timeout_s: float


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass
class PeerReport:
    """What a peer writes back after a :class:`PeerRun`."""

    rank: int
    run_id: int
    ok: bool
    error: str = ""
    stats: dict[str, Any] | None = None
