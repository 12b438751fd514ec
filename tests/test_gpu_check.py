"""scripts/gpu_check.sh without a GPU: a clear skip, exit 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_without_a_gpu_says_skipped_and_exits_0():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)  # no GPU, even on a GPU machine
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "no GPU: skipped" in done.stdout and "two NCCL ranks need two GPUs" in done.stdout


def test_the_gpu_checks_run_on_the_cpu_with_a_tiny_unet():
    """The code paths scripts/gpu_check.sh takes on a GPU, on the CPU (the timings mean nothing)."""
    import torch

    from launcher.gpu_check import comm_packing, format_table, unet_costs

    rows = comm_packing(torch.device("cpu"))
    assert [r[1] for r in rows] == ["ok"], rows
    tiny = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    rows += unet_costs(5, 1, torch.device("cpu"), torch.float32, tiny)
    table = format_table(rows)
    assert "degree-1 hook cost" in table and "model calls of 5" in table
    assert "batchstep stride 2" in table
    by = {r[0].strip(): r for r in rows}
    assert "3 model calls of 5" in by["batchstep stride 3"][2]  # W=2, then steps 2-4 in one call
    assert "4 model calls of 5" in by["batchstep stride 2"][2]  # W=2, then 2-3 and 4
