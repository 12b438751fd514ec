"""The denoiser of the built-in demo models: a small attribute-conditioned convolutional UNet.

Conditioning is a handful of attribute tokens (see :mod:`demo_models.vocab`), each
embedded, summed with the timestep embedding and fed to every residual block as a FiLM
scale and shift. Two coordinate channels are appended to the input so that "top left"
is easy to learn.

Video (``motion_slot`` set) is denoised frame by frame: the (B, C, F, H, W) sample is
reshaped to B·F images and each frame gets two extra tokens, its index and the pair
(motion attribute, frame index), so "moving right" becomes "where to draw in frame k".
Frames never see each other; the video pipeline starts every frame from the same noise,
which keeps the details the prompt leaves open (colour, shape, offset) the same across frames.
Training then costs what the image model costs: one random frame per example.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (float) timesteps, shape (B,) → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _groups(channels: int, groups: int = 8) -> int:
    return groups if channels % groups == 0 else 1


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int = 8) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in, groups), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out, groups), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)  # type: ignore[arg-type]  # a Conv2d made with a bias

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class AttributeUNet(ModelMixin, ConfigMixin):
    """Attribute-conditioned UNet; ``forward(sample, timestep, class_labels)``.

    ``sample`` is (B, C, H, W), or (B, C, F, H, W) when ``num_frames > 1``; ``timestep`` a
    scalar or (B,) tensor; ``class_labels`` (B, n_slots) long, 0 = slot unspecified.

    Example:
        >>> net = AttributeUNet(attribute_sizes=(3, 4))
        >>> net(torch.randn(2, 3, 32, 32), 10, torch.tensor([[1, 0], [0, 2]])).sample.shape
        torch.Size([2, 3, 32, 32])
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        num_frames: int = 1,
        sample_size: tuple[int, int] = (32, 32),
        attribute_sizes: tuple[int, ...] = (7, 4, 6, 3, 5),
        block_out_channels: tuple[int, ...] = (32, 64, 128),
        emb_dim: int = 128,
        mid_blocks: int = 2,
        patch_size: int = 1,
        spatial_conditioning: bool = True,
        motion_slot: int | None = None,
        norm_groups: int = 8,
    ) -> None:
        super().__init__()
        if num_frames > 1:
            if motion_slot is None:
                raise ValueError("a video model (num_frames > 1) needs motion_slot, the slot that says how things move")
            # Extra tokens per frame: frame index, and (motion value, frame index); 0 = unspecified.
            n_motion = attribute_sizes[motion_slot] - 1
            attribute_sizes = (*attribute_sizes, num_frames + 1, n_motion * num_frames + 1)
        chans = in_channels * patch_size**2
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.attr_embed = nn.ModuleList(nn.Embedding(n, emb_dim) for n in attribute_sizes)
        self.conv_in = nn.Conv2d(chans + 2, block_out_channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c = block_out_channels[0]
        skips = []
        for i, c_out in enumerate(block_out_channels):
            self.down.append(ResBlock(c, c_out, emb_dim, norm_groups))
            c = c_out
            skips.append(c)
            last = i == len(block_out_channels) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = nn.ModuleList(ResBlock(c, c, emb_dim, norm_groups) for _ in range(mid_blocks))
        # Learned per-attribute feature maps at the bottleneck: a direct, spatially resolved
        # path from "top left" / "triangle" to where and what to draw, which FiLM alone
        # (a per-channel scale and shift) learns only slowly.
        factor = patch_size * 2 ** (len(block_out_channels) - 1)
        self._bottleneck = (c, sample_size[0] // factor, sample_size[1] // factor)
        self.attr_maps = nn.ModuleList(
            nn.Embedding(n, math.prod(self._bottleneck)) for n in (attribute_sizes if spatial_conditioning else ())
        )
        for table in self.attr_maps:
            assert isinstance(table, nn.Embedding)
            nn.init.normal_(table.weight, std=0.02)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, c_out in reversed(list(enumerate(block_out_channels))):
            self.up.append(ResBlock(c + skips[i], c_out, emb_dim, norm_groups))
            c = c_out
            self.upsample.append(nn.Identity() if i == 0 else nn.Conv2d(c, block_out_channels[i - 1], 3, padding=1))
            if i > 0:
                c = block_out_channels[i - 1]
        self.norm_out = nn.GroupNorm(_groups(c, norm_groups), c)
        self.conv_out = nn.Conv2d(c, chans, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)  # type: ignore[arg-type]  # a Conv2d made with a bias

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        cfg = self.config
        b = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim == 0:
            t = t.expand(b)
        if class_labels is None:
            class_labels = torch.zeros(b, len(cfg.attribute_sizes), dtype=torch.long, device=sample.device)
        if sample.ndim == 5:
            _, c, f, h, w = sample.shape
            frames = sample.transpose(1, 2).reshape(b * f, c, h, w)
            index = torch.arange(f, device=sample.device).repeat(b)
            labels = self.frame_labels(class_labels.repeat_interleave(f, 0), index)
            out = self.denoise(frames, t.repeat_interleave(f), labels)
            out = out.reshape(b, f, c, h, w).transpose(1, 2)
        else:
            out = self.denoise(sample, t, class_labels)
        if not return_dict:
            return (out,)
        return UNet2DOutput(sample=out)

    def frame_labels(self, class_labels: torch.Tensor, frame_index: torch.Tensor) -> torch.Tensor:
        """Append the per-frame tokens (frame index, motion × frame) to (N, n_slots) labels."""
        frames = self.config.num_frames
        motion = class_labels[:, self.config.motion_slot]
        motion_frame = torch.where(motion > 0, (motion - 1) * frames + frame_index + 1, 0)
        return torch.cat([class_labels, (frame_index + 1)[:, None], motion_frame[:, None]], dim=1)

    def denoise(self, sample: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """The UNet proper on images: (N, C, H, W) sample, (N,) timesteps, (N, slots) token ids."""
        cfg = self.config
        b = sample.shape[0]
        x = sample
        if cfg.patch_size > 1:
            x = F.pixel_unshuffle(x, cfg.patch_size)
        h, w = x.shape[-2:]
        emb = self.time_mlp(timestep_embedding(t, cfg.emb_dim).to(x.dtype))
        for k, table in enumerate(self.attr_embed):
            emb = emb + table(class_labels[:, k].long())
        emb = F.silu(emb)
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")).expand(b, 2, h, w)
        x = self.conv_in(torch.cat([x, grid], dim=1))
        skips = []
        for block, down in zip(self.down, self.downsample):
            x = block(x, emb)
            skips.append(x)
            x = down(x)
        for k, table in enumerate(self.attr_maps):
            x = x + table(class_labels[:, k].long()).view(b, *self._bottleneck).to(x.dtype)
        for block in self.mid:
            x = block(x, emb)
        for block, up in zip(self.up, self.upsample):
            x = block(torch.cat([x, skips.pop()], dim=1), emb)
            if not isinstance(up, nn.Identity):
                x = up(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        out = self.conv_out(F.silu(self.norm_out(x)))
        if cfg.patch_size > 1:
            out = F.pixel_shuffle(out, cfg.patch_size)
        return out


def widened(net: AttributeUNet, factor: int) -> AttributeUNet:
    """``net`` with every block ``factor`` times as wide, computing the same function.

    Net2Net-style growth (Chen et al., 2016): in each layer the old channels keep their weights
    and read only old channels (their weights from the new channels start at zero); the new
    channels start from a fresh layer's initialisation and feed nothing old until training
    makes them, which it does from the first step (the zero weights get gradients). Norm groups
    scale with the width, so no group mixes old and new channels. Where a layer's channels are
    two parts (an up block's input is the upsampled path then the skip; FiLM's output is the
    scale then the shift) each part keeps its old channels first.
    """
    cfg = {k: v for k, v in net.config.items() if not k.startswith("_")}
    cfg["block_out_channels"] = tuple(c * factor for c in cfg["block_out_channels"])
    cfg["norm_groups"] = cfg.get("norm_groups", 8) * factor
    new = AttributeUNet(**cfg)
    old_params = dict(net.named_parameters())
    with torch.no_grad():
        for name, p in new.named_parameters():
            old = old_params[name]
            # the dimension (if any) made of two parts: FiLM's output; an up block's input
            up_input = name.startswith("up.") and (".norm1." in name or ".conv1." in name or ".skip." in name)
            two_parts = 0 if ".film." in name else (0 if ".norm1." in name else 1) if up_input else None
            maps = [_channel_map(old.shape[d], p.shape[d], d == two_parts) for d in range(old.ndim)]
            p[torch.meshgrid(*maps, indexing="ij")] = old
            if isinstance(new.get_submodule(name.rsplit(".", 1)[0]), nn.Conv2d | nn.Linear) and p.ndim >= 2:
                fresh_inputs = torch.ones(p.shape[1], dtype=torch.bool)
                fresh_inputs[maps[1]] = False
                p[maps[0][:, None], fresh_inputs.nonzero()[:, 0][None]] = 0
    return new


def _channel_map(old: int, new: int, two_parts: bool) -> torch.Tensor:
    """Where each of ``old`` channels sits among ``new``: first, or first in each of two halves."""
    if old == new or not two_parts:
        return torch.arange(old)
    half, new_half = old // 2, new // 2
    return torch.cat([torch.arange(half), new_half + torch.arange(half)])
