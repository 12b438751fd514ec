"""ParaStep against its contestants (AsyncDiff, CFG-parallel) on gloo ranks: bytes per pipeline
call, model calls per rank, PSNR/SSIM against the baseline, wall time.

    python -m tests.measure_contestants [--model image|sd] [--steps 50] [--warmup 5] [--guidance 3] [--ranks 2]

Every rank uses one thread. The baseline runs on rank 0 while the others wait; each method runs
on all ranks. With ``--ranks 3`` the rows are ParaStep-3, AsyncDiff with 3 stages and AsyncDiff
with 2 stages and stride 2 (CFG-parallel needs exactly 2 ranks).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.distributed as dist

import parastep
from tests.distributed import run_ranks


def _load(model: str, guidance: float):
    if model == "image":
        from demo_models import load_pipeline

        prompt = "a large red circle in the center on a blue background"
        return load_pipeline("image"), dict(prompt=prompt, guidance_scale=guidance)
    from tests.tiny_pipelines import build

    pipe, kwargs = build(model)
    return pipe, {**kwargs, "guidance_scale": guidance}


def _methods(ranks: int, warmup: int) -> list[tuple[str, parastep.StrategyConfig | None]]:
    if ranks == 2:
        return [
            ("baseline", None),
            ("parastep-2", parastep.ParaStepConfig(warmup_steps=warmup)),
            ("asyncdiff-2", parastep.AsyncDiffConfig(stages=2, warmup_steps=warmup)),
            ("cfg-parallel", parastep.CFGParallelConfig()),
        ]
    return [
        ("baseline", None),
        ("parastep-3", parastep.ParaStepConfig(warmup_steps=warmup)),
        ("asyncdiff-3", parastep.AsyncDiffConfig(stages=3, warmup_steps=warmup)),
        ("asyncdiff-2-stride-2", parastep.AsyncDiffConfig(stages=2, stride=2, warmup_steps=warmup)),
    ]


def measure(rank: int, model: str, steps: int, warmup: int, guidance: float, ranks: int) -> list[dict]:
    pipe, kwargs = _load(model, guidance)
    rows = []
    for label, config in _methods(ranks, warmup):
        dist.barrier()
        if config is None and rank > 0:
            rows.append(dict(method=label))
            continue
        handle = parastep.apply(pipe, config) if config else None
        start = time.perf_counter()
        out = pipe(
            **{**kwargs, "output_type": "np" if rank == 0 else "latent"},
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
        )
        wall = time.perf_counter() - start
        row: dict = dict(method=label, wall_s=wall)
        if rank == 0:
            row["output"] = np.asarray(next(iter(out.values())))
        if handle:
            s = handle.last_stats
            row.update(calls=s.model_calls, sent=s.bytes_sent, received=s.bytes_received)
            split = getattr(handle.strategy, "split", None)
            if split:
                row["split"] = " | ".join(",".join(stage) for stage in split)
            handle.remove()
        rows.append(row)
    return rows


def main() -> None:
    from launcher.quality import psnr, ssim

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="image", help="'image' (the built-in model) or a tiny family (sd, sdxl, ...)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--ranks", type=int, default=2, choices=(2, 3))
    args = p.parse_args()
    results = run_ranks(measure, args.ranks, args.model, args.steps, args.warmup, args.guidance, args.ranks)
    print(f"{args.model}: {args.steps} steps, warm-up {args.warmup}, guidance {args.guidance}, {args.ranks} gloo ranks")
    print(
        "| method | model calls per rank | bytes sent per rank | bytes per call (all ranks) | PSNR dB | SSIM | wall s |"
    )
    print("|---|---|---|---|---|---|---|")
    base = results[0][0]
    for i, row in enumerate(results[0]):
        per_rank = [r[i] for r in results]
        calls = "/".join(str(r.get("calls", "-")) for r in per_rank) if "calls" in row else "all on rank 0"
        sent = "/".join(str(r.get("sent", 0)) for r in per_rank)
        total = sum(r.get("sent", 0) for r in per_rank)
        quality = (psnr(row["output"], base["output"]), ssim(row["output"], base["output"]))
        print(
            f"| {row['method']} | {calls} | {sent} | {total} | {quality[0]:.2f} | {quality[1]:.4f} | "
            f"{max(r.get('wall_s', 0) for r in per_rank):.2f} |"
        )
    for row in results[0]:
        if "split" in row:
            print(f"{row['method']} stages: {row['split']}")


if __name__ == "__main__":
    main()
