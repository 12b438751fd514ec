"""Model calls per rank for every tiny family × method, and wall times on 2 gloo ranks.

    python -m tests.measure_families [--steps 20] [--warmup 2]

Prints one table. Each rank uses one thread; the baseline and BatchStep run on rank 0 while
rank 1 waits, ParaStep on both, so the wall-time ratio is measured in one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import parastep
from tests.distributed import run_ranks
from tests.tiny_pipelines import CASES, IDS, build, count_forwards


def _timed(pipe, kwargs, steps, rank):
    start = time.perf_counter()
    pipe(
        **{**kwargs, "output_type": kwargs.get("output_type", "np") if rank == 0 else "latent"},
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
    )
    return time.perf_counter() - start


def measure(rank: int, steps: int, warmup: int, repeats: int) -> list[dict]:
    rows = []
    for (family, variant), name in zip(CASES, IDS):
        pipe, kwargs = build(family, **variant)
        counter = count_forwards(pipe)
        row = dict(case=name)
        for label, config in [
            ("baseline", None),
            ("parastep-2", parastep.ParaStepConfig(warmup_steps=warmup)),
            ("batchstep-2", parastep.BatchStepConfig(stride=2, warmup_steps=warmup)),
            ("batchstep-3", parastep.BatchStepConfig(stride=3, warmup_steps=warmup)),
        ]:
            everyone = label.startswith("parastep")
            if label.startswith("batchstep") and family == "cogvideox" and variant:
                row[label] = "refused"  # CogVideoXDPMScheduler feeds state back through step()
                continue
            walls = []
            for _ in range(repeats):
                dist.barrier()
                if rank > 0 and not everyone:
                    continue
                handle = parastep.apply(pipe, config) if config else None
                counter[0] = 0
                walls.append(_timed(pipe, kwargs, steps, rank))
                if handle:
                    handle.remove()
            calls = [None] * 2
            dist.all_gather_object(calls, counter[0] if (rank == 0 or everyone) else None)
            row[label] = "/".join(str(c) for c in calls if c is not None)
            if walls:
                row[label + " s"] = statistics.median(walls)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rows = run_ranks(measure, 2, args.steps, args.warmup, args.repeats, timeout=1800)[0]
    cols = [
        "case",
        "baseline",
        "parastep-2",
        "batchstep-2",
        "batchstep-3",
        "baseline s",
        "parastep-2 s",
        "batchstep-2 s",
        "batchstep-3 s",
    ]
    print(
        f"T={args.steps} W={args.warmup}; calls = denoiser forward passes per rank (rank0/rank1 for ParaStep); "
        f"wall = median of {args.repeats} end-to-end calls on rank 0, 1 thread per rank"
    )
    table = [cols] + [
        [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols] for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    for line in table:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)))


if __name__ == "__main__":
    main()
