"""Measure a built-in demo model: prompt adherence on held-out prompts, per-call cost, examples.

    python -m demo_models.evaluate image                        # 100 prompts, the defaults
    python -m demo_models.evaluate image --guidance 1,2,3,4,5   # one line per guidance scale
    python -m demo_models.evaluate video --parastep             # ParaStep-2 (2 gloo ranks) vs baseline
    python -m demo_models.evaluate audio --timing               # audio call: denoising vs decoding
    python -m demo_models.evaluate audio --decoders             # shipped vs previous audio decoder
    python -m demo_models.evaluate audio --n 20 --steps 25

Held-out prompts come from :func:`random_prompts` with a seed the training never used; the
checker (:mod:`demo_models.checkers`) measures the decoded samples. ``--parastep`` runs the same
prompts, seeds and batches on two ranks with ``ParaStepConfig(warmup_steps=5)`` and counts the
prompts whose per-attribute verdicts equal the single-process baseline's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .checkers import check
from .loading import load_pipeline
from .vocab import check_kind, random_prompts

logger = logging.getLogger(__name__)

EVAL_SEED = 2024
PARASTEP_WARMUP = 5


def _samples(kind: str, out: Any) -> list[Any]:
    if kind == "image":
        return list(out.images)
    if kind == "video":
        return list(out.frames)
    return list(out.audios)


def _call_kwargs(steps: int | None, guidance_scale: float | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if steps:
        kwargs["num_inference_steps"] = steps
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    return kwargs


def verdicts(
    pipe: Any,
    kind: str,
    prompts: list[str],
    seed: int = EVAL_SEED,
    batch: int = 20,
    decode: bool = True,
    **kwargs: Any,
) -> list[dict[str, bool]]:
    """Per-attribute checker verdicts for ``prompts``, generated in batches seeded ``seed + start``.

    With ``decode=False`` the pipeline returns latents and no verdicts (the ParaStep peers).
    """
    rows: list[dict[str, bool]] = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        gen = torch.Generator().manual_seed(seed + start)
        out = pipe(chunk, generator=gen, output_type="np" if decode else "latent", **kwargs)
        if decode:
            rows += [check(kind, prompt, sample) for prompt, sample in zip(chunk, _samples(kind, out))]
    return rows


def scores_of(rows: list[dict[str, bool]]) -> dict[str, float]:
    """Fraction of rows passing each attribute, and all of them ("all")."""
    scores = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    scores["all"] = float(np.mean([all(r.values()) for r in rows]))
    return scores


def adherence(
    pipe: Any,
    kind: str,
    n: int = 100,
    steps: int | None = None,
    seed: int = EVAL_SEED,
    batch: int = 20,
    guidance_scale: float | None = None,
) -> dict[str, Any]:
    """Fraction of held-out prompts whose samples pass each attribute check."""
    prompts = random_prompts(kind, n, seed=seed)
    rows = verdicts(pipe, kind, prompts, seed, batch, **_call_kwargs(steps, guidance_scale))
    return {"n": n, "scores": scores_of(rows), "rows": [{"prompt": p, **r} for p, r in zip(prompts, rows)]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _parastep_rank(
    rank: int, world: int, port: int, kind: str, path: Path | None, n: int, kwargs: dict[str, Any], queue: Any
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        import parastep

        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=20))
        pipe = load_pipeline(kind, path=path)
        handle = parastep.apply(pipe, parastep.ParaStepConfig(warmup_steps=PARASTEP_WARMUP))
        rows = verdicts(pipe, kind, random_prompts(kind, n, seed=EVAL_SEED), decode=rank == 0, **kwargs)
        calls = handle.last_stats.model_calls if handle.last_stats else 0
        handle.remove()
        dist.barrier()
        queue.put((rank, "ok", (rows, calls)))
    except BaseException as exc:  # report, never leave the parent waiting
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def parastep_agreement(
    kind: str,
    n: int = 100,
    steps: int | None = None,
    guidance_scale: float | None = None,
    path: Path | None = None,
    world: int = 2,
) -> dict[str, Any]:
    """ParaStep on ``world`` gloo ranks against the single-process baseline, same prompts and seeds.

    Returns the fraction of prompts whose per-attribute verdicts are identical, both runs'
    adherence, and the model calls per rank of the last ParaStep call.
    """
    kwargs = _call_kwargs(steps, guidance_scale)
    torch.set_num_threads(1)
    pipe = load_pipeline(kind, path=path)
    prompts = random_prompts(kind, n, seed=EVAL_SEED)
    baseline = verdicts(pipe, kind, prompts, **kwargs)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_parastep_rank, args=(r, world, port, kind, path, n, kwargs, queue)) for r in range(world)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=3600)
            if status != "ok":
                raise RuntimeError(f"ParaStep rank {rank} failed: {value}")
            results[rank] = value
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    rows, _ = results[0]
    same = [a == b for a, b in zip(baseline, rows)]
    return {
        "n": n,
        "ranks": world,
        "warmup_steps": PARASTEP_WARMUP,
        "same_verdicts": float(np.mean(same)),
        "baseline_scores": scores_of(baseline),
        "parastep_scores": scores_of(rows),
        "model_calls_per_rank": [results[r][1] for r in range(world)],
        "differing": [
            {"prompt": p, "baseline": a, "parastep": b} for p, a, b in zip(prompts, baseline, rows) if a != b
        ],
    }


def audio_call_split(pipe: Any, repeats: int = 5, steps: int | None = None) -> dict[str, Any]:
    """Median seconds of one audio call's denoising and decoding (one prompt, default guidance, 1 thread),
    and whether two whole calls with the same seed return the same waveform bit for bit.

    Each repeat times ``output_type="latent"`` (the denoising loop) and then the decoding of
    those latents, back to back, so load on a shared machine hits both alike.
    """
    torch.set_num_threads(1)
    prompt = random_prompts("audio", 1, seed=EVAL_SEED)[0]
    kwargs = _call_kwargs(steps, None)
    denoise, decode = [], []
    for i in range(repeats + 1):
        gen = torch.Generator().manual_seed(i)
        t0 = time.perf_counter()
        latents = pipe(prompt, generator=gen, output_type="latent", **kwargs).audios
        t1 = time.perf_counter()
        pipe._decode(latents, "np")
        t2 = time.perf_counter()
        if i:  # the first call pays one-off costs (filter bank, FFT plans)
            denoise.append(t1 - t0)
            decode.append(t2 - t1)
    d, a = statistics.median(denoise), statistics.median(decode)
    shares = [b / (x + b) for x, b in zip(denoise, decode)]
    waves = [pipe(prompt, generator=torch.Generator().manual_seed(7), **kwargs).audios for _ in range(2)]
    return {
        "calls": repeats,
        "denoise_s": round(d, 3),
        "decode_s": round(a, 3),
        "decode_share": round(statistics.median(shares), 3),
        "decode_share_max": round(max(shares), 3),
        "same_seed_same_waveform": bool(np.array_equal(waves[0], waves[1])),
    }


def previous_mel_to_audio(mel: np.ndarray) -> np.ndarray:
    """The audio decoder the models shipped with before issue 12, kept to measure against:
    librosa's ``mel_to_stft`` (L-BFGS-B non-negative least squares) and 32 Griffin-Lim iterations."""
    import librosa

    from . import data

    db = (np.clip(mel, -1.0, 1.0) - 1) / 2 * -data.DB_FLOOR
    power = librosa.db_to_power(db, ref=data.DB_REF)
    power = np.where(db <= data.DB_FLOOR + 1e-3, 0.0, power)
    n = int(data.SAMPLE_RATE * data.AUDIO_SECONDS)
    frames = 1 + n // data.HOP_LENGTH
    if power.shape[-1] < frames:
        power = np.pad(power, ((0, 0), (0, frames - power.shape[-1])), mode="edge")
    magnitude = librosa.feature.inverse.mel_to_stft(
        power, sr=data.SAMPLE_RATE, n_fft=data.N_FFT, power=2.0, fmin=data.F_MIN, fmax=data.F_MAX
    )
    wave = librosa.griffinlim(
        magnitude, n_iter=32, hop_length=data.HOP_LENGTH, n_fft=data.N_FFT, length=n, random_state=0
    )
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def audio_decoders(
    pipe: Any,
    n: int = 100,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = EVAL_SEED,
    batch: int = 20,
) -> dict[str, Any]:
    """The held-out prompts' mel latents decoded by the shipped decoder and by
    :func:`previous_mel_to_audio`: adherence of each and median decoding seconds per clip."""
    from . import data

    prompts = random_prompts("audio", n, seed=seed)
    decoders = {
        "shipped": lambda m: data.mel_to_audio(m, n_iter=pipe.griffin_lim_iters),
        "previous": previous_mel_to_audio,
    }
    rows: dict[str, list[dict[str, bool]]] = {name: [] for name in decoders}
    seconds: dict[str, list[float]] = {name: [] for name in decoders}
    for start in range(0, n, batch):
        chunk = prompts[start : start + batch]
        gen = torch.Generator().manual_seed(seed + start)
        mels = pipe(chunk, generator=gen, output_type="latent", **_call_kwargs(steps, guidance_scale)).audios
        for prompt, mel in zip(chunk, mels.float().cpu().numpy()[:, 0]):
            for name, decode in decoders.items():
                t0 = time.perf_counter()
                wave = decode(mel)
                seconds[name].append(time.perf_counter() - t0)
                rows[name].append(check("audio", prompt, wave))
    return {
        "n": n,
        **{f"{name}_scores": scores_of(rows[name]) for name in decoders},
        **{f"{name}_decode_s": round(statistics.median(seconds[name]), 3) for name in decoders},
    }


def denoiser_cost_ms(pipe: Any, kind: str, repeats: int = 20) -> float:
    """Median wall time of one denoiser call at the default size with CFG (batch 2), 1 thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        shape = pipe._latent_shape(2)
        x = torch.randn(shape, dtype=pipe.unet.dtype)
        labels = torch.zeros(2, len(pipe.unet.config.attribute_sizes), dtype=torch.long)
        times = []
        with torch.no_grad():
            for i in range(repeats + 3):
                t0 = time.perf_counter()
                pipe.unet(x, torch.tensor(500), class_labels=labels, return_dict=False)
                if i >= 3:
                    times.append(time.perf_counter() - t0)
        return float(np.median(times) * 1000)
    finally:
        torch.set_num_threads(threads)


def save_examples(pipe: Any, kind: str, prompts: list[str], out_dir: Path, seed: int = 0) -> list[Path]:
    """Write example media (PNG grid / frame strips / WAV + spectrogram PNG) for ``prompts``."""
    import PIL.Image

    out_dir.mkdir(parents=True, exist_ok=True)
    out = pipe(prompts, generator=torch.Generator().manual_seed(seed))
    paths = []
    if kind == "image":
        ims = np.concatenate([np.pad(im, ((1, 1), (1, 1), (0, 0)), constant_values=1.0) for im in out.images], axis=1)
        big = PIL.Image.fromarray((ims * 255).astype(np.uint8)).resize(
            (ims.shape[1] * 4, ims.shape[0] * 4), PIL.Image.Resampling.NEAREST
        )
        paths.append(out_dir / "examples.png")
        big.save(paths[-1])
    elif kind == "video":
        rows = [
            np.concatenate([np.pad(f, ((1, 1), (1, 1), (0, 0)), constant_values=1.0) for f in vid], axis=1)
            for vid in out.frames
        ]
        grid = np.concatenate(rows, axis=0)
        big = PIL.Image.fromarray((grid * 255).astype(np.uint8)).resize(
            (grid.shape[1] * 3, grid.shape[0] * 3), PIL.Image.Resampling.NEAREST
        )
        paths.append(out_dir / "examples.png")
        big.save(paths[-1])
    else:
        import soundfile as sf

        from .data import audio_to_mel

        mels = []
        for i, wave in enumerate(out.audios):
            p = out_dir / f"example_{i}.wav"
            sf.write(p, wave, pipe.sample_rate)
            paths.append(p)
            mels.append(np.pad((audio_to_mel(wave)[::-1] + 1) / 2, 1, constant_values=1.0))
        grid = np.concatenate(mels, axis=1)
        big = PIL.Image.fromarray((grid * 255).astype(np.uint8)).resize(
            (grid.shape[1] * 3, grid.shape[0] * 3), PIL.Image.Resampling.NEAREST
        )
        paths.append(out_dir / "examples.png")
        big.save(paths[-1])
    return paths


EXAMPLE_PROMPTS = {
    "image": [
        "a large red circle in the center on a blue background",
        "a small yellow square at the top left on a black background",
        "a large green triangle at the bottom right on a white background",
        "a small purple circle at the top right on a gray background",
        "an orange square",
        "",
    ],
    "video": [
        "a red circle moving right on a black background",
        "a yellow square moving left on a blue background",
        "a green triangle moving up on a white background",
        "a purple circle moving down on a gray background",
    ],
    "audio": [
        "a high sine tone",
        "a low square tone",
        "a rising sine tone",
        "a falling middle square tone",
        "a pulsing high square tone",
        "a steady low sine tone",
    ],
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=str, default=None, help="guidance scale, or a comma-separated list to sweep")
    parser.add_argument("--parastep", action="store_true", help="ParaStep-2 verdicts against the baseline's")
    parser.add_argument("--timing", action="store_true", help="audio: one call's denoising vs decoding time")
    parser.add_argument("--decoders", action="store_true", help="audio: shipped vs previous decoder, same latents")
    parser.add_argument("--path", type=Path, default=None, help="model folder (default assets/<kind>)")
    parser.add_argument("--examples", type=Path, default=None, help="write example media here")
    parser.add_argument("--json", type=Path, default=None, help="write the measurements here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    kind = check_kind(args.kind)
    torch.set_num_threads(1)
    guidances = [float(g) for g in args.guidance.split(",")] if args.guidance else [None]
    result: dict[str, Any]
    if args.parastep:
        t0 = time.time()
        result = parastep_agreement(kind, n=args.n, steps=args.steps, guidance_scale=guidances[0], path=args.path)
        result["eval_seconds"] = round(time.time() - t0, 1)
        print(json.dumps({k: v for k, v in result.items() if k != "differing"}, indent=2))
        for r in result["differing"][:10]:
            print("DIFFERS", r)
    elif args.timing:
        if kind != "audio":
            raise SystemExit("--timing measures the audio call's decoding; use it with kind audio")
        result = audio_call_split(load_pipeline(kind, path=args.path), steps=args.steps)
        print(json.dumps(result, indent=2))
    elif args.decoders:
        if kind != "audio":
            raise SystemExit("--decoders compares audio decoders; use it with kind audio")
        pipe = load_pipeline(kind, path=args.path)
        result = audio_decoders(pipe, n=args.n, steps=args.steps, guidance_scale=guidances[0])
        print(json.dumps(result, indent=2))
    else:
        pipe = load_pipeline(kind, path=args.path)
        sweep = {}
        for g in guidances:
            t0 = time.time()
            result = adherence(pipe, kind, n=args.n, steps=args.steps, guidance_scale=g)
            result["eval_seconds"] = round(time.time() - t0, 1)
            result["guidance"] = g if g is not None else "default"
            result["steps"] = args.steps or "default"
            sweep[str(result["guidance"])] = result
            if len(guidances) > 1:
                print("guidance", g, json.dumps({k: round(v, 3) for k, v in result["scores"].items()}), flush=True)
        if len(guidances) > 1:
            result = {"n": args.n, "sweep": sweep}
        else:
            result["denoiser_ms_cfg_1_thread"] = round(denoiser_cost_ms(pipe, kind), 1)
            failures = [r for r in result["rows"] if not all(v for k, v in r.items() if k != "prompt")]
            print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
            for r in failures[:10]:
                print("FAIL", r)
        if args.examples:
            for p in save_examples(pipe, kind, EXAMPLE_PROMPTS[kind], args.examples):
                print("wrote", p)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
