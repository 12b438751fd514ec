"""Measure a built-in demo model: prompt adherence on held-out prompts, per-call cost, examples.

    python -m demo_models.evaluate image                  # 100 prompts, default steps
    python -m demo_models.evaluate audio --n 20 --steps 25

Held-out prompts come from :func:`random_prompts` with a seed the training never used; the
checker (:mod:`demo_models.checkers`) measures the decoded samples.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkers import check
from .loading import load_pipeline
from .vocab import check_kind, random_prompts

logger = logging.getLogger(__name__)

EVAL_SEED = 2024


def _samples(kind: str, out: Any) -> list[Any]:
    if kind == "image":
        return list(out.images)
    if kind == "video":
        return list(out.frames)
    return list(out.audios)


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
    passed: dict[str, list[bool]] = defaultdict(list)
    rows = []
    kwargs: dict[str, Any] = {}
    if steps:
        kwargs["num_inference_steps"] = steps
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    for start in range(0, n, batch):
        chunk = prompts[start : start + batch]
        gen = torch.Generator().manual_seed(seed + start)
        out = pipe(chunk, generator=gen, **kwargs)
        for prompt, sample in zip(chunk, _samples(kind, out)):
            result = check(kind, prompt, sample)
            rows.append({"prompt": prompt, **result})
            for k, v in result.items():
                passed[k].append(bool(v))
    scores = {k: float(np.mean(v)) for k, v in passed.items()}
    scores["all"] = float(np.mean([all(r[k] for k in passed) for r in rows]))
    return {"n": n, "scores": scores, "rows": rows}


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
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--path", type=Path, default=None, help="model folder (default assets/<kind>)")
    parser.add_argument("--examples", type=Path, default=None, help="write example media here")
    parser.add_argument("--json", type=Path, default=None, help="write the measurements here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    kind = check_kind(args.kind)
    torch.set_num_threads(1)
    pipe = load_pipeline(kind, path=args.path)
    t0 = time.time()
    result = adherence(pipe, kind, n=args.n, steps=args.steps, guidance_scale=args.guidance)
    result["eval_seconds"] = round(time.time() - t0, 1)
    result["denoiser_ms_cfg_1_thread"] = round(denoiser_cost_ms(pipe, kind), 1)
    result["steps"] = args.steps or "default"
    failures = [r for r in result["rows"] if not all(v for k, v in r.items() if k != "prompt")]
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    for r in failures[:10]:
        print("FAIL", r)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.examples:
        for p in save_examples(pipe, kind, EXAMPLE_PROMPTS[kind], args.examples):
            print("wrote", p)


if __name__ == "__main__":
    main()
