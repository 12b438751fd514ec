"""The benchmark in a tiny configuration: the table's structure, and every figure computed."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from launcher.testing import ROOT
from tests.tiny_pipelines import save_tiny_sd

pytestmark = pytest.mark.slow  # starts the app or the benchmark as subprocesses

STEPS, WARMUP = 8, 2


def test_bench_table(tmp_path):
    model = save_tiny_sd(tmp_path)
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        "-m",
        "launcher.bench",
        "--models",
        "--model",
        str(model),
        "--steps",
        str(STEPS),
        "--warmup",
        str(WARMUP),
        "--seeds",
        "2",
        "--ranks",
        "2",
        "--device",
        "cpu",  # gloo ranks on any machine: the stress session below needs 3
        "--strides",
        "2",
        "4",
        "--stress-steps",
        "6",
        "--stress-degree",
        "3",
        "--hook-pairs",
        "3",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "main 1/" in proc.stderr and "stress" in proc.stderr  # progress is shown
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["session", "model", "method"] and set(lines[1]) <= {"-", " "}
    assert "backend:device" in lines[0].split()
    result = json.loads((out / "bench.json").read_text())
    rows = result["rows"]
    assert 0 <= result["steal_share"] < 1 and any(line.startswith("host: ") for line in lines)
    assert (result["backend"], result["device"]) == ("gloo", "cpu") and {r["backend"] for r in rows} == {"gloo:cpu"}
    hooks = result["hook_cost"]
    assert list(hooks) == [rows[0]["model"]] and hooks[rows[0]["model"]]["pairs"] == 3
    h = hooks[rows[0]["model"]]
    assert math.isfinite(h["median_pct"]) and h["median_pct"] != 0
    assert h["step_ms"] > 0 and h["pct_of_step"] == 100 * h["us_per_step"] / (1000 * h["step_ms"]) != 0
    assert any(line.strip().startswith(rows[0]["model"] + ": median") for line in lines)
    assert (out / "bench.png").stat().st_size > 1000
    by = {(r["session"], r["method"]): r for r in rows}
    assert set(by) == {
        ("main", m)
        for m in (
            "baseline-1rank",
            "baseline-allcores",
            "baseline-busy",
            "parastep-1",
            "parastep-2",
            "batchstep-2",
            "batchstep-4",
            "asyncdiff-2",
            "cfg-parallel",
        )
    } | {
        ("stress", m)
        for m in (
            "baseline-1rank",
            "parastep-2",
            "parastep-3",
            "batchstep-4",
            "asyncdiff-2",
            "asyncdiff-2-stride-2",
            "cfg-parallel",
        )
    }
    for r in rows:  # every printed row is in the table
        assert any(line.split()[:3] == [r["session"], r["model"], r["method"]] for line in lines)
        assert 0 < r["wall_min_s"] <= r["wall_median_s"] <= r["wall_max_s"]
    main = {m: r for (s, m), r in by.items() if s == "main"}
    assert main["baseline-1rank"]["speedup_vs_1rank"] == 1.0 and main["baseline-1rank"]["psnr_db"] == math.inf
    assert main["parastep-1"]["psnr_db"] == math.inf  # the hooks alone change nothing
    speedups = {r["speedup_vs_1rank"] for r in main.values()}
    assert len(speedups) == len(main)  # measured, not constant
    assert main["parastep-2"]["ideal_speedup"] == STEPS / (WARMUP + math.ceil((STEPS - WARMUP) / 2))
    assert main["parastep-2"]["model_calls_per_rank"] == f"{WARMUP + 3}/{WARMUP + 3}"
    assert main["batchstep-2"]["model_calls_per_rank"] == str(WARMUP + 3)
    assert main["batchstep-4"]["model_calls_per_rank"] == str(WARMUP + 2)
    assert main["parastep-2"]["bytes_per_call"] > 0 and main["batchstep-2"]["bytes_per_call"] == 0
    for m in ("parastep-2", "batchstep-2", "batchstep-4"):
        assert 0 < main[m]["ideal_speedup"] and main[m]["efficiency"] > 0
        assert 10 < main[m]["psnr_db"] < math.inf and 0 < main[m]["ssim"] <= 1
        assert main[m]["speedup_vs_allcores"] > 0
    assert set(main["parastep-2"]["time_split"]) == {"computed", "received"}
    assert main["baseline-busy"]["ranks"] == 2 and main["baseline-busy"]["psnr_db"] == math.inf
    ceiling = main["parastep-2"]["busy_ceiling"]
    assert (
        ceiling
        == main["parastep-2"]["ideal_speedup"]
        * main["baseline-1rank"]["wall_median_s"]
        / main["baseline-busy"]["wall_median_s"]
    )
    assert any(
        line.startswith("main ") and "parastep-2: one rank computes" in line and f"{ceiling:.2f}x" in line
        for line in lines
    )
    stress = {m: r for (s, m), r in by.items() if s == "stress"}
    assert stress["parastep-3"]["model_calls_per_rank"] == "4/3/3"  # windows 2-4 and 5: W + windows reaching
    assert stress["parastep-2"]["model_calls_per_rank"] == "4/4/2"  # rank 2 of 3 only follows
    _check_contestants(main, stress)


def _check_contestants(main: dict, stress: dict) -> None:
    """AsyncDiff and CFG-parallel: calls, bytes and quality; on 3 ranks they run on a group of 2."""
    assert main["asyncdiff-2"]["model_calls_per_rank"] == f"{STEPS}/{STEPS}"  # every rank, every step
    assert main["cfg-parallel"]["model_calls_per_rank"] == f"{STEPS}/{STEPS}"  # half batches
    assert main["asyncdiff-2"]["ideal_speedup"] == STEPS / (WARMUP + (STEPS - WARMUP) / 2)
    assert main["cfg-parallel"]["ideal_speedup"] == 2.0
    # AsyncDiff sends block activations every step: more than ParaStep's step messages
    assert main["asyncdiff-2"]["bytes_per_call"] > main["parastep-2"]["bytes_per_call"] > 0
    assert main["cfg-parallel"]["bytes_per_call"] > 0
    assert 10 < main["asyncdiff-2"]["psnr_db"] < math.inf  # approximate: stale activations
    assert main["cfg-parallel"]["psnr_db"] > 100  # exact up to float reduction order
    assert main["asyncdiff-2"]["ranks"] == main["cfg-parallel"]["ranks"] == 2
    assert stress["asyncdiff-2"]["ranks"] == stress["cfg-parallel"]["ranks"] == 2  # a group of 2 in 3 ranks
    assert stress["asyncdiff-2"]["model_calls_per_rank"] == "6/6"
    assert stress["cfg-parallel"]["model_calls_per_rank"] == "6/6" and stress["cfg-parallel"]["psnr_db"] > 100
    assert stress["asyncdiff-2-stride-2"]["ranks"] == 3
    assert len(stress["asyncdiff-2-stride-2"]["model_calls_per_rank"].split("/")) == 3
    assert stress["asyncdiff-2-stride-2"]["bytes_per_call"] > 0


def test_bench_sparsetem_rows_on_the_video_model_only(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "launcher.bench", "--models", "image", "video", "--steps", "4", "--warmup", "1"]
    cmd += ["--seeds", "1", "--ranks", "2", "--device", "cpu", "--strides", "--stress-degree", "0"]
    cmd += ["--hook-pairs", "0", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "bench.json").read_text())["rows"]
    sparse = {(r["model"], r["method"]): r for r in rows if r["method"].startswith("sparsetem")}
    assert set(sparse) == {("built-in video", "sparsetem"), ("built-in video", "sparsetem+parastep-2")}
    for (_, method), row in sparse.items():
        assert 0 <= row["skipped_work"] <= 1 and row["wall_median_s"] > 0
        assert row["model_calls_per_rank"].count("/") == (1 if method.endswith("parastep-2") else 0)
        assert f"built-in video {method}: SparseTem skipped" in proc.stdout


def test_bench_app_measures_the_apps_compare_beside_the_engine(tmp_path):
    out = tmp_path / "app"
    cmd = [sys.executable, "-m", "launcher.bench", "--app", "--models", "image", "--repeats", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "app_bench.json").read_text())
    (row,) = result["rows"]
    (run,) = result["app"]["image"]["runs"]  # the panel's numbers of the one timed Compare
    assert row["app"] == run["speedup"] and row["app_denoise"] == run["speedup_denoise"]
    assert row["other_cores"] == run["method"]["other_cores"] >= 0
    assert row["engine"] > 0 and row["ideal"] == run["ideal_speedup"] > 1
    cells = [c.strip() for c in proc.stdout.splitlines()[-3].strip("|").split("|")]
    assert cells == [
        "image",
        str(row["steps"]),
        "2",
        f"{row['app']:.2f}×",
        f"{row['app_denoise']:.2f}×",
        f"{row['engine']:.2f}×",
        f"{row['app'] / row['engine']:.2f}",
        f"{row['ideal']:.2f}×",
        f"{row['other_cores']:.2f}",
    ]
