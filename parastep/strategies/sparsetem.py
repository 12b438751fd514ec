"""SparseTem: per-frame convolutional work computed only where a frame differs from the previous one.

Consecutive video frames differ little, so (after SparseTem's "Diff Computation") every linear
layer of a per-frame network computes a frame's output as the previous frame's output plus the layer
applied to the change of its input: ``y_f = y_{f-1} + W * (x_f - x_{f-1})``, the bias once.

Per layer (``nn.Conv2d``, ``nn.Linear``; each gets a per-instance hook), the output is cut into
tiles; a tile's input window is the tile plus its halo (the receptive-field margin). The first frame
of a clip is computed densely. For the following frames, the largest change of each window from one
frame to the next is found in one pass over the clip, and summed per tile since the frame the tile
was last computed at: a bound on how far its input has moved since. Where the bound exceeds the
layer's threshold (relative to the RMS of the clip's first input frame), the tile is computed from
the change of its window since then -- the changed windows of every frame are gathered into one
batch, convolved once without bias, scattered, and summed over frames -- and every other tile keeps
its previous output. A skipped change is not lost: it is part of the tile's next change, so the
error of a tile stays within its threshold instead of adding up over frames. A frame with more than
``dense_above`` of its tiles changed is computed densely.

Non-linear layers: the elementwise ones (SiLU, additions, FiLM) run in the model's own code on whole
maps, which on a CPU costs less than gathering their changed tiles. Normalisation over the whole frame
(GroupNorm) and attention are not local, so they are recomputed densely on every frame -- their
exact output feeds the next linear layer, whose threshold decides what of the change is worth
computing -- and the stats list them as such.

Schedule: the frames of a clip pass through the network together, layer by layer, so a layer holds
the clip's change map and the gathered windows while it runs and nothing after it returns -- no cache
of every intermediate map. A VAE decoding a clip in several chunks is a stream: there each layer keeps
the previous chunk's last frame (its input and output), and computes every change of a chunk's last
frame so that nothing skipped is left behind.

Error control: every ``audit_every``-th call of a layer also computes densely the frame with the most
skipped change and measures the relative L2 error of its output. Above ``error_target`` the call is
recomputed densely and the threshold halved; above half of it the threshold shrinks by 0.8, below a
quarter it grows by 1.25. ``verify=True`` measures every frame of every call (for tests and
measurements).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

from ..errors import ConfigError, ParaStepError, UnsupportedPipelineError
from ..registry import spec_for
from .base import Action, CallState, DenoiserCall, Strategy, StrategyConfig, Target, check_int

logger = logging.getLogger(__name__)

HOOK_NAME = "parastep_sparsetem"
PARTS = ("auto", "denoiser", "vae", "both")

# Denoisers that run every frame through the same 2-D network on its own: class name -> the
# dimension of the (B, C, F, H, W) sample that holds the frames. They flatten the frames into the
# batch clip by clip (index = clip * F + frame).
PER_FRAME_DENOISERS: dict[str, int] = {"AttributeUNet": 2}
# VAEs whose decoder is a 2-D network, so a video pipeline can only decode with it frame by frame.
PER_FRAME_VAES: tuple[str, ...] = ("AutoencoderKL",)

_NON_LOCAL_NORMS = (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_MIN_THRESHOLD, _MAX_THRESHOLD = 1e-4, 8.0


@dataclass(frozen=True)
class SparseTemConfig(StrategyConfig):
    """Compute each video frame only where it differs from the previous one.

    Example::

        handle = parastep.apply(pipe, parastep.SparseTemConfig(error_target=0.02))
        frames = pipe("a red circle moving right").frames
        print(parastep.SparseTemStats.of(handle).skipped_work)

    ``parts``: what to accelerate -- ``"denoiser"`` (a per-frame denoiser such as the built-in
    video model's), ``"vae"`` (a 2-D VAE decoding a video frame by frame: AnimateDiff, Latte),
    ``"both"``, or ``"auto"`` (whatever of these the pipeline has).

    ``threshold``: the initial relative threshold -- a tile is computed when its input window may
    have changed by more than ``threshold`` times the RMS of the layer's input on the clip's first
    frame since the tile was last computed. ``error_target``: the relative L2 error of a layer's
    output (against the same layer computed densely on the same input) that the thresholds adapt to
    (``adaptive``): on every ``audit_every``-th call of a layer the frame with the most skipped change
    is computed densely too; above the target the call is recomputed densely. Other frames are not
    measured (``verify=True`` measures them; on the built-in video model at 50 steps, 16 clips per
    guidance scale, every layer's output on every frame stayed within 1.35 times the target
    unguided, 0.67 times it at guidance 3, the model's default, and 0.75 times it at guidance 4).

    ``tile``: output tile side in pixels. A frame with more than ``dense_above`` of its tiles changed
    is computed densely; a layer that computed every later frame of a call densely runs densely for
    its next ``retry_every - 1`` calls, then tries again (and rests twice as long each time it again
    finds nothing, up to 16x). Layers doing fewer than ``min_macs``
    multiply-adds per frame run densely (cheaper than their bookkeeping). ``warmup_steps``: denoising
    steps computed densely before diff computation starts.
    """

    method: ClassVar[str] = "sparsetem"
    parts: Literal["auto", "denoiser", "vae", "both"] = "auto"
    threshold: float = 0.05
    error_target: float = 0.02
    adaptive: bool = True
    audit_every: int = 1
    tile: int = 4
    dense_above: float = 0.3
    retry_every: int = 4
    min_macs: int = 100_000
    verify: bool = False
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.parts not in PARTS:
            raise ConfigError(f"parts must be one of {', '.join(PARTS)}; got {self.parts!r}")
        if not (isinstance(self.threshold, (int, float)) and 0 <= self.threshold <= _MAX_THRESHOLD):
            raise ConfigError(f"threshold must be a number in [0, {_MAX_THRESHOLD:g}], got {self.threshold!r}")
        if not (isinstance(self.error_target, (int, float)) and self.error_target > 0):
            raise ConfigError(f"error_target must be a relative error > 0 (e.g. 0.02), got {self.error_target!r}")
        if not (isinstance(self.dense_above, (int, float)) and 0 < self.dense_above <= 1):
            raise ConfigError(f"dense_above must be a fraction in (0, 1], got {self.dense_above!r}")
        check_int("audit_every", self.audit_every, 0)
        check_int("tile", self.tile, 1)
        check_int("retry_every", self.retry_every, 1)
        check_int("min_macs", self.min_macs, 0)
        check_int("warmup_steps", self.warmup_steps, 0)
        if self.adaptive and self.audit_every == 0:
            raise ConfigError("adaptive thresholds need audits: set audit_every >= 1, or adaptive=False")

    def build(self, target: Target, group: Any) -> SparseTem:
        return SparseTem(self, _resolve_parts(self.parts, target), getattr(target.pipe, "vae", None))


# -- stats ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerStats:
    """One layer during the last pipeline call (its decoding included).

    ``mode`` is ``"diff"``, or ``"dense: <why>"`` for a layer computed densely on every frame.
    ``tiles`` counts the output tiles of the frames after a clip's first, ``skipped`` those reused
    from the previous frame. ``error`` is the largest relative L2 error measured on an audited frame
    (``None``: never audited), ``verified_error`` the largest over every frame (``verify=True``).
    """

    name: str
    kind: str
    mode: str
    calls: int = 0
    frames: int = 0
    first_frames: int = 0
    dense_frames: int = 0
    tiles: int = 0
    skipped: int = 0
    macs: int = 0
    macs_skipped: int = 0
    seconds: float = 0.0
    threshold: float = 0.0
    audits: int = 0
    error: float | None = None
    fallbacks: int = 0
    verified_error: float | None = None

    @property
    def skipped_fraction(self) -> float:
        """Of the tiles of the frames after a clip's first, the fraction reused."""
        return self.skipped / self.tiles if self.tiles else 0.0


@dataclass(frozen=True)
class SparseTemStats:
    """Per-layer skipped fraction, time and error of the last pipeline call; travels as JSON.

    Example::

        stats = parastep.SparseTemStats.of(handle)
        stats.skipped_work, stats.max_error, [(l.name, l.skipped_fraction) for l in stats.layers]
    """

    parts: tuple[str, ...]
    error_target: float
    layers: tuple[LayerStats, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(self.parts))
        object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def skipped_work(self) -> float:
        """Of the multiply-adds of the diff layers over every frame, the fraction skipped."""
        total = sum(layer.macs for layer in self.layers)
        return sum(layer.macs_skipped for layer in self.layers) / total if total else 0.0

    @property
    def seconds(self) -> float:
        return sum(layer.seconds for layer in self.layers)

    @property
    def max_error(self) -> float | None:
        errors = [layer.error for layer in self.layers if layer.error is not None]
        return max(errors) if errors else None

    @classmethod
    def of(cls, handle: Any) -> SparseTemStats:
        """The stats of the SparseTem strategy attached by ``handle`` (a :class:`parastep.Handle`)."""
        for strategy in getattr(handle, "strategies", ()):
            if isinstance(strategy, SparseTem):
                return strategy.stats
        raise ParaStepError("no SparseTem strategy is attached by this handle; apply a SparseTemConfig")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparseTemStats:
        fields = dict(data)
        layers = tuple(LayerStats(**layer) for layer in fields.pop("layers", ()))
        return cls(**fields, layers=layers)


# -- which parts of a pipeline qualify -----------------------------------------------------------
def supported_parts(pipe: Any) -> tuple[str, ...]:
    """The parts of ``pipe`` SparseTem can accelerate (``()``: none), for a UI deciding whether to
    offer it.

    Example::

        supported_parts(demo_models.load_pipeline("video"))   # ("denoiser",)
    """
    try:
        spec = spec_for(pipe)
        target = Target(pipe, spec, getattr(pipe, spec.denoiser), getattr(pipe, "scheduler", None))
        return tuple(_resolve_parts("auto", target))
    except UnsupportedPipelineError:
        return ()


def _resolve_parts(parts: str, target: Target) -> dict[str, nn.Module]:
    """The modules to accelerate, by part name; refuses what cannot be diffed frame by frame."""
    name = target.name
    if target.spec.modality != "video":
        raise UnsupportedPipelineError(
            f"SparseTem accelerates video pipelines; {name} makes {target.spec.modality} (no frames to diff)"
        )
    found: dict[str, nn.Module] = {}
    why: dict[str, str] = {}
    denoiser = target.denoiser
    kind = type(denoiser).__name__
    if kind in PER_FRAME_DENOISERS and getattr(getattr(denoiser, "config", None), "num_frames", 1) > 1:
        found["denoiser"] = denoiser
    else:
        why["denoiser"] = (
            f"its denoiser {kind} is not a known per-frame network (frames can mix inside it, e.g. through "
            f"temporal attention, so a frame's output is not a function of that frame alone; known: "
            f"{', '.join(PER_FRAME_DENOISERS)})"
        )
    vae = getattr(target.pipe, "vae", None)
    decoder = getattr(vae, "decoder", None)
    if vae is None:
        why["vae"] = "it has no VAE (it decodes without one)"
    elif type(vae).__name__ not in PER_FRAME_VAES or not isinstance(decoder, nn.Module):
        why["vae"] = (
            f"its VAE {type(vae).__name__} does not decode frame by frame with a 2-D decoder "
            f"(known: {', '.join(PER_FRAME_VAES)})"
        )
    elif any(isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) for m in decoder.modules()):
        why["vae"] = f"its VAE {type(vae).__name__} has 3-D convolutions across frames"
    else:
        found["vae"] = decoder
    wanted = {"auto": tuple(found) or ("denoiser", "vae"), "both": ("denoiser", "vae")}.get(parts, (parts,))
    missing = [p for p in wanted if p not in found]
    if missing:
        usable = f" Use parts={next(iter(found))!r}." if found else ""
        raise UnsupportedPipelineError(
            f"SparseTem cannot diff the {' or '.join(missing)} of {name}: "
            + "; ".join(f"{p}: {why[p]}" for p in missing)
            + "."
            + usable
        )
    return {p: found[p] for p in wanted}


# -- the strategy --------------------------------------------------------------------------------
class _Part:
    """One accelerated part; ``clip`` is its frames per clip while a call runs (None: dense).

    A stream part (a VAE decoder) carries its last frame from one call to the next."""

    def __init__(self, name: str, stream: bool):
        self.name, self.stream = name, stream
        self.clip: int | None = None
        self.clock = itertools.count()  # orders the layers as they first run


class SparseTem(Strategy):
    """Installs a hook on every conv/linear layer of the accelerated parts; see the module doc."""

    def __init__(self, config: SparseTemConfig, parts: dict[str, nn.Module], vae: Any = None):
        self.config, self.vae = config, vae
        self.parts = {name: _Part(name, stream=name == "vae") for name in parts}
        self.layers: list[_Layer] = []
        self._installed: list[tuple[nn.Module, bool, Any]] = []  # module, registry existed, forward in __dict__
        self._denoiser_dim = PER_FRAME_DENOISERS.get(type(parts.get("denoiser")).__name__, 2)
        try:
            for name, root in parts.items():
                self._install_part(self.parts[name], root)
        except BaseException:
            self.detach()
            raise

    def _install_part(self, part: _Part, root: nn.Module) -> None:
        if part.stream:
            self._hook(root, _StreamEntry(part, self.vae))
        skip: tuple[str, ...] = ()
        for path, module in root.named_modules():
            if path and path.startswith(skip):
                continue
            label = f"{part.name}.{path}" if path else part.name
            reason = _dense_reason(module)
            if reason is not None:
                if path:
                    skip = (*skip, path + ".")
                    self._add(module, _Dense(label, part, module, reason))
            elif type(module) in (nn.Conv2d, nn.Linear):
                if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
                    self._add(module, _Dense(label, part, module, f"dense: padding mode {module.padding_mode}"))
                else:
                    self._add(module, _Diff(label, part, module, self.config))
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                self._add(module, _Dense(label, part, module, f"dense: {type(module).__name__} is not a plain layer"))

    def _add(self, module: nn.Module, hook: _Layer) -> None:
        self._hook(module, hook)
        self.layers.append(hook)

    def _hook(self, module: nn.Module, hook: ModelHook) -> None:
        had_registry = "_diffusers_hook" in vars(module)
        self._installed.append((module, had_registry, vars(module).get("forward")))
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)

    def begin(self, call: CallState) -> None:
        for part in self.parts.values():
            part.clock = itertools.count()
        for layer in self.layers:
            layer.reset()

    def denoise(self, call: CallState, index: int, d: DenoiserCall) -> tuple[Action, Any]:
        part = self.parts.get("denoiser")
        sample = d.sample
        if part is None or call.step < self.config.warmup_steps or sample.dim() <= self._denoiser_dim:
            return "computed", d.run()
        part.clip = sample.shape[self._denoiser_dim]
        try:
            return "computed", d.run()
        finally:
            part.clip = None

    @contextlib.contextmanager
    def clips(self, length: int) -> Iterator[None]:
        """Within the block the denoiser's layers see clips of ``length`` frames, for a denoiser
        called outside a pipeline call (``with strategy.clips(8): pipe.unet.denoise(x, t, labels)``)."""
        part = self.parts.get("denoiser")
        if part is None:
            raise ConfigError("clips() needs the denoiser part: apply SparseTemConfig(parts='denoiser')")
        check_int("length", length, 1)
        part.clip = length
        try:
            yield
        finally:
            part.clip = None

    def end(self, call: CallState) -> None:
        for layer in self.layers:  # the decoding after the last step starts a new stream
            layer.drop_stream()

    def detach(self) -> None:
        """Removes every hook; a module whose registry we created loses it, and its ``forward``."""
        for module, had_registry, forward in reversed(self._installed):
            registry = vars(module).get("_diffusers_hook")
            if registry is None:
                continue
            registry.remove_hook(HOOK_NAME, recurse=False)
            if not had_registry and not registry.hooks:
                del module._diffusers_hook
                if forward is None:
                    vars(module).pop("forward", None)
                else:
                    module.forward = forward
        self._installed.clear()  # the layers stay: their stats describe the last call

    @property
    def stats(self) -> SparseTemStats:
        """What every hooked layer did since the last pipeline call began, in the order they ran."""
        parts = list(self.parts)
        ordered = sorted(self.layers, key=lambda layer: (parts.index(layer.part.name), layer.order))
        return SparseTemStats(
            parts=tuple(parts),
            error_target=self.config.error_target,
            layers=tuple(layer.snapshot() for layer in ordered),
        )


def _dense_reason(module: nn.Module) -> str | None:
    """Why a layer's output is not local (so it is recomputed densely), or None."""
    if isinstance(module, _NON_LOCAL_NORMS):
        return f"dense: non-local ({type(module).__name__} normalises over the whole frame)"
    if isinstance(module, nn.MultiheadAttention) or type(module).__name__.endswith("Attention"):
        return "dense: non-local (attention over the whole frame)"
    return None


# -- hooks ---------------------------------------------------------------------------------------
class _StreamEntry(ModelHook):
    """Around a VAE decoder: its batch is one stream of frames, continuing the previous call's."""

    def __init__(self, part: _Part, vae: Any):
        super().__init__()
        self.part, self.vae = part, vae
        self._warned = False

    def new_forward(self, module: nn.Module, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        original = self.fn_ref.original_forward
        if getattr(self.vae, "use_tiling", False):  # the decoder then sees spatial tiles, not frames
            if not self._warned:
                logger.warning("SparseTem: the VAE decodes in spatial tiles (enable_tiling); decoding densely")
                self._warned = True
            return original(sample, *args, **kwargs)
        self.part.clip = sample.shape[0]
        try:
            return original(sample, *args, **kwargs)
        finally:
            self.part.clip = None


@dataclass
class _Tally:
    calls: int = 0
    frames: int = 0
    first_frames: int = 0
    dense_frames: int = 0
    tiles: int = 0
    skipped: int = 0
    macs: int = 0
    macs_skipped: int = 0
    seconds: float = 0.0
    audits: int = 0
    error: float | None = None
    fallbacks: int = 0
    verified_error: float | None = None


class _Layer(ModelHook):
    """A hooked layer: its name, its part, and what it did during the current pipeline call."""

    mode = "diff"

    def __init__(self, name: str, part: _Part, module: nn.Module):
        super().__init__()
        self.name, self.part, self.kind = name, part, type(module).__name__
        self.tally = _Tally()
        self.order = math.inf  # when the layer first ran since the reset

    def reset(self) -> None:
        self.tally = _Tally()
        self.order = math.inf
        self.drop_stream()

    def count(self, frames: int) -> None:
        if self.order == math.inf:
            self.order = next(self.part.clock)
        self.tally.calls += 1
        self.tally.frames += frames

    def drop_stream(self) -> None:
        pass

    def threshold(self) -> float:
        return 0.0

    def snapshot(self) -> LayerStats:
        return LayerStats(
            name=self.name, kind=self.kind, mode=self.mode, threshold=self.threshold(), **asdict(self.tally)
        )


class _Dense(_Layer):
    """A layer computed densely on every frame (non-local, or unsupported); timed for the stats."""

    def __init__(self, name: str, part: _Part, module: nn.Module, reason: str):
        super().__init__(name, part, module)
        self.mode = reason

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        original = self.fn_ref.original_forward
        if self.part.clip is None:
            return original(*args, **kwargs)
        start = time.perf_counter()
        out = original(*args, **kwargs)
        self.tally.seconds += time.perf_counter() - start
        first = args[0] if args else None
        self.count(first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else 0)
        return out


@dataclass
class _Stream:
    """What a layer keeps of a stream's last frame: its input and its output."""

    frame: torch.Tensor  # (B, C, H, W)
    out: torch.Tensor  # (B, O, Ho, Wo)
    scale: torch.Tensor
    shape: tuple[int, ...]


class _Geometry:
    """A linear layer as a 2-D convolution over an image layout (a Linear is a 1x1 convolution
    over its tokens laid out as a 1 x P image)."""

    def __init__(self, module: nn.Module, tile: int):
        self.module = module
        if isinstance(module, nn.Conv2d):
            self.kernel, self.stride, self.dilation = module.kernel_size, module.stride, module.dilation
            self.groups = module.groups
            left, right, top, bottom = module._reversed_padding_repeated_twice
            self.pad_by = (int(left), int(right), int(top), int(bottom))
            self.tile = (tile, tile)
        else:
            self.kernel, self.stride, self.dilation, self.groups = (1, 1), (1, 1), (1, 1), 1
            self.pad_by = (0, 0, 0, 0)
            self.tile = (1, tile * tile)

    @property
    def weight(self) -> torch.Tensor:
        w = self.module.weight
        assert isinstance(w, torch.Tensor)
        return w if w.dim() == 4 else w[:, :, None, None]

    def to_image(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.module, nn.Conv2d):
            return x
        return x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2).unsqueeze(2)

    def from_image(self, y: torch.Tensor, native: tuple[int, ...]) -> torch.Tensor:
        if isinstance(self.module, nn.Conv2d):
            return y
        return y.squeeze(2).transpose(1, 2).reshape(*native[:-1], y.shape[1])

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        left, right, top, bottom = self.pad_by
        ho = (h + top + bottom - self.dilation[0] * (self.kernel[0] - 1) - 1) // self.stride[0] + 1
        wo = (w + left + right - self.dilation[1] * (self.kernel[1] - 1) - 1) // self.stride[1] + 1
        return ho, wo

    def plan(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int, int, int]]:
        """For an h x w input: an output tile's input window (size), the step between windows, and
        the padding (left, right, top, bottom; negative crops) that gives every tile its window."""
        ho, wo = self.out_size(h, w)
        (th, tw), (sh, sw) = self.tile, self.stride
        wh = (th - 1) * sh + self.dilation[0] * (self.kernel[0] - 1) + 1
        ww = (tw - 1) * sw + self.dilation[1] * (self.kernel[1] - 1) + 1
        hp = (math.ceil(ho / th) - 1) * th * sh + wh
        wp = (math.ceil(wo / tw) - 1) * tw * sw + ww
        left, top = self.pad_by[0], self.pad_by[2]
        return (wh, ww), (th * sh, tw * sw), (left, wp - w - left, top, hp - h - top)

    @staticmethod
    def pad_channels_last(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
        """(N, C, H, W) -> (N, Hp, Wp, C), padded with zeros."""
        return F.pad(x.permute(0, 2, 3, 1), (0, 0, *pads)).contiguous()

    @staticmethod
    def windows(padded: torch.Tensor, size: tuple[int, int], step: tuple[int, int]) -> torch.Tensor:
        """(..., nty, ntx, wh, ww, C): each output tile's input window, a view of ``pad``'s result."""
        return padded.unfold(-3, size[0], step[0]).unfold(-3, size[1], step[1]).movedim(-3, -1)

    def tile_count(self, ho: int, wo: int) -> int:
        return math.ceil(ho / self.tile[0]) * math.ceil(wo / self.tile[1])

    @staticmethod
    def tiles_to_image(tiles: torch.Tensor, ho: int, wo: int) -> torch.Tensor:
        """(B, L, nty, ntx, O, th, tw) -> (B, L, O, Ho, Wo), a view."""
        b, n, nty, ntx, o, th, tw = tiles.shape
        image = tiles.permute(0, 1, 4, 2, 5, 3, 6)
        return image.reshape(b, n, o, nty * th, ntx * tw)[..., :ho, :wo]

    def delta(self, windows: torch.Tensor) -> torch.Tensor:
        """(K, wh, ww, C) input windows -> (K, O, th, tw): the layer without its bias."""
        return F.conv2d(windows.permute(0, 3, 1, 2), self.weight, None, self.stride, 0, self.dilation, self.groups)


class _Diff(_Layer):
    """A conv/linear layer computed from the change of its input (see the module doc)."""

    def __init__(self, name: str, part: _Part, module: nn.Module, config: SparseTemConfig):
        super().__init__(name, part, module)
        self.config = config
        self.geometry = _Geometry(module, config.tile)
        self.tau = config.threshold
        self.stream: _Stream | None = None
        self.mode = "diff"
        self._calls = 0  # diff calls since the pipeline call began (audits count them)
        self._rest = 0  # calls left to run densely after one found nothing to reuse
        self._pause = config.retry_every  # how long the next such rest lasts (doubles, up to 16x)

    def reset(self) -> None:
        super().reset()
        self.tau = self.config.threshold
        self._calls = self._rest = 0
        self._pause = self.config.retry_every

    def drop_stream(self) -> None:
        self.stream = None

    def threshold(self) -> float:
        return self.tau

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        original = self.fn_ref.original_forward
        clip = self.part.clip
        x = args[0] if len(args) == 1 and not kwargs else None
        if clip is None or x is None or (torch.is_grad_enabled() and x.requires_grad):
            return original(*args, **kwargs)
        if (isinstance(module, nn.Conv2d) and x.dim() != 4) or x.dim() < 2 or x.shape[0] % clip:
            return original(x)
        start = time.perf_counter()
        try:
            return self._forward(original, x, x.shape[0] // clip, clip)
        finally:
            self.tally.seconds += time.perf_counter() - start

    def _forward(self, original: Callable, x: torch.Tensor, clips: int, length: int) -> torch.Tensor:
        g, tally, cfg = self.geometry, self.tally, self.config
        image = g.to_image(x)
        ho, wo = g.out_size(*image.shape[-2:])
        frame_macs = ho * wo * g.weight.numel()
        carried = self.stream if self.part.stream else None
        if carried is not None and carried.shape != tuple(image.shape[1:]):
            carried = None
        self.count(x.shape[0])
        tally.macs += frame_macs * x.shape[0]
        if frame_macs < cfg.min_macs:
            self.mode = "dense: fewer multiply-adds per frame than min_macs"
            return original(x)
        frames = image.unflatten(0, (clips, length))
        if (length == 1 and carried is None) or self._rest:
            self._rest = max(self._rest - 1, 0)
            return self._dense_call(original, x, frames, carried, ho, wo)
        scale = carried.scale if carried is not None else _rms(frames[:, 0])
        lead = 1 if carried is not None else 0
        if carried is not None:  # the previous call's last frame opens the clip; its output is known
            frames = torch.cat([carried.frame[:, None], frames], 1)
        total = frames.shape[1]
        size, step, pads = g.plan(*image.shape[-2:])
        # per frame and tile: the largest change of its input window since the previous frame
        moved = F.pad((frames[:, 1:] - frames[:, :-1]).abs_().amax(dim=2).flatten(0, 1), pads)[:, None]
        pooled = F.max_pool2d(moved, size, step)
        peaks = pooled.view(clips, total - 1, *pooled.shape[-2:])  # (B, total - 1, nty, ntx)
        tau = float(self.tau * scale)
        hot = (peaks > tau).transpose(0, 1).flatten(1).float().mean(1) > cfg.dense_above
        if bool(hot.all()):  # every frame would be computed densely: in one call, and rest a while
            self._rest = self._pause - 1
            self._pause = min(2 * self._pause, 16 * cfg.retry_every)
            return self._dense_call(original, x, frames[:, lead:], carried, ho, wo)

        def dense(frames: torch.Tensor) -> torch.Tensor:  # native frames -> image-layout output
            return g.to_image(original(frames))

        native = x.unflatten(0, (clips, length))
        if carried is None:  # the clip's first frame opens it, densely
            tally.first_frames += clips
            bases = [dense(native[:, 0])]
        else:
            bases = [carried.out]
        n_tiles = peaks[:, 0].numel()
        drift = torch.zeros_like(peaks[:, 0])  # per tile: a bound on its input's change since computed
        since = torch.zeros(peaks[:, 0].shape, dtype=torch.long, device=x.device)  # ... computed at frame
        base_frames, picks = [0], []
        risk = torch.zeros(total)  # per frame, the largest change bound it skipped
        for f in range(1, total):
            drift += peaks[:, f - 1]
            # a stream's last frame leaves no change behind: the next call starts from its inputs
            active = drift > (0.0 if self.part.stream and f == total - 1 else tau)
            n_active = int(active.sum())
            tally.tiles += n_tiles
            if n_active > cfg.dense_above * n_tiles:
                base_frames.append(f)
                drift.zero_()
                since.fill_(f)
                continue
            tally.skipped += n_tiles - n_active
            tally.macs_skipped += frame_macs * clips * (n_tiles - n_active) // n_tiles
            if n_active:
                b, ty, tx = active.nonzero(as_tuple=True)
                picks.append((torch.full_like(b, f), b, ty, tx, since[b, ty, tx]))
                drift.masked_fill_(active, 0.0)
                since.masked_fill_(active, f)
            if n_active < n_tiles:
                risk[f] = float(drift.square().sum())
        tally.dense_frames += (len(base_frames) - 1) * clips
        if len(base_frames) > 1:
            later = [f - lead for f in base_frames[1:]]
            bases += list(dense(native[:, later].flatten(0, 1)).unflatten(0, (clips, len(later))).unbind(1))
        which = torch.zeros(total, dtype=torch.long, device=x.device)  # the base each frame builds on
        for i, f in enumerate(base_frames[1:], start=1):
            which[f:] = i
        if not picks:
            y = torch.stack(bases, 1).index_select(1, which)  # (B, total, O, Ho, Wo)
        else:
            at, b, ty, tx, ref = (torch.cat(column) for column in zip(*picks))
            used = torch.unique(torch.cat([at, ref]))  # only the frames a changed tile reads
            slot = torch.empty(total, dtype=torch.long, device=x.device)
            slot[used] = torch.arange(len(used), device=x.device)
            padded = g.pad_channels_last(frames[:, used].flatten(0, 1), pads).unflatten(0, (clips, len(used)))
            windows = g.windows(padded, size, step)  # (B, used, nty, ntx, wh, ww, C)
            both = windows[torch.cat([b, b]), slot[torch.cat([at, ref])], torch.cat([ty, ty]), torch.cat([tx, tx])]
            deltas = g.delta(both[: len(b)] - both[len(b) :])  # one batched call for every frame
            tiles = image.new_zeros(clips, total, *peaks.shape[2:], *deltas.shape[1:])
            tiles[b, at, ty, tx] = deltas
            summed = g.tiles_to_image(tiles.cumsum_(1), ho, wo)
            if len(bases) == 1:
                y = (bases[0][:, None] + summed).contiguous()
            else:
                since_base = summed - summed.index_select(1, torch.tensor(base_frames, device=x.device)[which])
                y = torch.stack(bases, 1).index_select(1, which) + since_base
        if len(base_frames) == total and total > 1:  # nothing reusable: skip the bookkeeping a while
            self._rest = self._pause - 1
            self._pause = min(2 * self._pause, 16 * cfg.retry_every)
        else:
            self._pause = cfg.retry_every
        y = self._audit(y[:, lead:], native, dense, risk[lead:])
        if self.part.stream:
            self.stream = _Stream(frames[:, -1].clone(), y[:, -1].clone(), scale, tuple(image.shape[1:]))
        return g.from_image(y.flatten(0, 1), tuple(x.shape))

    def _dense_call(
        self, original: Callable, x: torch.Tensor, frames: torch.Tensor, carried: _Stream | None, ho: int, wo: int
    ) -> torch.Tensor:
        """The layer on every frame at once; a stream still keeps its last frame."""
        g, tally = self.geometry, self.tally
        clips, length = frames.shape[:2]
        first = 0 if carried is not None else clips
        tally.first_frames += first
        tally.dense_frames += clips * length - first
        tally.tiles += (clips * length - first) * g.tile_count(ho, wo)
        out = original(x)
        if self.part.stream:
            scale = carried.scale if carried is not None else _rms(frames[:, 0])
            last = g.to_image(out).unflatten(0, (clips, length))[:, -1]
            self.stream = _Stream(frames[:, -1].clone(), last.clone(), scale, tuple(frames.shape[2:]))
        return out

    def _audit(
        self,
        y: torch.Tensor,
        native: torch.Tensor,
        dense: Callable[[torch.Tensor], torch.Tensor],
        risk: torch.Tensor,
    ) -> torch.Tensor:
        """Every audit_every-th call: measures the error of the frame that skipped the largest change,
        adapts the threshold, and above the target recomputes the call densely. ``verify``: measures
        the error of every frame of what is returned."""
        cfg, tally = self.config, self.tally
        self._calls += 1
        exact = dense(native.flatten(0, 1)).unflatten(0, native.shape[:2]) if cfg.verify else None
        if cfg.audit_every and (self._calls - 1) % cfg.audit_every == 0:
            f = int(risk.argmax())
            error = 0.0  # nothing skipped: the result is the dense one up to rounding
            if risk[f] > 0:
                tally.audits += 1
                error = _relative_error(y[:, f], exact[:, f] if exact is not None else dense(native[:, f]))
                tally.error = max(error, tally.error or 0.0)
            if cfg.adaptive and error > cfg.error_target:
                self.tau = max(self.tau / 2, _MIN_THRESHOLD)
                tally.fallbacks += 1
                y = exact if exact is not None else dense(native.flatten(0, 1)).unflatten(0, native.shape[:2])
            elif cfg.adaptive and error > cfg.error_target / 2:  # aim below: other frames may err more
                self.tau = max(self.tau * 0.8, _MIN_THRESHOLD)
            elif cfg.adaptive and error < cfg.error_target / 4:
                self.tau = min(self.tau * 1.25, _MAX_THRESHOLD)
        if exact is not None:
            worst = max(_relative_error(y[:, k], exact[:, k]) for k in range(y.shape[1]))
            tally.verified_error = max(worst, tally.verified_error or 0.0)
        return y


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.float().pow(2).mean().sqrt()


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).float().norm() / exact.float().norm().clamp_min(1e-12))
