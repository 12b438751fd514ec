"""Measures SparseTem on the built-in video model: speed and quality against dense, alone and with
ParaStep-2 on 2 gloo ranks; and, on one large layer, that skipped tiles are skipped work.

    PYTHONPATH=$PWD .venv/bin/python tests/measure_sparsetem.py --prompts 20 --seed 7 --out runs/sparsetem.json

Every rank uses one thread. Dense and SparseTem runs alternate prompt by prompt, so load from
other processes hits both alike; speedups are ratios of sums over the same prompts. "denoiser"
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


def timed_pipe(pipe):
    """Adds torch hooks that sum the time spent in the denoiser's forward; returns the counter."""
    spent = [0.0, 0.0]
    pipe.unet.register_forward_pre_hook(lambda m, a: spent.__setitem__(1, time.perf_counter()))
    pipe.unet.register_forward_hook(lambda m, a, o: spent.__setitem__(0, spent[0] + time.perf_counter() - spent[1]))
    return spent


def generate(pipe, spent, prompt: str, steps: int) -> tuple[np.ndarray, float, float]:
    spent[0] = 0.0
    start = time.perf_counter()
    frames = pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).frames[0]
    return frames, time.perf_counter() - start, spent[0]


def adherence(prompt: str, frames: np.ndarray) -> tuple[float, bool]:
    checks = demo_models.check("video", prompt, frames)
    return sum(checks.values()) / len(checks), all(checks.values())


def single(prompts: list[str], steps: int, config: parastep.SparseTemConfig) -> dict:
    torch.set_num_threads(1)
    pipe = demo_models.load_pipeline("video")
    spent = timed_pipe(pipe)
    generate(pipe, spent, prompts[0], 2)  # warm both paths once
    rows, layer_rows, dense_frames = [], {}, {}
    for i, prompt in enumerate(prompts):
        runs = {}
        for method in ("dense", "sparsetem") if i % 2 == 0 else ("sparsetem", "dense"):
            handle = parastep.apply(pipe, config) if method == "sparsetem" else None
            runs[method] = generate(pipe, spent, prompt, steps)
            if handle is not None:
                stats = parastep.SparseTemStats.of(handle)
                handle.remove()
        (dense, dense_s, dense_den), (sparse, sparse_s, sparse_den) = runs["dense"], runs["sparsetem"]
        dense_frames[prompt] = dense
        rows.append(
            dict(
                prompt=prompt,
                dense_s=dense_s,
                sparsetem_s=sparse_s,
                dense_denoiser_s=dense_den,
                sparsetem_denoiser_s=sparse_den,
                psnr=psnr(sparse, dense),
                ssim=ssim(sparse, dense),
                adherence_dense=adherence(prompt, dense),
                adherence_sparsetem=adherence(prompt, sparse),
                skipped_work=stats.skipped_work,
                max_audited_error=stats.max_error,
            )
        )
        for layer in stats.layers:
            acc = layer_rows.setdefault(layer.name, dict(mode=layer.mode, seconds=0.0, tiles=0, skipped=0, fallbacks=0))
            acc["seconds"] += layer.seconds
            acc["tiles"] += layer.tiles
            acc["skipped"] += layer.skipped
            acc["fallbacks"] += layer.fallbacks
        print(f"{i + 1}/{len(prompts)} {prompt!r}: dense {dense_s:.2f}s sparsetem {sparse_s:.2f}s", flush=True)
    dense_layers = dense_layer_times(pipe, prompts[0], steps)
    return dict(rows=rows, layers=layer_rows, dense_layers=dense_layers, dense_frames=list(dense_frames.values()))


def dense_layer_times(pipe, prompt: str, steps: int) -> dict[str, float]:
    """Seconds in each denoiser conv/norm layer during one dense call (torch hooks), for comparison."""
    seconds: dict[str, float] = {}
    handles = []
    for name, module in pipe.unet.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm)):
            started = [0.0]
            key = f"denoiser.{name}"
            handles.append(
                module.register_forward_pre_hook(lambda m, a, s=started: s.__setitem__(0, time.perf_counter()))
            )
            handles.append(
                module.register_forward_hook(
                    lambda m, a, o, s=started, k=key: seconds.__setitem__(
                        k, seconds.get(k, 0.0) + time.perf_counter() - s[0]
                    )
                )
            )
    pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent")
    for h in handles:
        h.remove()
    return seconds


def ranks_worker(rank: int, prompts: list[str], steps: int, config: parastep.SparseTemConfig) -> dict:
    pipe = demo_models.load_pipeline("video")
    spent = timed_pipe(pipe)
    chains = {
        "parastep2": [parastep.ParaStepConfig(warmup_steps=5)],
        "sparsetem+parastep2": [config, parastep.ParaStepConfig(warmup_steps=5)],
    }
    for chain in chains.values():  # warm both paths once
        handle = parastep.apply(pipe, chain)
        generate(pipe, spent, prompts[0], 8)
        handle.remove()
    out: dict[str, list] = {name: [] for name in chains}
    for i, prompt in enumerate(prompts):
        for name in list(chains) if i % 2 == 0 else list(chains)[::-1]:
            handle = parastep.apply(pipe, chains[name])
            frames, wall, den = generate(pipe, spent, prompt, steps)
            out[name].append(dict(frames=frames if rank == 0 else 0, wall=wall, denoiser=den))
            handle.remove()
    return out


def micro(frames: int = 8, channels: int = 64, size: int = 64, reps: int = 5) -> list[dict]:
    """One Conv2d(64, 64, 3) on 8 frames of 64x64 whose later frames change in a square covering
    a fraction of the frame: dense vs SparseTem (threshold 0: exact up to rounding)."""
    from diffusers.hooks import HookRegistry

    from parastep.strategies.sparsetem import _Diff, _Part

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for fraction in (0.0, 1 / 16, 0.25, 1.0):
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        x = torch.randn(1, channels, size, size).repeat(frames, 1, 1, 1)
        side = round(size * fraction**0.5)
        for f in range(1, frames):
            x[f, :, :side, :side] += torch.randn(channels, side, side)
        config = parastep.SparseTemConfig(
            threshold=0.0, adaptive=False, audit_every=0, min_macs=0, retry_every=1, dense_above=1.0
        )
        part = _Part("denoiser", stream=False)
        hook = _Diff("conv", part, conv, config)
        times = {"dense": 0.0, "sparsetem": 0.0}
        with torch.no_grad():
            dense = conv(x)
            HookRegistry.check_if_exists_or_initialize(conv).register_hook(hook, "sparsetem")
            part.clip = frames
            sparse = conv(x)
            for _ in range(reps):  # interleaved
                for name in times:
                    part.clip = frames if name == "sparsetem" else None
                    start = time.perf_counter()
                    conv(x)
                    times[name] += (time.perf_counter() - start) / reps
        rows.append(
            dict(
                changed_area=fraction,
                skipped_tiles=hook.tally.skipped / hook.tally.tiles,
                dense_ms=times["dense"] * 1e3,
                sparsetem_ms=times["sparsetem"] * 1e3,
                max_abs_diff=float((sparse - dense).abs().max()),
            )
        )
    return rows


def _mean_db(values: list[float]) -> str:
    finite = [v for v in values if np.isfinite(v)]
    return f"{np.mean(finite):.1f} dB (min {min(finite):.1f})" if finite else "identical"


def summary(a: dict, b: dict | None, micro_rows: list[dict], steps: int, target: float) -> str:
    rows = a["rows"]
    n = len(rows)
    total = {k: sum(r[k] for r in rows) for k in ("dense_s", "sparsetem_s", "dense_denoiser_s", "sparsetem_denoiser_s")}
    adh = {
        m: (np.mean([r[f"adherence_{m}"][0] for r in rows]), np.mean([r[f"adherence_{m}"][1] for r in rows]))
        for m in ("dense", "sparsetem")
    }
    call_x = total["dense_s"] / total["sparsetem_s"]
    den_x = total["dense_denoiser_s"] / total["sparsetem_denoiser_s"]
    lines = [
        f"Built-in video model, {n} held-out prompts, {steps} steps, error_target {target}, 1 thread:",
        "",
        "| | whole call | denoiser (per-frame work) | PSNR vs dense | SSIM vs dense | adherence (attrs / all four) |",
        "|---|---|---|---|---|---|",
        f"| dense | {total['dense_s'] / n:.3f} s | {total['dense_denoiser_s'] / n:.3f} s | | | "
        f"{adh['dense'][0]:.1%} / {adh['dense'][1]:.0%} |",
        f"| SparseTem | {total['sparsetem_s'] / n:.3f} s ({call_x:.2f}x) | {total['sparsetem_denoiser_s'] / n:.3f} s "
        f"({den_x:.2f}x) | {_mean_db([r['psnr'] for r in rows])} | {np.mean([r['ssim'] for r in rows]):.4f} | "
        f"{adh['sparsetem'][0]:.1%} / {adh['sparsetem'][1]:.0%} |",
        "",
        f"Skipped work (multiply-adds of the diff layers): {np.mean([r['skipped_work'] for r in rows]):.1%}; "
        f"largest audited layer error {max(r['max_audited_error'] or 0 for r in rows):.4f}.",
    ]
    if b is not None:
        lines += [
            "",
            "2 gloo ranks (rank 0's wall time, 1 thread each):",
            "",
            "| | whole call | vs single-process dense | PSNR vs dense | adherence (all four) |",
            "|---|---|---|---|---|",
        ]
        for name, key in (("ParaStep-2", "parastep2"), ("SparseTem + ParaStep-2", "sparsetem+parastep2")):
            runs = b[key]
            wall = sum(r["wall"] for r in runs)
            frames = [np.asarray(r["frames"]) for r in runs]
            psnrs = [psnr(f, d) for f, d in zip(frames, b["dense"])]
            ok = np.mean([adherence(q, f)[1] for q, f in zip(b["prompts"], frames)])
            lines.append(
                f"| {name} | {wall / n:.3f} s | {total['dense_s'] / wall:.2f}x | {_mean_db(psnrs)} | {ok:.0%} |"
            )
    lines += ["", "Where the time goes (summed over all prompts; dense column: one dense call x prompts):", ""]
    lines += ["| layer | mode | skipped tiles | SparseTem s | dense s |", "|---|---|---|---|---|"]
    for name, acc in a["layers"].items():
        dense_t = a["dense_layers"].get(name, 0.0) * n
        skipped = acc["skipped"] / acc["tiles"] if acc["tiles"] else 0.0
        lines.append(f"| {name} | {acc['mode']} | {skipped:.1%} | {acc['seconds']:.3f} | {dense_t:.3f} |")
    lines += ["", "One Conv2d(64, 64, 3), 8 frames of 64x64, threshold 0:", ""]
    lines += [
        "| changed area | skipped tiles | dense ms | SparseTem ms | speedup | max abs diff |",
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
    parser.add_argument("--error-target", type=float, default=0.02)
    parser.add_argument("--skip-ranks", action="store_true", help="leave out the 2-rank ParaStep rows")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    prompts = demo_models.random_prompts("video", args.prompts, seed=args.seed)
    config = parastep.SparseTemConfig(error_target=args.error_target)
    micro_rows = micro()
    a = single(prompts, args.steps, config)
    b = None
    if not args.skip_ranks:
        results = run_ranks(ranks_worker, 2, prompts, args.steps, config, timeout=3600)
        b = dict(results[0], prompts=prompts, dense=a["dense_frames"])
    text = summary(a, b, micro_rows, args.steps, args.error_target)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        single_rows = {k: v for k, v in a.items() if k != "dense_frames"}
        keep = dict(single=single_rows, micro=micro_rows, summary=text, config=repr(config))
        args.out.write_text(
            json.dumps(keep, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
        )


if __name__ == "__main__":
    main()
