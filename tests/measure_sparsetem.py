"""Measures SparseTem on the built-in video model: speed and quality against dense, alone and with
ParaStep-2 on 2 gloo ranks, where its time goes, and on one large layer that skipped tiles are
skipped work.

    PYTHONPATH=$PWD .venv/bin/python tests/measure_sparsetem.py --prompts 20 --seed 7 --out runs/sparsetem.json
    PYTHONPATH=$PWD .venv/bin/python tests/measure_sparsetem.py --prompts 16 --verify-guidance 1,3,4

The second measures every frame's error (``verify=True``) at those guidance scales instead.

Every process uses one thread. The methods take turns prompt by prompt (the order rotates), so load
from other processes hits them alike; speedups are ratios of sums over the same prompts. "denoiser"
is the time inside the denoiser's forward (the per-frame work), "call" the whole pipeline call.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import demo_models
import parastep
from launcher.quality import psnr, ssim
from tests.distributed import run_ranks


def timed_pipe(pipe) -> list[float]:
    """Torch hooks that sum the time spent in the denoiser's forward into the returned counter."""
    spent = [0.0, 0.0]
    pipe.unet.register_forward_pre_hook(lambda m, a: spent.__setitem__(1, time.perf_counter()))
    pipe.unet.register_forward_hook(lambda m, a, o: spent.__setitem__(0, spent[0] + time.perf_counter() - spent[1]))
    return spent


def generate(pipe, spent: list[float], prompt: str, steps: int) -> dict:
    spent[0] = 0.0
    start = time.perf_counter()
    frames = pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).frames[0]
    return dict(frames=frames, wall=time.perf_counter() - start, denoiser=spent[0])


def adherence(prompt: str, frames: np.ndarray) -> tuple[float, bool]:
    checks = demo_models.check("video", prompt, np.asarray(frames))
    return sum(checks.values()) / len(checks), all(checks.values())


def run_methods(pipe, prompts: list[str], steps: int, chains: dict[str, list], label: str = "") -> dict[str, list]:
    """Every chain (none: dense) on every prompt, taking turns; with SparseTem's stats where attached."""
    spent = timed_pipe(pipe)
    names = list(chains)
    for name in names:  # warm every path once
        handle = parastep.apply(pipe, chains[name]) if chains[name] else None
        generate(pipe, spent, prompts[0], 6)
        if handle is not None:
            handle.remove()
    out: dict[str, list] = {name: [] for name in names}
    for i, prompt in enumerate(prompts):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            handle = parastep.apply(pipe, chains[name]) if chains[name] else None
            run = generate(pipe, spent, prompt, steps)
            if handle is not None:
                if any(isinstance(c, parastep.SparseTemConfig) for c in chains[name]):
                    stats = parastep.SparseTemStats.of(handle)
                    run.update(skipped_work=stats.skipped_work, max_error=stats.max_error or 0.0)
                handle.remove()
            out[name].append(run)
        walls = ", ".join(f"{name} {out[name][-1]['wall']:.2f}s" for name in names)
        print(f"{label}{i + 1}/{len(prompts)} {prompt!r}: {walls}", flush=True)
    return out


def single(prompts: list[str], steps: int, targets: list[float]) -> dict[str, list]:
    torch.set_num_threads(1)
    pipe = demo_models.load_pipeline("video")
    chains: dict[str, list] = {"dense": []}
    chains.update({f"SparseTem (error_target {t:g})": [parastep.SparseTemConfig(error_target=t)] for t in targets})
    return run_methods(pipe, prompts, steps, chains)


def ranks_worker(rank: int, prompts: list[str], steps: int, target: float) -> dict[str, list]:
    pipe = demo_models.load_pipeline("video")
    chains = {
        "ParaStep-2": [parastep.ParaStepConfig(warmup_steps=5)],
        f"SparseTem (error_target {target:g}) + ParaStep-2": [
            parastep.SparseTemConfig(error_target=target),
            parastep.ParaStepConfig(warmup_steps=5),
        ],
    }
    out = run_methods(pipe, prompts, steps, chains, label=f"rank {rank}: ")
    if rank:
        for runs in out.values():
            for run in runs:
                run["frames"] = 0  # rank 0 decodes what matters
    return out


def layer_profile(prompts: list[str], steps: int, target: float) -> dict[str, dict]:
    """Seconds per denoiser layer, dense (torch hooks) and with SparseTem (its stats), taking turns."""
    torch.set_num_threads(1)
    pipe = demo_models.load_pipeline("video")
    rows: dict[str, dict] = {}
    for prompt in prompts:
        seconds: dict[str, float] = {}
        handles = _layer_timers(pipe.unet, seconds)
        pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent")
        for h in handles:
            h.remove()
        handle = parastep.apply(pipe, parastep.SparseTemConfig(error_target=target))
        pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent")
        stats = parastep.SparseTemStats.of(handle)
        handle.remove()
        for layer in stats.layers:
            row = rows.setdefault(layer.name, dict(mode=layer.mode, dense_s=0.0, sparsetem_s=0.0, tiles=0, skipped=0))
            row["dense_s"] += seconds.get(layer.name, 0.0)
            row["sparsetem_s"] += layer.seconds
            row["tiles"] += layer.tiles
            row["skipped"] += layer.skipped
    return rows


def _layer_timers(unet: torch.nn.Module, seconds: dict[str, float]) -> list:
    """Torch hooks that sum the seconds spent in each conv/linear/norm layer of ``unet``."""
    handles = []
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm)):
            key, started = f"denoiser.{name}", [0.0]

            def stop(m, a, o, s=started, k=key) -> None:
                seconds[k] = seconds.get(k, 0.0) + time.perf_counter() - s[0]

            handles.append(
                module.register_forward_pre_hook(lambda m, a, s=started: s.__setitem__(0, time.perf_counter()))
            )
            handles.append(module.register_forward_hook(stop))
    return handles


def verified(prompts: list[str], steps: int, target: float, scales: list[float]) -> None:
    """The largest relative error of any layer's output on any frame (``verify=True``: frames the
    audits did not measure too), against the error target, clip by clip, at each guidance scale."""
    torch.set_num_threads(1)
    pipe = demo_models.load_pipeline("video")
    config = parastep.SparseTemConfig(error_target=target, verify=True)
    for scale in scales:
        ratios = []
        for i, prompt in enumerate(prompts):
            handle = parastep.apply(pipe, config)
            gen = torch.Generator().manual_seed(i)
            pipe(prompt, num_inference_steps=steps, generator=gen, guidance_scale=scale, output_type="latent")
            layers = parastep.SparseTemStats.of(handle).layers
            handle.remove()
            ratios.append(max(layer.verified_error or 0.0 for layer in layers) / target)
        print(
            f"guidance {scale:g}: largest error / target, clip by clip: {' '.join(f'{r:.2f}' for r in ratios)}; "
            f"max {max(ratios):.2f}, median {np.median(ratios):.2f}",
            flush=True,
        )


def micro(frames: int = 8, channels: int = 64, size: int = 64, reps: int = 7) -> list[dict]:
    """One Conv2d(64, 64, 3) on 8 frames of 64x64 whose later frames change in a square covering a
    fraction of the frame: dense vs SparseTem's layer hook at threshold 0 (exact up to rounding);
    min over the runs, taking turns."""
    from diffusers.hooks import HookRegistry

    from parastep.strategies.sparsetem import _Diff, _Part

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = parastep.SparseTemConfig(
        threshold=0.0, adaptive=False, audit_every=0, min_macs=0, retry_every=1, dense_above=1.0
    )
    rows = []
    for fraction in (0.0, 1 / 16, 0.25, 1.0):
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        x = torch.randn(1, channels, size, size).repeat(frames, 1, 1, 1)
        side = round(size * fraction**0.5)
        for f in range(1, frames):
            x[f, :, :side, :side] += torch.randn(channels, side, side)
        part = _Part("denoiser", stream=False)
        hook = _Diff("conv", part, conv, config)
        HookRegistry.check_if_exists_or_initialize(conv).register_hook(hook, "sparsetem")
        times: dict[str, list[float]] = {"dense": [], "sparsetem": []}
        with torch.no_grad():
            dense = conv(x)
            part.clip = frames
            sparse = conv(x)
            for _ in range(reps):
                for name in times:
                    part.clip = frames if name == "sparsetem" else None
                    start = time.perf_counter()
                    conv(x)
                    times[name].append(time.perf_counter() - start)
        rows.append(
            dict(
                changed_area=fraction,
                skipped_tiles=hook.tally.skipped / hook.tally.tiles,
                dense_ms=min(times["dense"]) * 1e3,
                sparsetem_ms=min(times["sparsetem"]) * 1e3,
                max_abs_diff=float((sparse - dense).abs().max()),
            )
        )
    return rows


def summary(single_runs: dict, ranks: dict | None, profile: dict, micro_rows: list[dict], steps: int) -> str:
    dense = single_runs["dense"]
    prompts = [r["prompt"] for r in dense]
    n = len(dense)
    dense_wall = sum(r["wall"] for r in dense)
    dense_den = sum(r["denoiser"] for r in dense)
    lines = [
        f"Built-in video model, {n} held-out prompts, {steps} steps, 1 thread per process:",
        "",
        "| method | whole call | per-frame work (denoiser) | skipped work | PSNR vs dense | SSIM vs dense "
        "| adherence: attributes / all four |",
        "|---|---|---|---|---|---|---|",
    ]
    groups = [(name, runs, 1) for name, runs in single_runs.items()]
    if ranks is not None:
        groups += [(f"{name}, 2 gloo ranks (rank 0)", runs, 2) for name, runs in ranks.items()]
    for name, runs, _ in groups:
        wall, den = sum(r["wall"] for r in runs), sum(r["denoiser"] for r in runs)
        frames = [np.asarray(r["frames"]) for r in runs]
        adh = [adherence(p, f) for p, f in zip(prompts, frames)]
        quality = ""
        if name != "dense":
            psnrs = [psnr(f, d["frames"]) for f, d in zip(frames, dense)]
            finite = [v for v in psnrs if np.isfinite(v)]
            shown = f"{np.mean(finite):.1f} dB (min {min(finite):.1f})" if finite else "identical"
            identical = sum(not np.isfinite(v) for v in psnrs)
            quality = f"{shown}{f', {identical} identical' if identical else ''} | "
            quality += f"{np.mean([ssim(f, d['frames']) for f, d in zip(frames, dense)]):.4f}"
        else:
            quality = " | "
        skipped = f"{np.mean([r['skipped_work'] for r in runs]):.1%}" if "skipped_work" in runs[0] else ""
        lines.append(
            f"| {name} | {wall / n:.3f} s ({dense_wall / wall:.2f}x) | {den / n:.3f} s ({dense_den / den:.2f}x) | "
            f"{skipped} | {quality} | {np.mean([a[0] for a in adh]):.1%} / {np.mean([a[1] for a in adh]):.0%} |"
        )
    lines += [
        "",
        "Where the time goes (seconds per denoiser layer, summed over the profiled prompts, taking turns):",
        "",
    ]
    lines += ["| layer | mode | skipped tiles | dense s | SparseTem s |", "|---|---|---|---|---|"]
    for name, row in profile.items():
        share = row["skipped"] / row["tiles"] if row["tiles"] else 0.0
        lines.append(f"| {name} | {row['mode']} | {share:.1%} | {row['dense_s']:.3f} | {row['sparsetem_s']:.3f} |")
    total_dense = sum(row["dense_s"] for row in profile.values())
    total_sparse = sum(row["sparsetem_s"] for row in profile.values())
    lines.append(f"| all hooked layers | | | {total_dense:.3f} | {total_sparse:.3f} |")
    lines += ["", "One Conv2d(64, 64, 3), 8 frames of 64x64, threshold 0 (min of 7 runs, taking turns):", ""]
    lines += [
        "| changed area per frame | skipped tiles | dense ms | SparseTem ms | speedup | max abs diff |",
        "|---|---|---|---|---|---|",
    ]
    for r in micro_rows:
        lines.append(
            f"| {r['changed_area']:.0%} | {r['skipped_tiles']:.0%} | {r['dense_ms']:.1f} | {r['sparsetem_ms']:.1f} | "
            f"{r['dense_ms'] / r['sparsetem_ms']:.2f}x | {r['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--error-targets", default="0.02,0.2", help="comma-separated; the first also runs on 2 ranks")
    parser.add_argument("--profile-prompts", type=int, default=3)
    parser.add_argument("--skip-ranks", action="store_true", help="leave out the 2-rank rows")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--verify-guidance", help="comma-separated guidance scales: measure every frame's error only")
    args = parser.parse_args()
    prompts = demo_models.random_prompts("video", args.prompts, seed=args.seed)
    targets = [float(t) for t in args.error_targets.split(",")]
    if args.verify_guidance:
        verified(prompts, args.steps, targets[0], [float(g) for g in args.verify_guidance.split(",")])
        return
    micro_rows = micro()
    single_runs = single(prompts, args.steps, targets)
    for runs in single_runs.values():
        for prompt, run in zip(prompts, runs):
            run["prompt"] = prompt
    ranks = None if args.skip_ranks else run_ranks(ranks_worker, 2, prompts, args.steps, targets[0], timeout=7200)[0]
    profile = layer_profile(prompts[: args.profile_prompts], args.steps, targets[0])
    text = summary(single_runs, ranks, profile, micro_rows, args.steps)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        strip = lambda runs: {k: [{f: v for f, v in r.items() if f != "frames"} for r in rs] for k, rs in runs.items()}
        keep = dict(
            single=strip(single_runs),
            ranks=strip(ranks) if ranks else None,
            profile=profile,
            micro=micro_rows,
            summary=text,
        )
        args.out.write_text(json.dumps(keep, indent=1, default=str))


if __name__ == "__main__":
    main()
