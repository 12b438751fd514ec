"""What one GPU can show, in one table: ``scripts/gpu_check.sh`` (``python -m launcher.gpu_check``).

1. The suite's single-process, CUDA-capable tests on ``cuda`` in float16
   (``PARASTEP_TEST_DEVICE`` / ``PARASTEP_TEST_DTYPE``, deterministic kernels).
2. The degree-1 hook cost and BatchStep on a full-size random-weight SD1.5-sized UNet
   (timing needs no trained weights), fp16, CUDA-event timings.
3. CUDA tensors through the comm layer's packing: a round trip in one process, packed with
   ``torch.cuda.set_sync_debug_mode("error")`` (any host sync while packing is an error).

Two NCCL ranks need two GPUs: the multi-rank path (ParaStep windows on NCCL, host syncs per
window) is not exercised by one GPU; run ``python -m launcher.bench`` on a machine with two.
Without a GPU it prints "no GPU: skipped" and exits 0.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

TWO_RANKS = (
    "two NCCL ranks need two GPUs: ParaStep across ranks on NCCL is not exercised here; "
    "run `python -m launcher.bench` on a machine with at least two GPUs"
)
ROOT = Path(__file__).resolve().parent.parent
Row = tuple[str, str, str]  # check, result, detail


def _tests(timeout_s: float) -> Row:
    env = dict(
        os.environ,
        PARASTEP_TEST_DEVICE="cuda",
        PARASTEP_TEST_DTYPE="float16",
        CUBLAS_WORKSPACE_CONFIG=":4096:8",
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow"]
    cmd += ["tests/test_engine.py", "tests/test_pipelines.py", "-k", "not two_ranks"]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return ("tests on cuda, float16", "TIMEOUT", f"over {timeout_s:g}s")
    lines = done.stdout.strip().splitlines()
    summary = lines[-1] if lines else done.stderr.strip()[-200:]
    failed = [line.split(" - ")[0].removeprefix("FAILED ") for line in lines if line.startswith("FAILED")]
    detail = f"{summary} ({time.perf_counter() - start:.0f}s)" + (f"; failed: {', '.join(failed)}" if failed else "")
    return ("tests on cuda, float16 (engine, pipelines)", "ok" if done.returncode == 0 else "FAIL", detail)


SD15_UNET: dict[str, Any] = dict(  # Stable Diffusion 1.5's UNet (860M parameters), random weights
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)


def unet_pipeline(device: torch.device, dtype: torch.dtype, config: dict[str, Any] = SD15_UNET) -> Any:
    """StableDiffusionPipeline's denoising loop (CFG, DDIM, latents only) around a random-weight
    UNet2DConditionModel built from ``config`` directly on ``device``."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    class UNetLoop(DiffusionPipeline):  # the classic loop of StableDiffusionPipeline, latents only
        def __init__(self, unet: Any, scheduler: Any):
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler)

        @torch.no_grad()
        def __call__(self, embeds: torch.Tensor, num_inference_steps: int, generator: Any, guidance: float = 7.5):
            size = self.unet.config.sample_size
            latents = torch.randn((1, 4, size, size), generator=generator).to(device, dtype)
            self.scheduler.set_timesteps(num_inference_steps)
            for t in self.scheduler.timesteps:
                noise = self.unet(torch.cat([latents] * 2), t, encoder_hidden_states=embeds).sample
                uncond, text = noise.chunk(2)
                latents = self.scheduler.step(uncond + guidance * (text - uncond), t, latents).prev_sample
            return latents

    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return UNetLoop(unet.to(device, dtype).eval(), scheduler)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unet_costs(
    steps: int, reps: int, device: torch.device, dtype: torch.dtype, config: dict[str, Any] = SD15_UNET
) -> list[Row]:
    """Plain, ParaStep degree 1 and BatchStep 2 and 3 on :func:`unet_pipeline`, interleaved."""
    import parastep

    pipe = unet_pipeline(device, dtype, config)
    width = config["cross_attention_dim"]
    embeds = torch.randn(2, 77, width, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    configs: dict[str, Any] = {
        "plain": None,
        "parastep degree 1": parastep.ParaStepConfig(degree=1),
        "batchstep stride 2": parastep.BatchStepConfig(stride=2, warmup_steps=2),
        "batchstep stride 3": parastep.BatchStepConfig(stride=3, warmup_steps=2),
    }
    seconds: dict[str, list[float]] = {k: [] for k in configs}
    stats: dict[str, Any] = {}

    def once(name: str) -> float:
        handle = parastep.apply(pipe, configs[name]) if configs[name] else None
        _sync(device)
        start = time.perf_counter()
        pipe(embeds, steps, torch.Generator().manual_seed(0))
        _sync(device)
        took = time.perf_counter() - start
        if handle:
            stats[name] = handle.last_stats
            handle.remove()
        return took

    for name in configs:  # warm-up: kernels, allocator
        once(name)
    for _ in range(reps):  # interleaved
        for name in configs:
            seconds[name].append(once(name))
    best = {k: min(v) for k, v in seconds.items()}
    size, what = config["sample_size"], "SD1.5-sized UNet" if config is SD15_UNET else "UNet"
    rows: list[Row] = [
        (f"{what}, {_name(dtype)}, CFG batch 2, {size}x{size} latents", "info", f"{steps} DDIM steps, best of {reps}")
    ]
    plain = best["plain"]
    rows.append(("  plain pipeline", f"{plain:.3f}s", f"{plain / steps * 1e3:.2f} ms/step"))
    hook = (best["parastep degree 1"] - plain) / steps
    rows.append(("  degree-1 hook cost", f"{hook * 1e6:+.0f} us/step", f"{best['parastep degree 1']:.3f}s per call"))
    for name in ("batchstep stride 2", "batchstep stride 3"):
        s = stats[name]
        timed = sum(r.seconds for r in s.records)
        rows.append(
            (
                f"  {name}",
                f"x{plain / best[name]:.2f}",
                f"{best[name]:.3f}s, {s.model_calls} model calls of {steps}, "
                f"{'CUDA-event' if device.type == 'cuda' else 'host'} step sum {timed:.3f}s, "
                f"host_syncs {s.host_syncs}",
            )
        )
    return rows


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def comm_packing(device: torch.device) -> list[Row]:
    """A message of CUDA (``device``), CPU and numpy values through pack/unpack in one process."""
    import numpy as np

    from parastep import comm

    g = torch.Generator().manual_seed(0)
    message: tuple[list[torch.Tensor], dict[str, Any]] = (
        [torch.randn(1, 4, 64, 64, generator=g).to(device, torch.float16)],
        {
            "model_outputs": [torch.randn(1, 4, 64, 64, generator=g).to(device), None],
            "sigmas": torch.linspace(0, 1, 51),
            "np_sigmas": np.linspace(0, 1, 5),
            "lower_order_nums": 1,
            "nan": float("nan"),
            "dtype": torch.bfloat16,
            "nested": ({"mask": torch.tensor([True, False], device=device)},),
        },
    )
    tensors: list[torch.Tensor] = []
    skeleton = comm._strip(message, tensors)
    blob = comm._encode(skeleton, tensors)
    cuda = device.type == "cuda"
    _sync(device)
    if cuda:
        torch.cuda.set_sync_debug_mode("error")
    try:
        start = time.perf_counter()
        buf, size = comm._pack(blob, tensors, device, 0)
        pack_s = time.perf_counter() - start
        sync_free = "no host sync" if cuda else "(CPU: no sync check)"
    except RuntimeError as exc:
        buf, size, pack_s, sync_free = torch.empty(0), 0, 0.0, f"synced: {exc}"
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    if not size:
        return [("comm packing of CUDA tensors", "FAIL", sync_free)]
    host = buf[:size].cpu().numpy()  # Comm.recv copies the header, skeleton and host part to pinned memory
    back_skeleton = comm._decode(host[comm._HEAD : comm._HEAD + len(blob)].tobytes())
    back = comm._unpack(buf, host, len(blob), back_skeleton, comm._layout(back_skeleton))
    (latents,), state = back
    ok = (
        torch.equal(latents, message[0][0])
        and latents.device == device
        and torch.equal(state["model_outputs"][0], message[1]["model_outputs"][0])
        and state["sigmas"].device.type == "cpu"
        and torch.equal(state["sigmas"], message[1]["sigmas"])
        and isinstance(state["np_sigmas"], np.ndarray)
        and np.array_equal(state["np_sigmas"], message[1]["np_sigmas"])
        and state["nan"] != state["nan"]
        and state["dtype"] is torch.bfloat16
        and state["nested"][0]["mask"].device == device
    )
    return [
        (
            f"comm: pack/unpack round trip, {device.type}",
            "ok" if ok else "FAIL",
            f"{size} bytes, packed in {pack_s * 1e6:.0f} us with {sync_free}; CUDA slots back on {device}, "
            "CPU tensors on cpu, numpy as numpy",
        )
    ]


def format_table(rows: list[Row]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    head = f"{'check':<{widths[0]}} | {'result':<{widths[1]}} | detail"
    lines = [head, "-" * len(head)]
    lines += [f"{a:<{widths[0]}} | {b:<{widths[1]}} | {c}" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="denoising steps of the UNet timings")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per configuration")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the test suite on cuda")
    parser.add_argument("--tests-timeout", type=float, default=360.0, help="seconds for the tests on cuda")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"no GPU: skipped (torch {torch.__version__} sees no CUDA device); {TWO_RANKS}")
        return 0
    name = torch.cuda.get_device_name()
    print(f"gpu_check on {name}, torch {torch.__version__}, CUDA {torch.version.cuda}; {TWO_RANKS}", flush=True)
    rows: list[Row] = [] if args.skip_tests else [_tests(args.tests_timeout)]
    device = torch.device("cuda", torch.cuda.current_device())
    rows += comm_packing(device)
    rows += unet_costs(args.steps, args.reps, device, torch.float16)
    print(format_table(rows))
    failed = [r for r in rows if r[1] in ("FAIL", "TIMEOUT")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
