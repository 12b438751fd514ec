"""Procedural data for the built-in demo models: shapes, moving shapes and tones.

Everything is a pure function of its attributes and a numpy Generator, so training data,
held-out prompts and checker templates are reproducible.
"""

from __future__ import annotations

import functools

import numpy as np

from .vocab import PALETTE

IMAGE_SIZE = 32
VIDEO_FRAMES = 8
VIDEO_SIZE = 32
SAMPLE_RATE = 16_000
AUDIO_SECONDS = 1.0
N_FFT = 1024
HOP_LENGTH = 250
N_MELS = 64
MEL_FRAMES = 64
F_MIN = 40.0
F_MAX = 8000.0
DB_FLOOR = -80.0  # log-mel range mapped to [-1, 1]
DB_REF = 1000.0  # mel power mapped to 0 dB, above the loudest training tone
GRIFFIN_LIM_ITERS = 16  # with momentum 0.99; see assets/audio/README.md
NNLS_ITERS = 30  # mel → linear power; see mel_to_stft_power

_SUPERSAMPLE = 4
_IMAGE_SCALE = IMAGE_SIZE / 32  # image geometry below is in pixels of a 32×32 frame
SHAPE_HALF_SIZE = {"small": 4.0 * _IMAGE_SCALE, "large": 7.5 * _IMAGE_SCALE}
VIDEO_HALF_SIZE = 5.5
POSITION_CENTERS = {
    name: (x * _IMAGE_SCALE, y * _IMAGE_SCALE)
    for name, (x, y) in {
        "center": (16.0, 16.0),
        "top left": (9.0, 9.0),
        "top right": (23.0, 9.0),
        "bottom left": (9.0, 23.0),
        "bottom right": (23.0, 23.0),
    }.items()
}
PITCH_HZ = {"low": 220.0, "middle": 440.0, "high": 880.0}


def shape_mask(shape: str, cx: float, cy: float, half: float, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape centred at (cx, cy) (pixel units), size×size."""
    n = size * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE
    x = coords[None, :]
    y = coords[:, None]
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif shape == "square":
        inside = (np.abs(x - cx) <= half * 0.9) & (np.abs(y - cy) <= half * 0.9)
    elif shape == "triangle":
        # Upright isosceles triangle in the box [cx±half, cy±half].
        top, bottom = cy - half, cy + half
        frac = np.clip((y - top) / (2 * half), 0.0, 1.0)
        inside = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= frac * half)
    else:
        raise ValueError(f"Unknown shape {shape!r}")
    return inside.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


def _colour(name: str, rng: np.random.Generator | None, jitter: float) -> np.ndarray:
    c = np.asarray(PALETTE[name], dtype=np.float64)
    if rng is not None and jitter > 0:
        c = np.clip(c + rng.uniform(-jitter, jitter, size=3), 0.0, 1.0)
    return c


def render_image(attrs: dict[str, str], rng: np.random.Generator | None = None) -> np.ndarray:
    """H×W×3 float image in [0, 1] for a full image attribute dict; ``rng`` adds small jitter."""
    cx, cy = POSITION_CENTERS[attrs["position"]]
    half = SHAPE_HALF_SIZE[attrs["size"]]
    if rng is not None:
        cx += rng.uniform(-1.0, 1.0) * _IMAGE_SCALE
        cy += rng.uniform(-1.0, 1.0) * _IMAGE_SCALE
        half *= rng.uniform(0.9, 1.1)
    m = shape_mask(attrs["shape"], cx, cy, half, IMAGE_SIZE)[..., None]
    fg = _colour(attrs["color"], rng, 0.05)
    bg = _colour(attrs["background"], rng, 0.03)
    return (m * fg + (1 - m) * bg).astype(np.float32)


def video_track(direction: str, offset: float = 0.0, n_frames: int = VIDEO_FRAMES) -> np.ndarray:
    """n_frames×2 centre positions (x, y) for a shape crossing the frame in ``direction``."""
    s = np.linspace(8.0, 24.0, n_frames)
    c = np.full(n_frames, 16.0 + offset)
    track = {
        "right": (s, c),
        "left": (s[::-1], c),
        "down": (c, s),
        "up": (c, s[::-1]),
    }[direction]
    return np.stack(track, axis=1)


def render_video(attrs: dict[str, str], rng: np.random.Generator | None = None) -> np.ndarray:
    """F×H×W×3 float video in [0, 1]: a shape moving across the frame."""
    offset = rng.uniform(-2.0, 2.0) if rng is not None else 0.0
    half = VIDEO_HALF_SIZE * (rng.uniform(0.9, 1.1) if rng is not None else 1.0)
    fg = _colour(attrs["color"], rng, 0.05)
    bg = _colour(attrs["background"], rng, 0.03)
    frames = []
    for cx, cy in video_track(attrs["direction"], offset):
        m = shape_mask(attrs["shape"], cx, cy, half, VIDEO_SIZE)[..., None]
        frames.append(m * fg + (1 - m) * bg)
    return np.stack(frames).astype(np.float32)


def synth_tone(attrs: dict[str, str], rng: np.random.Generator | None = None) -> np.ndarray:
    """Mono float32 waveform at 16 kHz, AUDIO_SECONDS long, peak about 0.5."""
    n = int(SAMPLE_RATE * AUDIO_SECONDS)
    t = np.arange(n) / SAMPLE_RATE
    f0 = PITCH_HZ[attrs["pitch"]] * (2 ** (rng.uniform(-0.08, 0.08)) if rng is not None else 1.0)
    pattern = attrs["pattern"]
    if pattern == "rising":
        freq = f0 * 2 ** (t / AUDIO_SECONDS - 0.5)  # one octave, centred on f0
    elif pattern == "falling":
        freq = f0 * 2 ** (0.5 - t / AUDIO_SECONDS)
    else:
        freq = np.full(n, f0)
    phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
    if rng is not None:
        phase += rng.uniform(0, 2 * np.pi)
    if attrs["timbre"] == "sine":
        wave = np.sin(phase)
    else:
        # Band-limited square: odd harmonics below Nyquist.
        wave = np.zeros(n)
        k = 1
        while k * freq.max() < SAMPLE_RATE / 2 * 0.95:
            wave += np.sin(k * phase) / k
            k += 2
        wave *= 4 / np.pi * 0.8
    env = np.ones(n)
    if pattern == "pulsing":
        rate = 4.0 * (rng.uniform(0.9, 1.1) if rng is not None else 1.0)
        gate = 0.5 + 0.5 * np.tanh(8 * np.sin(2 * np.pi * rate * t))
        env = 0.03 + 0.97 * gate
    fade = np.clip(np.minimum(t, AUDIO_SECONDS - t) / 0.01, 0, 1)
    gain = 0.5 * (rng.uniform(0.8, 1.0) if rng is not None else 0.9)
    return (gain * wave * env * fade).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _mel_basis() -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=F_MIN, fmax=F_MAX).astype(np.float32)


def mel_to_stft_power(power: np.ndarray, n_iter: int = NNLS_ITERS) -> np.ndarray:
    """Non-negative power spectrum X with ``mel_basis @ X ≈ power`` (mels×frames → bins×frames).

    The same non-negative least-squares problem as librosa's ``mel_to_stft``, solved by
    multiplicative updates (Lee & Seung) from ``mel_basisᵀ @ power``: ``n_iter`` pairs of small
    matrix products, where librosa's L-BFGS-B over every bin and frame at once took 0.4–4 s a clip.
    """
    basis = _mel_basis()
    target = basis.T @ power.astype(np.float32)
    x = target.copy()
    for _ in range(n_iter):
        x *= target / np.maximum(basis.T @ (basis @ x), 1e-30)
    return x


def audio_to_mel(wave: np.ndarray) -> np.ndarray:
    """Waveform → N_MELS×MEL_FRAMES log-mel spectrogram scaled to [-1, 1] (librosa)."""
    import librosa

    mel = librosa.feature.melspectrogram(
        y=wave,
        sr=SAMPLE_RATE,
        n_fft=N_FFT,
        hop_length=HOP_LENGTH,
        n_mels=N_MELS,
        fmin=F_MIN,
        fmax=F_MAX,
        power=2.0,
    )[:, :MEL_FRAMES]
    db = librosa.power_to_db(mel, ref=DB_REF, amin=1e-10, top_db=None)
    db = np.clip(db, DB_FLOOR, 0.0)
    return (db / -DB_FLOOR * 2 + 1).astype(np.float32)


def mel_to_audio(mel: np.ndarray, n_iter: int = GRIFFIN_LIM_ITERS, length: int | None = None) -> np.ndarray:
    """Inverse of :func:`audio_to_mel`: :func:`mel_to_stft_power`, then librosa's fast Griffin-Lim
    (momentum 0.99, ``n_iter`` iterations). Deterministic: the same ``mel`` gives the same
    waveform bit for bit (fixed phase seed)."""
    import librosa

    db = (np.clip(mel, -1.0, 1.0) - 1) / 2 * -DB_FLOOR
    power = librosa.db_to_power(db, ref=DB_REF)
    power = np.where(db <= DB_FLOOR + 1e-3, 0.0, power)
    # audio_to_mel drops the last STFT frame; repeat the edge so the frame count matches.
    n = length or int(SAMPLE_RATE * AUDIO_SECONDS)
    frames = 1 + n // HOP_LENGTH
    if power.shape[-1] < frames:
        power = np.pad(power, ((0, 0), (0, frames - power.shape[-1])), mode="edge")
    magnitude = np.sqrt(mel_to_stft_power(power))
    wave = librosa.griffinlim(
        magnitude,
        n_iter=n_iter,
        hop_length=HOP_LENGTH,
        n_fft=N_FFT,
        length=n,
        momentum=0.99,
        random_state=0,
    )
    return np.clip(wave, -1.0, 1.0).astype(np.float32)
