"""Train a built-in demo model on procedurally generated data and save it under ``assets/<kind>``.

    python -m demo_models.train image            # the shipped recipe (fixed seed)
    python -m demo_models.train image --resume   # continue an interrupted run, same result
    python -m demo_models.train audio --steps 200 --out /tmp/probe   # a quick probe

Recipe: pixel/mel space, cosine noise schedule, AdamW with warm-up and cosine decay, EMA of
the weights, attribute dropout (each slot 20 %, whole prompt 10 %: every token 0, which is
what the pipelines feed the unconditional branch for the empty negative prompt) so partial and
empty prompts and classifier-free guidance work. The DDIM scheduler does not clip: diffusers
clips the predicted x0 but derives the step's noise from the unclipped one, so a guided x0
beyond ±1 moved the sample the wrong way (0/24 image prompts right at guidance 3).
Image and video predict the clean sample (x0),
which keeps flat colours free of residual noise; the image loss weights each timestep by
1 + min(SNR, 5) so the low-noise steps that draw edges count. Video trains one random frame
per example (the denoiser works frame by frame). Audio predicts v.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from . import data
from .models import AttributeUNet, widened
from .pipelines import PIPELINE_CLASSES
from .vocab import SLOTS, attribute_sizes, check_kind, encode_attributes, sample_attributes

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TRAIN_SEED = 0
SHARD = "9MB"  # weights files under Hugging Face's 10 MiB limit outside Git LFS: a Space takes the repo as is


SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="v_prediction",
    clip_sample=False,
    timestep_spacing="trailing",
    set_alpha_to_one=False,
)


@dataclass
class Recipe:
    """Everything that defines a trained demo model."""

    kind: str
    unet: dict
    dataset_size: int
    steps: int
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    ema_decay: float = 0.998
    slot_dropout: float = 0.2
    prompt_dropout: float = 0.1
    # x0 loss weight 1 + min(SNR, cap): more weight on the low-noise steps that draw the edges
    snr_weight_cap: float | None = None
    seed: int = TRAIN_SEED
    scheduler: dict = field(default_factory=lambda: dict(SCHEDULER))
    # stage 2 of a grown model: start from `base`'s trained model widened `factor` times
    grown_from: Growth | None = None


@dataclass
class Growth:
    """Where a grown model starts: the model ``base`` trains, every block ``factor`` times as
    wide (:func:`demo_models.models.widened`: the same function, more channels to train)."""

    base: Recipe
    factor: int


_IMAGE_SMALL = Recipe(
    kind="image",
    unet=dict(
        in_channels=3,
        num_frames=1,
        sample_size=(data.IMAGE_SIZE, data.IMAGE_SIZE),
        block_out_channels=(32, 64, 128),
        emb_dim=128,
        mid_blocks=1,
        patch_size=2,
    ),
    dataset_size=20_000,
    steps=7000,
    snr_weight_cap=5.0,
    scheduler=dict(SCHEDULER, prediction_type="sample"),
)

_VIDEO_SMALL = Recipe(
    kind="video",
    unet=dict(
        in_channels=3,
        num_frames=data.VIDEO_FRAMES,
        sample_size=(32, 32),
        block_out_channels=(24, 48, 96),
        emb_dim=128,
        mid_blocks=1,
        patch_size=2,
        motion_slot=[s.name for s in SLOTS["video"]].index("direction"),
    ),
    dataset_size=8_000,
    steps=4500,
    scheduler=dict(SCHEDULER, prediction_type="sample"),
)

RECIPES: dict[str, Recipe] = {
    # image and video: the small model trained, then widened twice over and trained on, for a
    # denoiser call that weighs against a window's messages as real ones do (docs/BENCHMARKS.md)
    "image": replace(
        _IMAGE_SMALL,
        unet=dict(_IMAGE_SMALL.unet, block_out_channels=(64, 128, 256), norm_groups=16),
        steps=2000,
        lr=5e-4,
        seed=TRAIN_SEED + 1,
        grown_from=Growth(base=_IMAGE_SMALL, factor=2),
    ),
    "video": replace(
        _VIDEO_SMALL,
        unet=dict(_VIDEO_SMALL.unet, block_out_channels=(48, 96, 192), norm_groups=16),
        steps=1500,
        lr=5e-4,
        seed=TRAIN_SEED + 1,
        grown_from=Growth(base=_VIDEO_SMALL, factor=2),
    ),
    "audio": Recipe(
        kind="audio",
        unet=dict(
            in_channels=1,
            num_frames=1,
            sample_size=(data.N_MELS, data.MEL_FRAMES),
            block_out_channels=(32, 64, 128),
            emb_dim=128,
            mid_blocks=1,
            patch_size=2,
        ),
        dataset_size=8_000,
        steps=2000,
    ),
}


def make_sample(kind: str, attrs: dict[str, str], rng: np.random.Generator) -> np.ndarray:
    """One training example in model space ([-1, 1], channels first)."""
    if kind == "image":
        return data.render_image(attrs, rng).transpose(2, 0, 1) * 2 - 1
    if kind == "video":
        return data.render_video(attrs, rng).transpose(3, 0, 1, 2) * 2 - 1
    return data.audio_to_mel(data.synth_tone(attrs, rng))[None]


def make_dataset(kind: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples (float16) and their full attribute token ids."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _ in range(n):
        attrs = sample_attributes(kind, rng)
        xs.append(make_sample(kind, attrs, rng).astype(np.float16))
        ys.append(encode_attributes(kind, attrs))
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.long)


def build_pipeline(recipe: Recipe, unet: AttributeUNet | None = None):
    unet = unet or AttributeUNet(attribute_sizes=attribute_sizes(recipe.kind), **recipe.unet)
    scheduler = DDIMScheduler(**recipe.scheduler)
    return PIPELINE_CLASSES[recipe.kind](unet=unet, scheduler=scheduler)


def train(
    recipe: Recipe,
    out_dir: Path,
    threads: int = 1,
    checkpoint_every: int = 500,
    resume: bool = False,
    stop_at: int | None = None,
    base_dir: Path | None = None,
) -> dict:
    """Train, save the EMA weights as a pipeline in ``out_dir``; returns training stats.

    Every checkpoint also writes ``out_dir/train_state.pt`` (weights, EMA, optimiser, random
    state); ``resume=True`` continues from it and ends with the same weights as an
    uninterrupted run (``stop_at`` ends a run early at a checkpoint, as an interruption would).
    The file is removed when training completes.

    A grown recipe (``recipe.grown_from``) starts from the base model in ``base_dir``
    (default ``runs/train/<kind>-base``, where it is trained first when it is not there yet).
    """
    torch.set_num_threads(threads)
    grown = _grown(recipe, threads, base_dir) if recipe.grown_from else None
    torch.manual_seed(recipe.seed)
    t0 = time.time()
    x_all, y_all = make_dataset(recipe.kind, recipe.dataset_size, recipe.seed)
    logger.info("dataset %s in %.0f s", tuple(x_all.shape), time.time() - t0)
    pipe = build_pipeline(recipe, grown)
    net = pipe.unet
    ema = copy.deepcopy(net).requires_grad_(False)
    sched = pipe.scheduler
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=0.0, betas=(0.9, 0.99))
    lr_at = lambda s: (
        recipe.lr
        * min(1.0, (s + 1) / recipe.warmup)
        * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / recipe.steps))))
    )
    gen = torch.Generator().manual_seed(recipe.seed)
    n_slots = len(SLOTS[recipe.kind])
    losses: list[float] = []
    t_train = time.time()
    state_path = out_dir / "train_state.pt"
    start, seconds_before = 0, 0.0
    if resume and state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        if state["recipe"] != asdict(recipe):
            raise ValueError(f"{state_path} was written by another recipe; remove it or train without --resume")
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        start, losses, seconds_before = state["step"], state["losses"], state["seconds"]
        logger.info("resumed at step %d", start)
    t0 -= seconds_before
    for step in range(start, recipe.steps):
        idx = torch.randint(0, len(x_all), (recipe.batch_size,), generator=gen)
        x0 = x_all[idx].float()
        labels = y_all[idx].clone()
        drop = torch.rand(recipe.batch_size, n_slots, generator=gen) < recipe.slot_dropout
        drop |= torch.rand(recipe.batch_size, 1, generator=gen) < recipe.prompt_dropout
        labels[drop] = 0
        if x0.ndim == 5:  # video: one random frame per example (the denoiser works frame by frame)
            frame = torch.randint(0, x0.shape[2], (recipe.batch_size,), generator=gen)
            x0 = x0[torch.arange(recipe.batch_size), :, frame]
            labels = net.frame_labels(labels, frame)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (recipe.batch_size,), generator=gen)
        xt = sched.add_noise(x0, noise, t)
        target = x0 if sched.config.prediction_type == "sample" else sched.get_velocity(x0, noise, t)
        pred = net.denoise(xt, t, labels)
        if recipe.snr_weight_cap is None:
            loss = F.mse_loss(pred, target)
        else:
            alpha_bar = sched.alphas_cumprod[t]
            weight = 1 + (alpha_bar / (1 - alpha_bar)).clamp(max=recipe.snr_weight_cap)
            loss = (weight * (pred - target).pow(2).flatten(1).mean(1)).sum() / weight.sum()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            logger.info(
                "step %d loss %.4f lr %.2e %.2f s/step",
                step + 1,
                float(np.mean(losses[-50:])),
                lr_at(step),
                (time.time() - t_train) / (step + 1 - start),
            )
        if (step + 1) % checkpoint_every == 0 or step + 1 == recipe.steps:
            stats = {
                "steps": step + 1,
                "train_seconds": round(time.time() - t0, 1),
                "final_loss": float(np.mean(losses[-100:])),
                "parameters": sum(p.numel() for p in net.parameters()),
                "recipe": asdict(recipe),
            }
            save(build_pipeline(recipe, ema), out_dir, stats)
            if step + 1 < recipe.steps:
                state = dict(
                    net=net.state_dict(),
                    ema=ema.state_dict(),
                    opt=opt.state_dict(),
                    gen=gen.get_state(),
                    step=step + 1,
                    losses=losses,
                    seconds=time.time() - t0,
                    recipe=asdict(recipe),
                )
                torch.save(state, state_path.with_suffix(".tmp"))
                state_path.with_suffix(".tmp").replace(state_path)
                if stop_at is not None and step + 1 >= stop_at:
                    return stats
    state_path.unlink(missing_ok=True)
    return stats


def _grown(recipe: Recipe, threads: int, base_dir: Path | None) -> AttributeUNet:
    """The base model of a grown recipe, widened (trained first when ``base_dir`` has none)."""
    assert recipe.grown_from is not None
    base_dir = base_dir or ASSETS.parent / "runs" / "train" / f"{recipe.kind}-base"
    if not (base_dir / "training.json").is_file():
        logger.info("training the base model into %s first", base_dir)
        train(recipe.grown_from.base, base_dir, threads=threads, resume=True)
    logger.info("widening the base model in %s %d times", base_dir, recipe.grown_from.factor)
    torch.manual_seed(recipe.seed)  # the new channels' initialisation
    net = widened(AttributeUNet.from_pretrained(base_dir / "unet"), recipe.grown_from.factor)
    got, want = (
        {k: v for k, v in json.loads(json.dumps(dict(cfg))).items() if not k.startswith("_")}
        for cfg in (net.config, dict(recipe.unet, attribute_sizes=attribute_sizes(recipe.kind)))
    )
    if any(got.get(k) != v for k, v in want.items()):
        raise ValueError(f"widening {base_dir} gives {got}, not the recipe's {want}")
    return net


def save(pipe, out_dir: Path, stats: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True, max_shard_size=SHARD)
    (out_dir / "training.json").write_text(json.dumps(stats, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=list(RECIPES))
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's step count (probes)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default assets/<kind>)")
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a busy machine")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its train_state.pt")
    parser.add_argument(
        "--base",
        type=Path,
        default=None,
        help="a grown model's base (default runs/train/<kind>-base; trained if missing)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    recipe = copy.deepcopy(RECIPES[check_kind(args.kind)])
    if args.steps:
        recipe.steps = args.steps
    stats = train(recipe, args.out or ASSETS / args.kind, threads=args.threads, resume=args.resume, base_dir=args.base)
    logger.info("done: %s", {k: v for k, v in stats.items() if k != "recipe"})


if __name__ == "__main__":
    main()
