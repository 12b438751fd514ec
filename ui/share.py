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
    fits = [s for s in range(size, 10, -1) if _font(bold, s).getlength(text) <= width - 12]
    return _font(bold, fits[0] if fits else 10)


def label_strip(entry: ShareEntry, width: int) -> np.ndarray:
    """The STRIP_HEIGHT x width x 3 uint8 strip drawn above an entry's tile."""
    strip = Image.new("RGB", (width, STRIP_HEIGHT), (40, 40, 48))
    draw = ImageDraw.Draw(strip)
    second = f"{entry.wall_s:.2f} s" + (f" · {entry.note}" if entry.note else "")
    draw.text((6, 4), entry.label, fill=(255, 255, 255), font=_fitting(entry.label, width, True, 16))
    draw.text((6, 25), second, fill=(255, 214, 90), font=_fitting(second, width, False, 14))
    return np.asarray(strip)


def _even(canvas: np.ndarray) -> np.ndarray:
    """Pad an HxWx3 picture to even sides (yuv420p)."""
    return np.pad(canvas, [(0, canvas.shape[0] % 2), (0, canvas.shape[1] % 2), (0, 0)])


def _row(tiles: list[np.ndarray], strips: list[np.ndarray]) -> np.ndarray:
    """HxWx3 float tiles, upscaled, side by side, each under its label strip."""
    columns = [np.concatenate([s, upscale(to_uint8(t), TILE_MIN_SIDE)]) for t, s in zip(tiles, strips, strict=True)]
    gap = np.full((columns[0].shape[0], GAP, 3), _BACKGROUND, np.uint8)
    return _even(np.concatenate([part for c in columns for part in (gap, c)][1:], axis=1))


def _spectrogram_db(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """Log-magnitude STFT in dB: SPECTROGRAM_SIZE[1] rows on a mel-spaced frequency axis (low
    frequencies at the bottom) x time frames."""
    n_fft, hop = (512, 128) if sample_rate >= 16000 else (256, 64)
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(wave, n_fft // 2), n_fft)[::hop]
    db = 20 * np.log10(np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=1)).T + 1e-6)
    mel_top = 2595 * np.log10(1 + sample_rate / 2 / 700)
    hz = 700 * (10 ** (np.linspace(0, mel_top, SPECTROGRAM_SIZE[1]) / 2595) - 1)
    return db[np.round(hz / (sample_rate / 2) * (db.shape[0] - 1)).astype(int)][::-1]


def _audio_canvas(entries: Sequence[ShareEntry], waves: list[np.ndarray], sample_rate: int) -> np.ndarray:
    """Each entry's label strip over its spectrogram, stacked, 80 dB of range under the loudest."""
    from matplotlib import colormaps

    width, height = SPECTROGRAM_SIZE
    specs = [_spectrogram_db(w, sample_rate) for w in waves]
    top = max(float(db.max()) for db in specs)  # one scale for all rows: a quieter method looks quieter
    rows = []
    for entry, db in zip(entries, specs, strict=True):
        spec = to_uint8(colormaps["magma"](np.clip((db - top + 80.0) / 80.0, 0.0, 1.0))[..., :3])
        spec = np.asarray(Image.fromarray(spec).resize((width, height), Image.Resampling.BILINEAR))
        rows += [label_strip(entry, width), spec, np.full((GAP, width, 3), _BACKGROUND, np.uint8)]
    return _even(np.concatenate(rows[:-1]))


def _check(entries: Sequence[ShareEntry], modality: str, fps: int, sample_rate: int | None) -> None:
    forms = {"image": (3, "HxWx3"), "video": (4, "FxHxWx3"), "audio": (1, "a 1-D waveform")}
    if modality not in forms:
        raise ValueError(f"modality must be 'image', 'video' or 'audio', got {modality!r}")
    if not 1 <= len(entries) <= MAX_ENTRIES:
        raise ValueError(f"export_race takes 1 to {MAX_ENTRIES} entries (one per method), got {len(entries)}")
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
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    stem = Path(out_dir) / f"race-{modality}-{uuid.uuid4().hex[:12]}"
    if modality != "audio":
        width = upscale(entries[0].media if modality == "image" else entries[0].media[0], TILE_MIN_SIDE).shape[1]
        strips = [label_strip(e, width) for e in entries]
    if modality == "image":
        Image.fromarray(_row([e.media for e in entries], strips)).save(stem.with_suffix(".png"))
        return stem.with_suffix(".png")

    from moviepy import AudioArrayClip, VideoClip  # type: ignore[import-untyped]

    path = stem.with_suffix(".mp4")
    encode = dict(codec="libx264", preset="ultrafast", pixel_format="yuv420p", logger=None)
    if modality == "video":  # composed frame by frame: a long, large video is never held whole
        frames = len(entries[0].media)
        count = frames * math.ceil(VIDEO_MIN_SECONDS * fps / frames)

        def video_frame(t: float) -> np.ndarray:
            return _row([e.media[min(round(t * fps), count - 1) % frames] for e in entries], strips)

        VideoClip(video_frame, duration=count / fps).write_videofile(str(path), fps=fps, audio=False, **encode)
        return path

    assert sample_rate is not None
    waves = [np.clip(np.asarray(e.media, np.float32), -1.0, 1.0) for e in entries]
    canvas = _audio_canvas(entries, waves, sample_rate)
    gap = np.zeros(round(AUDIO_GAP_S * sample_rate), np.float32)
    starts = np.cumsum([0.0] + [(len(w) + len(gap)) / sample_rate for w in waves])
    sound = np.concatenate([part for w in waves for part in (w, gap)])[: -len(gap) or None]
    # each row lit in turn, the others dimmed; precomputed once, the playhead drawn per frame
    pitch = STRIP_HEIGHT + SPECTROGRAM_SIZE[1] + GAP
    row_of = np.arange(len(canvas)) // pitch  # the entry each line of the canvas shows
    lit = [np.where((row_of == i)[:, None, None], canvas, canvas // 2) for i in range(len(entries))]

    def frame(t: float) -> np.ndarray:
        i = min(int(np.searchsorted(starts, t, side="right")) - 1, len(entries) - 1)
        x = round(min(1.0, (t - starts[i]) * sample_rate / len(waves[i])) * (SPECTROGRAM_SIZE[0] - 2))
        picture = lit[i].copy()
        top = i * pitch + STRIP_HEIGHT
        picture[top : top + SPECTROGRAM_SIZE[1], x : x + 2] = 255
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
