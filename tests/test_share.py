"""Share export: each modality writes one file that reads back with the expected size, length
and frames, with each method's label strip burned in above its own tile."""

from __future__ import annotations

import subprocess
from pathlib import Path

import imageio.v2 as imageio
import imageio_ffmpeg  # type: ignore[import-untyped]
import numpy as np
import pytest
from moviepy import VideoFileClip  # type: ignore[import-untyped]

from ui.share import AUDIO_FPS, AUDIO_GAP_S, GAP, SPECTROGRAM_SIZE, STRIP_HEIGHT, ShareEntry, export_race, label_strip

rng = np.random.default_rng(0)
LABELS = ["Baseline", "ParaStep (2 ranks)", "BatchStep (stride 3)"]
TILE = 192  # 32 px media, upscaled by 6


def _entries(media: list[np.ndarray]) -> list[ShareEntry]:
    return [ShareEntry(LABELS[i], 2.5 - i * 0.6, m, note="1.8× · 41 dB" if i else "") for i, m in enumerate(media)]


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def _decoded_audio(path: Path, sample_rate: int) -> np.ndarray:
    """The file's audio stream, which must be AAC, decoded by ffmpeg (moviepy 2.2.1, asked for
    16 kHz, read it as near silence)."""
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    probe = subprocess.run([ffmpeg, "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    assert "Audio: aac" in probe, probe
    cmd = [ffmpeg, "-v", "error", "-i", str(path), "-f", "f32le", "-ac", "1", "-ar", str(sample_rate), "-"]
    return np.frombuffer(subprocess.run(cmd, capture_output=True, check=True).stdout, np.float32)


def test_label_strips_differ_by_label_and_by_wall_time() -> None:
    base = ShareEntry("Baseline", 1.0, np.zeros((2, 2, 3)))
    strips = [
        label_strip(e, TILE)
        for e in (base, ShareEntry("ParaStep", 1.0, base.media), ShareEntry("Baseline", 2.0, base.media))
    ]
    assert strips[0].shape == (STRIP_HEIGHT, TILE, 3) and strips[0].dtype == np.uint8
    changed = [int((strips[0] != other).any(axis=-1).sum()) for other in strips[1:]]
    assert changed[0] > 500 and changed[1] > 20  # another label; one digit of the wall time


def test_image_is_one_png_row_with_each_label_above_its_own_tile(tmp_path: Path) -> None:
    images = [rng.random((32, 32, 3)) for _ in LABELS]
    entries = _entries(images)
    path = export_race(entries, "image", tmp_path / "new")
    assert path.suffix == ".png" and path.parent == tmp_path / "new"
    grid = imageio.imread(path)
    assert grid.shape == (STRIP_HEIGHT + TILE, 3 * TILE + 2 * GAP, 3)
    for i, (entry, image) in enumerate(zip(entries, images, strict=True)):
        x = i * (TILE + GAP)
        np.testing.assert_array_equal(grid[:STRIP_HEIGHT, x : x + TILE], label_strip(entry, TILE))
        tile = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8).repeat(6, 0).repeat(6, 1)
        np.testing.assert_array_equal(grid[STRIP_HEIGHT:, x : x + TILE], tile)
    assert export_race(entries, "image", tmp_path / "new") != path  # a fresh name each time


def test_video_is_an_h264_mp4_side_by_side_looped_to_three_seconds(tmp_path: Path) -> None:
    # frame f of entry i is a flat grey (f + 1) / 9: the loop and the order are visible
    videos = [np.broadcast_to(((np.arange(8) + 1) / 9)[:, None, None, None], (8, 32, 32, 3)) for _ in LABELS[:2]]
    entries = _entries(videos)
    path = export_race(entries, "video", tmp_path, fps=8)
    reader = imageio.get_reader(path)
    meta = reader.get_meta_data()
    assert meta["fps"] == 8 and meta["size"] == (2 * TILE + GAP, STRIP_HEIGHT + TILE)
    assert meta["codec"] == "h264" and "yuv420p" in meta["pix_fmt"]
    assert reader.count_frames() == 24  # type: ignore[attr-defined]  # 8 frames, three times
    for k in (0, 5, 13, 23):
        frame = reader.get_data(k)
        assert abs(frame[STRIP_HEIGHT + 20 :, :TILE].mean() / 255 - (k % 8 + 1) / 9) < 0.02
        for i, entry in enumerate(entries):
            x = i * (TILE + GAP)
            strip = frame[:STRIP_HEIGHT, x : x + TILE]
            assert _diff(strip, label_strip(entry, TILE)) < 4
            assert _diff(strip, label_strip(entries[1 - i], TILE)) > 2 * _diff(strip, label_strip(entry, TILE))
    reader.close()


def test_audio_is_an_mp4_of_stacked_spectrograms_playing_each_sound_in_turn(tmp_path: Path) -> None:
    sr = 16000
    waves = [0.5 * np.sin(2 * np.pi * 440 * np.arange(n) / sr) for n in (sr, sr // 2)]
    entries = _entries(waves)
    path = export_race(entries, "audio", tmp_path, sample_rate=sr)
    total = 1.0 + AUDIO_GAP_S + 0.5
    clip = VideoFileClip(str(path), audio_fps=sr)
    try:
        assert clip.size == [SPECTROGRAM_SIZE[0], 2 * (STRIP_HEIGHT + SPECTROGRAM_SIZE[1]) + GAP]
        assert clip.fps == AUDIO_FPS and abs(clip.duration - total) < 0.1
        assert clip.audio is not None
        sound = _decoded_audio(path, sr)
        assert abs(len(sound) / sr - total) < 0.05
        rms = [
            float(np.sqrt(np.mean(sound[round(a * sr) : round(b * sr)] ** 2)))
            for a, b in ((0.1, 0.9), (1.05, 1.25), (1.4, 1.7))
        ]
        assert rms[0] > 0.3 and rms[1] < 0.02 and rms[2] > 0.3  # first sound, the gap, second sound

        # at 0.5 s the first row is lit with its playhead half-way; the second row is dimmed
        frame = clip.get_frame(0.5)
        second_top = STRIP_HEIGHT + SPECTROGRAM_SIZE[1] + GAP
        assert _diff(frame[:STRIP_HEIGHT], label_strip(entries[0], SPECTROGRAM_SIZE[0])) < 4
        assert (
            _diff(frame[second_top : second_top + STRIP_HEIGHT], label_strip(entries[1], SPECTROGRAM_SIZE[0]) // 2) < 4
        )
        row = frame[STRIP_HEIGHT : STRIP_HEIGHT + SPECTROGRAM_SIZE[1]].astype(np.float32).mean(axis=(0, 2))
        assert abs(int(row.argmax()) - 0.5 * SPECTROGRAM_SIZE[0]) < 8
    finally:
        clip.close()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # moviepy's temporary audio is gone


@pytest.mark.parametrize(
    ("media", "modality", "options", "message"),
    [
        ([], "image", {}, "1 to 5 entries"),
        ([np.zeros((4, 4, 3))] * 6, "image", {}, "1 to 5 entries"),
        ([np.zeros((4, 4, 3))], "gif", {}, "modality must be"),
        ([np.zeros((8, 4, 4, 3))], "image", {}, "expected HxWx3"),
        ([np.zeros((4, 4, 3))], "video", {}, "expected FxHxWx3"),
        ([np.zeros((4, 4))], "image", {}, "expected HxWx3"),
        ([np.zeros((4, 4, 3)), np.zeros((8, 8, 3))], "image", {}, "share one shape"),
        ([np.zeros((100, 2))], "audio", {"sample_rate": 16000}, "1-D waveform"),
        ([np.zeros(100)], "audio", {}, "sample_rate"),
        ([np.zeros((8, 4, 4, 3))], "video", {"fps": 0}, "fps must be"),
    ],
)
def test_refusals_say_what_to_change(
    tmp_path: Path, media: list[np.ndarray], modality: str, options: dict[str, int], message: str
) -> None:
    entries = [ShareEntry(f"m{i}", 1.0, m) for i, m in enumerate(media)]
    with pytest.raises(ValueError, match=message):
        export_race(entries, modality, tmp_path, **options)
    assert not any(tmp_path.iterdir())
