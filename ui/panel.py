"""The latency panel: numbers as a Markdown table and a dict, and the per-rank timeline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from launcher.methods import MethodInfo
from launcher.protocol import CompareOutput, RaceOutput, RunOutput
from launcher.request import METHOD_LABELS

# Below this PSNR against the baseline an output differs visibly from it (the built-in image
# model's BatchStep settings that broke measured 1–16 dB; good ones 25 dB and up).
QUALITY_FLOOR_DB = 20.0

# Other programs' load (cores, on average) above which the panel says it slowed a parallel run:
# an idle machine measures 0.00-0.06 (CPU times count 10 ms ticks: a short run's figure is coarse,
# so the bar rises by OTHER_LOAD_SLACK_S over the run's seconds); an idle Gradio page in Chromium 0.1
OTHER_LOAD_NOTE = 0.08
OTHER_LOAD_SLACK_S = 0.02

ACTION_COLOURS = {"computed": "#2563eb", "reused": "#cbd5e1", "received": "#16a34a", "precomputed": "#f59e0b"}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _label(run: RunOutput) -> str:
    return run.label


def psnr_text(value: float) -> str:
    return "∞ (identical)" if value == float("inf") else f"{value:.2f} dB"


def _calls(run: RunOutput) -> str:
    return " · ".join(str(c) for c in run.model_calls)


def _load(run: RunOutput) -> str:
    return "—" if run.other_cores is None else f"{run.other_cores:.2f} cores"


def load_note(runs: list[RunOutput]) -> str:
    """A warning when other programs kept a parallel run's machine busy (empty otherwise)."""
    loaded = [
        r
        for r in runs
        if len(r.stats) > 1 and (r.other_cores or 0.0) >= OTHER_LOAD_NOTE + OTHER_LOAD_SLACK_S / max(r.wall_s, 0.01)
    ]
    if not loaded:
        return ""
    worst = max(loaded, key=lambda r: r.other_cores or 0.0)
    return (
        f"\n\n⚠️ Other programs kept {worst.other_cores:.2f} of a core busy on this machine during the "
        f"{worst.label} run (a browser open on this machine counts). Its ranks use every core and wait for "
        "the slowest each window, so that slows it more than a one-rank run; for the figures the benchmark "
        "gives (`python -m launcher.bench --app`), open the app from another machine or close them."
    )


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
        "other_cores": None if run.other_cores is None else round(run.other_cores, 3),
        "sparsetem": _sparsetem_numbers(run),
    }


def _sparsetem_numbers(run: RunOutput) -> dict[str, Any] | None:
    st = run.sparsetem
    if st is None:
        return None
    return {
        "parts": list(st.parts),
        "error_target": st.error_target,
        "skipped_work": round(st.skipped_work, 4),
        "seconds": round(st.seconds, 4),
        "max_error": None if st.max_error is None else round(st.max_error, 5),
        "layers": [
            {"name": layer.name, "mode": layer.mode, "skipped_fraction": round(layer.skipped_fraction, 4)}
            | {"seconds": round(layer.seconds, 4), "error": layer.error}
            for layer in st.layers
        ],
    }


def sparsetem_markdown(run: RunOutput) -> str:
    """SparseTem's effect: work skipped, time in its layers, measured error, the busiest layers."""
    st = run.sparsetem
    if st is None:
        return ""
    worst = "not audited" if st.max_error is None else f"{st.max_error:.4f}"
    rows = [
        f"\n\n#### SparseTem ({', '.join(st.parts)})\n",
        f"Skipped **{st.skipped_work:.0%}** of the multiply-adds of its diff layers; {st.seconds:.2f} s in its "
        f"layers; largest audited relative error {worst} (target {st.error_target:g}).\n",
        "| Layer | Mode | Skipped tiles | Time | Error |",
        "|---|---|---:|---:|---:|",
    ]
    for layer in sorted(st.layers, key=lambda layer: -layer.seconds)[:8]:
        error = "—" if layer.error is None else f"{layer.error:.4f}"
        rows.append(
            f"| {layer.name} | {layer.mode} | {layer.skipped_fraction:.0%} | {layer.seconds * 1e3:.1f} ms | {error} |"
        )
    if len(st.layers) > 8:
        rows.append(f"\n{len(st.layers) - 8} more layer(s) in the raw numbers.")
    return "\n".join(rows)


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
    psnr = psnr_text(result.psnr)
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
        f"| Other programs' load on this machine | {_load(base)} | {_load(fast)} |",
    ]
    note = f"\n\n⚠️ {fast.note}" if fast.note else ""
    note += load_note([base, fast])
    note += sparsetem_markdown(fast)
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
        f"| Other programs' load on this machine | {_load(run)} |",
    ]
    note = (f"\n\n⚠️ {run.note}" if run.note else "") + load_note([run])
    return "### Latency\n\n" + "\n".join(rows) + note + sparsetem_markdown(run)


def race_numbers(result: RaceOutput) -> dict[str, Any]:
    return {
        "baseline": run_numbers(result.baseline),
        "baseline_picked": result.baseline_picked,
        "methods": [compare_numbers(r) | {"label": r.method.label} for r in result.results],
    }


def race_markdown(result: RaceOutput, info: Mapping[str, MethodInfo]) -> str:
    """One row per method: wall and denoising time, speedups, ideal, calls, bytes, quality; then
    one line per method saying what it trades."""
    base = result.baseline
    rows = [
        "| Method | Wall (denoising) | Speedup (denoising) | Ideal | Calls per rank | Bytes | PSNR · SSIM |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def wall(run: RunOutput) -> str:
        return f"{run.wall_s:.2f} s" + (f" ({run.denoise_s:.2f} s)" if run.denoise_s is not None else "")

    if result.baseline_picked:
        rows.append(
            f"| {base.label} | {wall(base)} | 1.00× | 1.00× | {_calls(base)} | "
            f"{human_bytes(base.bytes_communicated)} | — |"
        )
    for r in result.results:
        run = r.method
        sd = f" ({r.speedup_denoise:.2f}×)" if r.speedup_denoise is not None else ""
        flag = " ⚠️" if r.psnr < QUALITY_FLOOR_DB else ""
        rows.append(
            f"| {run.label} | {wall(run)} | **{r.speedup:.2f}×**{sd} | {run.ideal_speedup:.2f}× | {_calls(run)} | "
            f"{human_bytes(run.bytes_communicated)} | {psnr_text(r.psnr)}{flag} · {r.ssim:.3f} |"
        )
    lines = [f"- **{info[run.method].label}**: {info[run.method].trade}" for run in result.runs]
    notes = [f"⚠️ {run.label}: {run.note}" for run in result.runs if run.note]
    if not result.baseline_picked:
        notes.append(f"The baseline ran first as the reference ({base.wall_s:.2f} s).")
    if any(r.psnr < QUALITY_FLOOR_DB for r in result.results):
        notes.append(f"⚠️ marks a PSNR below {QUALITY_FLOOR_DB:g} dB: visibly different from the baseline.")
    extra = "".join(sparsetem_markdown(r.method) for r in result.results)
    extra += load_note(result.runs)
    return "### Race\n\n" + "\n".join(rows) + "\n\n" + "\n".join(lines + notes) + extra


def timeline(runs: list[RunOutput], labels: list[str] | None = None) -> Figure:
    """One row per (run, rank), one box per step coloured by what that rank did for it."""
    rows: list[tuple[str, list[tuple[int, str]]]] = []
    for i, run in enumerate(runs):
        name = labels[i] if labels else METHOD_LABELS[run.method]
        for stats in run.stats:
            records = [(r.step, r.action) for r in stats.records]
            if not records:  # the baseline computes every step
                records = [(i, "computed") for i in range(stats.steps)]
            rows.append((f"{name} · rank {stats.rank}", records))
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
