"""One generation request, and every rule it must meet, written beside its fields.

The UI and API clients build a :class:`GenerateRequest` from what the user typed;
:meth:`GenerateRequest.validated` checks it against the loaded models before anything runs,
so a bad request never reaches a peer rank, and returns it with the model's defaults filled
in. Nothing else re-checks these rules.

Example::

    req = GenerateRequest(prompt="a red circle", model="built-in image", steps=20)
    req = req.validated(models={"built-in image": info}, ranks=2)   # raises InputError
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

Method = Literal["baseline", "parastep", "batchstep", "asyncdiff", "cfg"]
METHODS: tuple[Method, ...] = ("baseline", "parastep", "batchstep", "asyncdiff", "cfg")
METHOD_LABELS: dict[str, str] = {
    "baseline": "Baseline",
    "parastep": "ParaStep",
    "batchstep": "BatchStep",
    "asyncdiff": "AsyncDiff",
    "cfg": "CFG-parallel",
}
Modality = Literal["image", "video", "audio"]

MAX_PROMPT_CHARS = 400
MAX_STEPS = 200
MAX_SIDE = 2048


class InputError(ValueError):
    """The request cannot run as given; the message says what to change."""


@dataclass(frozen=True)
class ModelInfo:
    """What the UI and validation need to know about a loaded model."""

    name: str
    modality: Modality
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
    sparsetem_parts: tuple[str, ...] = ()  # what SparseTem can accelerate (parastep.strategies.sparsetem)


# -- one rule per field --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Text:
    label: str
    max_chars: int = MAX_PROMPT_CHARS
    required: bool = False

    def parse(self, value: Any) -> str:
        if value is None and not self.required:
            return ""
        if not isinstance(value, str):
            raise InputError(f"{self.label} must be text (got {_show(value)}).")
        text = value.strip()
        if self.required and not text:
            raise InputError(f"{self.label} is empty: type what you want to generate.")
        if len(text) > self.max_chars:
            raise InputError(f"{self.label} is {len(text)} characters long: shorten it to at most {self.max_chars}.")
        return text


@dataclass(frozen=True)
class _Choice:
    label: str
    options: tuple[str, ...] = ()  # empty: the loaded models

    def parse(self, value: Any, options: tuple[str, ...] = ()) -> str:
        options = self.options or options
        key = value.strip().lower() if isinstance(value, str) and self.options else value
        if not isinstance(value, str) or key not in options:
            raise InputError(f"Unknown {self.label.lower()} {_show(value)}: choose one of {', '.join(options)}.")
        return str(key)


@dataclass(frozen=True)
class _Number:
    label: str
    low: float
    high: float
    whole: bool  # an integer
    above_low: bool = False  # low itself is excluded
    unit: str = ""

    def parse(self, value: Any) -> Any:
        kind = "a whole number" if self.whole else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{self.label} must be {kind} (got {_show(value)}).")
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{self.label} must be a finite number (got {value!r}).")
        if self.whole and value != int(value):
            raise InputError(f"{self.label} must be a whole number (got {value!r}).")
        number = value  # compared as given: float() of a huge int would overflow
        if number < self.low or number > self.high or (self.above_low and number == self.low):
            span = f"more than {self.low:g} and at most" if self.above_low else f"between {self.low:g} and"
            high = int(self.high) if self.whole else f"{self.high:g}"
            raise InputError(f"{self.label} must be {span} {high}{self.unit} (got {_show(number)}).")
        return int(number) if self.whole else float(number)


@dataclass(frozen=True)
class _Flag:
    label: str

    def parse(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise InputError(f"{self.label} must be true or false (got {_show(value)}).")
        return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _rule(rule: Any, default: Any) -> Any:
    return field(default=default, metadata={"rule": rule})


# -- the request ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerateRequest:
    """One generation, exactly as the user asked for it. ``None``: the model's default."""

    prompt: str = _rule(_Text("The prompt", required=True), "")
    model: str = _rule(_Choice("Model"), "")
    negative_prompt: str = _rule(_Text("The negative prompt"), "")
    method: str = _rule(_Choice("Method", METHODS), "parastep")
    warmup_steps: int = _rule(_Number("Warm-up", 0, MAX_STEPS, whole=True), 2)
    stride: int = _rule(_Number("Stride", 1, MAX_STEPS, whole=True), 2)
    steps: int | None = _rule(_Number("Steps", 1, MAX_STEPS, whole=True), None)
    guidance_scale: float | None = _rule(_Number("Guidance", 0.0, 30.0, whole=False), None)
    seed: int = _rule(_Number("Seed", 0, 2**32 - 1, whole=True), 0)
    height: int | None = _rule(_Number("Height", 1, MAX_SIDE, whole=True), None)
    width: int | None = _rule(_Number("Width", 1, MAX_SIDE, whole=True), None)
    num_frames: int | None = _rule(_Number("Frames", 1, 256, whole=True), None)
    duration_s: float | None = _rule(_Number("Duration", 0.0, 60.0, whole=False, above_low=True, unit=" s"), None)
    sparsetem: bool = _rule(_Flag("SparseTem"), False)

    def validated(self, models: Mapping[str, ModelInfo], ranks: int, compare: bool = False) -> GenerateRequest:
        """This request with every field checked and the model's defaults filled in.

        Raises :class:`InputError` naming the field and what it accepts."""
        values: dict[str, Any] = {}
        for f in fields(self):
            value, rule = getattr(self, f.name), f.metadata["rule"]
            if value is None and f.default is None:
                values[f.name] = None
            elif isinstance(rule, _Choice):
                values[f.name] = rule.parse(value, tuple(models))
            else:
                values[f.name] = rule.parse(value)
        req = replace(self, **values)
        info = models[req.model]
        return req._with_model(info)._check_method(ranks, compare, info)

    def _with_model(self, info: ModelInfo) -> GenerateRequest:
        """The model's defaults for what was left out, and its size rules."""
        height = width = frames = duration = None
        if info.modality in ("image", "video"):
            height = self.height if self.height is not None else info.default_height
            width = self.width if self.width is not None else info.default_width
            if info.fixed_size and (height, width) != (info.default_height, info.default_width):
                raise InputError(
                    f"{info.name} makes {info.default_height}×{info.default_width} only: set height to "
                    f"{info.default_height} and width to {info.default_width} (got {height}×{width})."
                )
            m = info.size_multiple
            for name, side in (("Height", height), ("Width", width)):
                if side is None or side < m:
                    raise InputError(f"{name} must be between {m} and {MAX_SIDE} (got {side}).")
                if side % m:
                    lower, upper = side // m * m, (side // m + 1) * m
                    raise InputError(
                        f"{name} {side} is not a multiple of {m}, which {info.name} needs: "
                        f"use {lower or upper} or {upper}."
                    )
        if info.modality == "video":
            frames = self.num_frames if self.num_frames is not None else info.default_frames
            if info.fixed_size and frames != info.default_frames:
                raise InputError(
                    f"{info.name} makes {info.default_frames} frames only: set frames to {info.default_frames} "
                    f"(got {frames})."
                )
        if info.modality == "audio":
            duration = self.duration_s if self.duration_s is not None else info.default_duration_s
            if info.fixed_size and abs((duration or 0) - (info.default_duration_s or 0)) > 1e-6:
                raise InputError(
                    f"{info.name} makes {info.default_duration_s:g} s clips only: set duration to "
                    f"{info.default_duration_s:g} (got {duration:g})."
                )
        return replace(
            self,
            steps=self.steps if self.steps is not None else info.default_steps,
            guidance_scale=self.guidance_scale if self.guidance_scale is not None else info.default_guidance,
            height=height,
            width=width,
            num_frames=frames,
            duration_s=duration,
        )

    def _check_method(self, ranks: int, compare: bool, info: ModelInfo) -> GenerateRequest:
        """The method's rules: they read steps, warm-up, stride, guidance and SparseTem together."""
        method, steps, warmup, stride = self.method, self.steps or 0, self.warmup_steps, self.stride
        label = METHOD_LABELS[method]
        if compare and method == "baseline" and not self.sparsetem:
            raise InputError(
                "Compare runs the baseline against another method: pick ParaStep, BatchStep, AsyncDiff or "
                "CFG-parallel (or turn on SparseTem to compare it alone against the dense baseline)."
            )
        if method not in ("baseline", "cfg") and warmup >= steps:
            raise InputError(f"Warm-up ({warmup}) must be smaller than steps ({steps}): lower warm-up or raise steps.")
        if method in ("parastep", "asyncdiff", "cfg") and ranks < 2:
            raise InputError(
                f"{label} needs at least 2 ranks and this app runs {ranks}: start it with --ranks 2 (CPU) "
                "or on 2+ GPUs."
            )
        if method == "parastep" and warmup < 1:
            raise InputError(
                "ParaStep needs at least 1 warm-up step: peers reuse the prediction cached during warm-up."
            )
        if method == "asyncdiff" and warmup < 1:
            raise InputError(
                "AsyncDiff needs at least 1 warm-up step: its stages start from the activations of the step before."
            )
        if method == "cfg" and (self.guidance_scale or 0) <= 1:
            raise InputError(
                f"CFG-parallel splits the guidance batch between 2 ranks, and at guidance {self.guidance_scale:g} "
                "there is none: raise guidance above 1."
            )
        if self.sparsetem:
            if not info.sparsetem_parts:
                raise InputError(
                    f"SparseTem skips what does not change between video frames, and {info.name} has no "
                    "frame-by-frame part it can accelerate: turn SparseTem off."
                )
            if method in ("asyncdiff", "cfg"):
                raise InputError(
                    f"SparseTem runs alone (method Baseline) or with ParaStep or BatchStep, not with {label}: "
                    "pick one of those or turn SparseTem off."
                )
        if method == "batchstep":
            if warmup < 1:
                raise InputError(
                    "BatchStep needs at least 1 warm-up step: look-ahead steps roll forward with the prediction "
                    "of the step before."
                )
            if stride < 2:
                raise InputError(f"Stride must be at least 2 (got {stride}); stride 1 is the baseline.")
            if stride > steps:
                raise InputError(f"Stride ({stride}) cannot exceed steps ({steps}): lower stride or raise steps.")
        return self

    # -- on the wire (JSON) ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerateRequest:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise InputError(f"Unknown request field(s): {', '.join(sorted(unknown))}.")
        return cls(**data)
