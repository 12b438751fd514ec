"""Turning raw model outputs (float arrays) into what Gradio components show."""

from __future__ import annotations

import math
import os
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

DISPLAY_MIN_SIDE = 256  # small images are upscaled by an integer factor (nearest) to at least this
_OUT_DIR = os.path.join(tempfile.gettempdir(), "parastep-outputs")


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def upscale(image: np.ndarray, min_side: int = DISPLAY_MIN_SIDE) -> np.ndarray:
    """Nearest-neighbour integer upscale so that small outputs look crisp, not blurred."""
    side = min(image.shape[-3], image.shape[-2])
    factor = max(1, math.ceil(min_side / max(1, side)))
    if factor == 1:
        return image
    return image.repeat(factor, axis=-3).repeat(factor, axis=-2)


def display_image(image: np.ndarray) -> np.ndarray:
    """HxWx3 float [0, 1] -> upscaled uint8 for gr.Image."""
    return upscale(to_uint8(_rgb(image)))


def preview_image(preview: np.ndarray) -> np.ndarray | None:
    """Whatever a pipeline's decode_preview returns, as one picture: frames are tiled, a
    waveform is drawn, a single-channel map is shown in grey."""
    arr = np.asarray(preview, dtype=np.float32)
    if arr.ndim == 1:
        return display_image(_waveform_picture(arr))
    while arr.ndim > 3 and arr.shape[0] == 1:  # a batch of one
        arr = arr[0]
    if arr.ndim == 4:  # frames: tile up to 8 side by side
        frames = [_rgb(f) for f in arr[: min(8, len(arr))]]
        return upscale(to_uint8(np.concatenate(frames, axis=1)), min_side=128)
    if arr.ndim == 2:
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo + 1e-8)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)
    return display_image(_rgb(arr))


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image[..., :3]


def _waveform_picture(wave: np.ndarray, height: int = 64, width: int = 256) -> np.ndarray:
    picture = np.ones((height, width, 3), dtype=np.float32)
    if wave.size == 0:
        return picture
    chunks = np.array_split(np.clip(wave, -1, 1), width)
    for x, chunk in enumerate(chunks):
        if chunk.size == 0:
            continue
        top = int((1 - chunk.max()) / 2 * (height - 1))
        bottom = int((1 - chunk.min()) / 2 * (height - 1))
        picture[top : bottom + 1, x] = (0.2, 0.4, 0.9)
    return picture


_KEEP_S = 3600.0
_last_sweep = 0.0


def new_output_path(suffix: str) -> str:
    """A fresh file per result, never a shared name (concurrent users); results older than
    an hour are removed now and then (Gradio has already copied them into its cache)."""
    global _last_sweep
    os.makedirs(_OUT_DIR, exist_ok=True)
    now = time.time()
    if now - _last_sweep > 600:
        _last_sweep = now
        for entry in os.scandir(_OUT_DIR):
            try:
                if now - entry.stat().st_mtime > _KEEP_S:
                    os.remove(entry.path)
            except OSError:
                pass
    return os.path.join(_OUT_DIR, f"{uuid.uuid4().hex}{suffix}")


def write_image(image: np.ndarray) -> str:
    """HxWx3 float [0, 1] -> a png of this request's own (upscaled crisply): never a file another
    request's identical output could rewrite while this one is downloaded."""
    from PIL import Image

    path = new_output_path(".png")
    Image.fromarray(display_image(image)).save(path)
    return path


def write_preview(preview: np.ndarray) -> str | None:
    """:func:`preview_image` as a png of this request's own. Gradio writes an array output to a
    file named after its content, in place: two users streaming identical previews rewrote the
    file while the other's client downloaded it (a connection closed mid-body, seen once in 40
    concurrent requests)."""
    from PIL import Image

    picture = preview_image(preview)
    if picture is None:
        return None
    path = new_output_path(".png")
    Image.fromarray(picture).save(path)
    return path


def write_video(frames: np.ndarray, fps: int = 8) -> str:
    """FxHxWx3 float -> an H.264 mp4 browsers play; small frames are upscaled crisply."""
    import imageio.v2 as imageio

    pictures = upscale(to_uint8(_rgb(frames)))
    # yuv420p needs even sides
    h, w = pictures.shape[1] - pictures.shape[1] % 2, pictures.shape[2] - pictures.shape[2] % 2
    path = new_output_path(".mp4")
    with imageio.get_writer(
        path, fps=fps, codec="libx264", pixelformat="yuv420p", macro_block_size=1, ffmpeg_log_level="error"
    ) as writer:
        for picture in pictures[:, :h, :w]:
            writer.append_data(picture)  # type: ignore[attr-defined]  # imageio's ffmpeg writer
    return path


def write_audio(wave: np.ndarray, sample_rate: int) -> str:
    import soundfile

    path = new_output_path(".wav")
    soundfile.write(path, np.clip(wave, -1.0, 1.0).astype(np.float32), int(sample_rate), subtype="PCM_16")
    return path


def output_dir() -> Path:
    """The folder results are written to (swept like :func:`new_output_path`'s files)."""
    return Path(new_output_path("")).parent
