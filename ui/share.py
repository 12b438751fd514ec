"""Share: a race's results as one file, each method's name and wall time burned in.

image -> PNG, one row of tiles; video -> H.264 MP4, tiles side by side, looped to a few
seconds; audio -> H.264 + AAC MP4: every method's spectrogram stacked in one column, the
sounds played in turn, a playhead moving over the row being heard (the others dimmed).
Stacked rather than one segment at a time so the spectrograms stay comparable at every moment.
"""

from __future__ import annotations

import functools
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ui.media import to_uint8, upscale

MAX_ENTRIES = 5
TILE_MIN_SIDE = 192  # small media are upscaled (nearest, integer factor) to at least this
STRIP_HEIGHT = 46  # the label strip above each tile: label, then wall time and note
GAP = 4  # dark pixels between tiles
VIDEO_MIN_SECONDS = 3.0  # a video is looped until at least this long
AUDIO_FPS = 24  # frame rate of the audio clip (a smooth playhead), independent of `fps`
AUDIO_GAP_S = 0.3  # silence between two methods' sounds
SPECTROGRAM_SIZE = (576, 144)  # width, height of one spectrogram row
_BACKGROUND = (24, 24, 28)


@dataclass(frozen=True)
class ShareEntry:
    label: str  # e.g. "ParaStep (2 ranks)"
    wall_s: float  # burned in as e.g. "1.23 s"
    media: np.ndarray  # image HxWx3 / video FxHxWx3 float in [0, 1]; audio 1-D float in [-1, 1]
    note: str = ""  # optional, after the wall time, e.g. "1.8× · 41 dB"


@functools.cache
def _font(bold: bool, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # matplotlib's DejaVu has the glyphs notes use ("×", "·"); Pillow's default font lacks "×"
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / f"DejaVuSans{'-Bold' if bold else ''}.ttf"
    return ImageFont.truetype(str(path), size) if path.exists() else ImageFont.load_default(size=size)


def _fitting(text: str, width: int, bold: bool, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The largest font (down to 10 px) in which text fits the tile's width."""
    for s in range(size, 9, -1):
        if _font(bold, s).getlength(text) <= width - 12:
            break
    return _font(bold, s)


def label_strip(entry: ShareEntry, width: int) -> np.ndarray:
    """The STRIP_HEIGHT x width x 3 uint8 strip drawn above an entry's tile."""
    strip = Image.new("RGB", (width, STRIP_HEIGHT), (40, 40, 48))
    draw = ImageDraw.Draw(strip)
    second = f"{entry.wall_s:.2f} s" + (f" · {entry.note}" if entry.note else "")
    draw.text((6, 4), entry.label, fill=(255, 255, 255), font=_fitting(entry.label, width, True, 16))
    draw.text((6, 25), second, fill=(255, 214, 90), font=_fitting(second, width, False, 14))
    return np.asarray(strip)


def _even(canvas: np.ndarray) -> np.ndarray:
    """Pad the last two spatial axes to even sizes (yuv420p)."""
    h, w = canvas.shape[-3] % 2, canvas.shape[-2] % 2
    pad = [(0, 0)] * (canvas.ndim - 3) + [(0, h), (0, w), (0, 0)]
    return np.pad(canvas, pad) if h or w else canvas


def _row(tiles: list[np.ndarray], entries: Sequence[ShareEntry]) -> np.ndarray:
    """Tiles (...xHxWx3 uint8, one shape) side by side, each under its label strip."""
    lead, (h, w) = tiles[0].shape[:-3], tiles[0].shape[-3:-1]
    gap = np.empty((*lead, STRIP_HEIGHT + h, GAP, 3), np.uint8)
    gap[...] = _BACKGROUND
    parts = []
    for tile, entry in zip(tiles, entries, strict=True):
        strip = np.broadcast_to(label_strip(entry, w), (*lead, STRIP_HEIGHT, w, 3))
        parts += [np.concatenate([strip, tile], axis=-3), gap]
    return _even(np.concatenate(parts[:-1], axis=-2))


def _spectrogram(wave: np.ndarray, sample_rate: int, top_db: float) -> np.ndarray:
    """Log-magnitude STFT in [0, 1], SPECTROGRAM_SIZE[1] rows on a mel-spaced frequency axis
    (low frequencies at the bottom) x time frames."""
    n_fft, hop = (512, 128) if sample_rate >= 16000 else (256, 64)
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(wave, n_fft // 2), n_fft)[::hop]
    db = 20 * np.log10(np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=1)).T + 1e-6)
    mel_top = 2595 * np.log10(1 + sample_rate / 2 / 700)
    hz = 700 * (10 ** (np.linspace(0, mel_top, SPECTROGRAM_SIZE[1]) / 2595) - 1)
    rows = np.round(hz / (sample_rate / 2) * (db.shape[0] - 1)).astype(int)
    return np.clip((db[rows] - top_db + 80.0) / 80.0, 0.0, 1.0)[::-1]


def _audio_rows(entries: Sequence[ShareEntry], sample_rate: int) -> tuple[np.ndarray, list[int]]:
    """The audio canvas (uint8) and the top y of each spectrogram row."""
    from matplotlib import colormaps

    top_db = 20 * np.log10(max(float(np.abs(e.media).max()) for e in entries) * 256 + 1e-6)
    width, height = SPECTROGRAM_SIZE
    rows, tops, y = [], [], 0
    for entry in entries:
        spec = to_uint8(colormaps["magma"](_spectrogram(entry.media, sample_rate, top_db))[..., :3])
        spec = np.asarray(Image.fromarray(spec).resize((width, height), Image.Resampling.BILINEAR))
        rows += [label_strip(entry, width), spec, np.full((GAP, width, 3), _BACKGROUND, np.uint8)]
        tops.append(y + STRIP_HEIGHT)
        y += STRIP_HEIGHT + height + GAP
    return _even(np.concatenate(rows[:-1])), tops


def _check(entries: Sequence[ShareEntry], modality: str, fps: int, sample_rate: int | None) -> None:
    forms = {"image": (3, "HxWx3"), "video": (4, "FxHxWx3"), "audio": (1, "a 1-D waveform")}
    if modality not in forms:
        raise ValueError(f"modality must be 'image', 'video' or 'audio', got {modality!r}")
    if not 1 <= len(entries) <= MAX_ENTRIES:
        raise ValueError(
            f"export_race takes 1 to {MAX_ENTRIES} entries (methods of a finished race), got {len(entries)}"
        )
    ndim, form = forms[modality]
    shapes = [np.shape(e.media) for e in entries]
    for e, shape in zip(entries, shapes, strict=True):
        if len(shape) != ndim or (ndim > 1 and shape[-1] != 3) or 0 in shape:
            raise ValueError(f"{modality} entry {e.label!r} has media of shape {shape}; expected {form}")
    if modality != "audio" and len(set(shapes)) > 1:
        raise ValueError(f"{modality} entries must share one shape, got {shapes}")
    if modality == "audio" and (sample_rate is None or sample_rate <= 0):
        raise ValueError("audio export needs sample_rate=<Hz> (the pipeline's output sample rate)")
    if fps < 1:
        raise ValueError(f"fps must be at least 1, got {fps}")


def export_race(
    entries: Sequence[ShareEntry], modality: str, out_dir: Path, *, fps: int = 8, sample_rate: int | None = None
) -> Path:
    """Write the race as one new file in out_dir and return its path (see the module docstring).

    >>> export_race([ShareEntry("Baseline", 2.4, img0), ShareEntry("ParaStep (2 ranks)", 1.3, img1)],
    ...             "image", Path("/tmp/out"))  # doctest: +SKIP
    PosixPath('/tmp/out/race-image-3f2a....png')
    """
    _check(entries, modality, fps, sample_rate)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"race-{modality}-{uuid.uuid4().hex[:12]}"
    if modality == "image":
        path = stem.with_suffix(".png")
        Image.fromarray(_row([upscale(to_uint8(e.media), TILE_MIN_SIDE) for e in entries], entries)).save(path)
        return path

    from moviepy import AudioArrayClip, VideoClip  # type: ignore[import-untyped]

    path = stem.with_suffix(".mp4")
    encode = dict(codec="libx264", preset="ultrafast", pixel_format="yuv420p", logger=None)
    if modality == "video":
        frames = _row([upscale(to_uint8(e.media), TILE_MIN_SIDE) for e in entries], entries)
        count = len(frames) * math.ceil(VIDEO_MIN_SECONDS * fps / len(frames))
        clip = VideoClip(lambda t: frames[min(round(t * fps), count - 1) % len(frames)], duration=count / fps)
        clip.write_videofile(str(path), fps=fps, audio=False, **encode)
        return path

    assert sample_rate is not None
    canvas, tops = _audio_rows(entries, sample_rate)
    gap = np.zeros(round(AUDIO_GAP_S * sample_rate), np.float32)
    waves = [np.clip(np.asarray(e.media, np.float32), -1.0, 1.0) for e in entries]
    starts = np.cumsum([0.0] + [(len(w) + len(gap)) / sample_rate for w in waves])
    sound = np.concatenate([part for w in waves for part in (w, gap)])[: -len(gap) or None]
    # each row lit in turn, the others dimmed; precomputed once, the playhead drawn per frame
    lit = [canvas // 2 for _ in entries]
    for i, top in enumerate(tops):
        lo = top - STRIP_HEIGHT
        lit[i][lo : top + SPECTROGRAM_SIZE[1]] = canvas[lo : top + SPECTROGRAM_SIZE[1]]

    def frame(t: float) -> np.ndarray:
        i = min(int(np.searchsorted(starts, t, side="right")) - 1, len(entries) - 1)
        x = round(min(1.0, (t - starts[i]) * sample_rate / len(waves[i])) * (SPECTROGRAM_SIZE[0] - 2))
        picture = lit[i].copy()
        picture[tops[i] : tops[i] + SPECTROGRAM_SIZE[1], x : x + 2] = 255
        return picture

    # two identical channels: moviepy 2.2.1 writes a mono AudioArrayClip at twice its length
    audio = AudioArrayClip(np.stack([sound, sound], axis=1), fps=sample_rate)
    clip = VideoClip(frame, duration=len(sound) / sample_rate).with_audio(audio)
    temp_audio = str(stem) + "-audio.m4a"  # moviepy's temporary file, next to ours, not in the cwd
    try:
        clip.write_videofile(
            str(path), fps=AUDIO_FPS, audio_codec="aac", audio_fps=sample_rate, temp_audiofile=temp_audio, **encode
        )
    finally:
        Path(temp_audio).unlink(missing_ok=True)
    return path
