"""What users see against what the engine delivers: the app's Compare and the benchmark for the
same settings, in one run.

    python -m launcher.bench --app                              # the built-in models at their defaults
    python -m launcher.bench --app --models image --repeats 5

For each built-in model at the app's defaults (the model's steps and guidance, warm-up 2): the
app, started as ``bash scripts/start.sh`` starts it (2 CPU ranks), serves ``--repeats`` Compare
requests (ParaStep against the baseline, seeds 0..N-1) through gradio_client by name, and the
panel's speedups are kept (whole call and denoising). Then, with the app stopped, the engine
benchmark (:mod:`launcher.bench`) measures the baseline on one rank and ParaStep on 2 ranks for
the same settings and seeds. Prints one row per model: both medians, their ratio, the ideal, and
the cores other programs on this machine kept busy during the app's ParaStep runs (median: a
parallel run feels them first, so a figure above about 0.1 means the app's column is low).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import demo_models
from launcher import bench
from launcher.models import builtin_name, describe
from launcher.testing import AppProcess

APP_ARGS = ["--ranks", "2"]
WARMUP = 2  # the app's default


def measure_app(kinds: list[str], repeats: int) -> dict[str, dict[str, Any]]:
    """Per model: the Compare panel's numbers of ``repeats`` requests at the app's defaults, on
    the model's first example prompt (what the page opens with)."""
    from gradio_client import Client

    found: dict[str, dict[str, Any]] = {}
    with AppProcess([*APP_ARGS, "--builtins", ",".join(kinds)]) as app:
        client = Client(app.url, verbose=False)
        for kind in kinds:
            model = builtin_name(kind)
            info = describe(model, demo_models.load_pipeline(kind), kind)
            runs = []
            for seed in range(-1, repeats):  # seed -1: one untimed warm-up request per model
                result = client.predict(
                    prompt=info.examples[0], model=model, method="parastep", seed=max(seed, 0), api_name="/compare"
                )
                numbers = result[9] if isinstance(result[9], dict) else json.loads(result[9])
                if seed >= 0:
                    runs.append(numbers)
            found[kind] = {
                "steps": info.default_steps,
                "speedup": statistics.median(r["speedup"] for r in runs),
                "speedup_denoise": statistics.median(r["speedup_denoise"] for r in runs),
                "ideal": runs[0]["ideal_speedup"],
                # other programs on this machine slow a parallel run first: this says they were idle
                "other_cores": statistics.median(r["method"]["other_cores"] for r in runs),
                "runs": runs,
            }
    return found


def measure_engine(kind: str, steps: int, repeats: int, out: Path) -> dict[str, Any]:
    """The benchmark's ParaStep-2 row for the same settings."""
    argv = ["--models", kind, "--steps", str(steps), "--warmup", str(WARMUP), "--seeds", str(repeats)]
    argv += ["--ranks", "2", "--strides", "--stress-degree", "0", "--hook-pairs", "0", "--out", str(out)]
    argv += ["--only", "baseline-1rank", "parastep-2"]
    bench.main(argv)
    rows = json.loads((out / "bench.json").read_text())["rows"]
    row = next(r for r in rows if r["method"] == "parastep-2")
    return {"speedup": row["speedup_vs_1rank"], "ideal": row["ideal_speedup"]}


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | steps | warm-up | app: whole call | app: denoising | engine (bench) | app / engine | ideal "
        "| other programs (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['steps']} | {WARMUP} | {r['app']:.2f}× | {r['app_denoise']:.2f}× | "
            f"{r['engine']:.2f}× | {r['app'] / r['engine']:.2f} | {r['ideal']:.2f}× | {r['other_cores']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launcher.bench --app", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=["image", "video", "audio"], help="built-in kinds to measure")
    p.add_argument("--repeats", type=int, default=5, help="Compare requests (and benchmark seeds) per model")
    p.add_argument("--out", type=Path, default=Path("runs/app_bench"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    app = measure_app(args.models, args.repeats)
    rows = []
    for kind in args.models:
        steps = app[kind]["steps"]
        with tempfile.TemporaryDirectory() as tmp:
            engine = measure_engine(kind, steps, args.repeats, Path(tmp))
        rows.append(
            dict(
                model=kind,
                steps=steps,
                app=app[kind]["speedup"],
                app_denoise=app[kind]["speedup_denoise"],
                engine=engine["speedup"],
                ideal=app[kind]["ideal"],
                other_cores=app[kind]["other_cores"],
            )
        )
    table = format_table(rows)
    print("\nThe app's Compare (median of the panel's speedups) against the engine benchmark, same settings:\n")
    print(table)
    (args.out / "app_bench.json").write_text(json.dumps(dict(rows=rows, app=app), indent=2, default=str))
    print(f"\nwrote {args.out / 'app_bench.json'}")
    return 0
