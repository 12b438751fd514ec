"""The latency panel: numbers as a Markdown table and a dict, and the per-rank timeline."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from launcher.protocol import CompareOutput, RunOutput
from launcher.request import METHOD_LABELS

# Below this PSNR against the baseline an output differs visibly from it (the built-in image
# model's BatchStep settings that broke measured 1–16 dB; good ones 25 dB and up).
QUALITY_FLOOR_DB = 20.0

ACTION_COLOURS = {"computed": "#2563eb", "reused": "#cbd5e1", "received": "#16a34a", "precomputed": "#f59e0b"}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _label(run: RunOutput) -> str:
    name = METHOD_LABELS[run.method]
    ranks = len(run.stats)
    return f"{name} ({ranks} ranks)" if run.method == "parastep" else name


def _calls(run: RunOutput) -> str:
    return " · ".join(str(c) for c in run.model_calls)


def run_numbers(run: RunOutput) -> dict[str, Any]:
    return {
        "method": run.method,
        "wall_s": round(run.wall_s, 4),
        "denoise_s": round(run.denoise_s, 4) if run.denoise_s is not None else None,
        "ideal_speedup": round(run.ideal_speedup, 4),
        "ranks": len(run.stats),
        "model_calls_per_rank": run.model_calls,
        "bytes_communicated": run.bytes_communicated,
        "note": run.note,
    }


def compare_numbers(result: CompareOutput) -> dict[str, Any]:
    return {
        "baseline": run_numbers(result.baseline),
        "method": run_numbers(result.method),
        "speedup": round(result.speedup, 4),
        "speedup_denoise": round(result.speedup_denoise, 4) if result.speedup_denoise is not None else None,
        "ideal_speedup": round(result.method.ideal_speedup, 4),
        "psnr_db": round(result.psnr, 3) if result.psnr != float("inf") else "inf",
        "below_quality_floor": result.psnr < QUALITY_FLOOR_DB,
        "ssim": round(result.ssim, 4),
    }


def compare_markdown(result: CompareOutput) -> str:
    base, fast = result.baseline, result.method
    psnr = "∞ (identical)" if result.psnr == float("inf") else f"{result.psnr:.2f} dB"
    rows = [
        f"| | Baseline | {_label(fast)} |",
        "|---|---:|---:|",
        f"| Wall time (whole call) | {base.wall_s:.2f} s | {fast.wall_s:.2f} s |",
        f"| Speedup | 1.00× | **{result.speedup:.2f}×** |",
        *(
            [
                f"| Denoising time (no decoding) | {base.denoise_s:.2f} s | {fast.denoise_s:.2f} s |",
                f"| Denoising speedup | 1.00× | **{result.speedup_denoise:.2f}×** |",
            ]
            if result.speedup_denoise is not None
            else []
        ),
        f"| Ideal speedup for these settings | 1.00× | {fast.ideal_speedup:.2f}× |",
        f"| Model calls per rank | {_calls(base)} | {_calls(fast)} |",
        f"| Bytes communicated | {human_bytes(base.bytes_communicated)} | {human_bytes(fast.bytes_communicated)} |",
        f"| PSNR vs baseline | — | {psnr} |",
        f"| SSIM vs baseline | — | {result.ssim:.4f} |",
    ]
    note = f"\n\n⚠️ {fast.note}" if fast.note else ""
    if result.psnr < QUALITY_FLOOR_DB:
        note += (
            f"\n\n⚠️ **PSNR {result.psnr:.1f} dB is below {QUALITY_FLOOR_DB:g} dB**: this result differs visibly "
            "from the baseline; more warm-up steps or a smaller stride bring it closer."
        )
    return "### Latency panel\n\n" + "\n".join(rows) + note


def run_markdown(run: RunOutput) -> str:
    rows = [
        f"| | {_label(run)} |",
        "|---|---:|",
        f"| Wall time (whole call) | {run.wall_s:.2f} s |",
        *([f"| Denoising time (no decoding) | {run.denoise_s:.2f} s |"] if run.denoise_s is not None else []),
        f"| Ideal speedup for these settings | {run.ideal_speedup:.2f}× |",
        f"| Model calls per rank | {_calls(run)} |",
        f"| Bytes communicated | {human_bytes(run.bytes_communicated)} |",
    ]
    note = f"\n\n⚠️ {run.note}" if run.note else ""
    return "### Latency\n\n" + "\n".join(rows) + note


def timeline(runs: list[RunOutput]) -> Figure:
    """One row per (run, rank), one box per step coloured by what that rank did for it."""
    rows: list[tuple[str, list[tuple[int, str]]]] = []
    for run in runs:
        for stats in run.stats:
            records = [(r.step, r.action) for r in stats.records]
            if not records:  # the baseline computes every step
                records = [(i, "computed") for i in range(stats.steps)]
            rows.append((f"{METHOD_LABELS[run.method]} · rank {stats.rank}", records))
    fig = Figure(figsize=(8, 1.1 + 0.4 * len(rows)), dpi=100)  # no pyplot: no global state, any thread
    ax = fig.subplots()
    for y, (_, records) in enumerate(reversed(rows)):
        for step, action in records:
            colour = ACTION_COLOURS.get(action, "#000000")
            ax.barh(y, 0.9, left=step + 0.05, height=0.7, color=colour, edgecolor="none")
    ax.set_yticks(range(len(rows)), [name for name, _ in reversed(rows)])
    ax.set_xlabel("denoising step")
    ax.set_xlim(0, max((len(r) for _, r in rows), default=1))
    handles = [Patch(color=c, label=a) for a, c in ACTION_COLOURS.items()]
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig
