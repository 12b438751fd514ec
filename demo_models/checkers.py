"""Procedural checkers: does a generated sample obey its prompt, attribute by attribute?

The checkers measure the sample itself (pixels, frames, the waveform after inversion);
they never look at the latents or at the prompt's token ids.

- image: background = median border colour; foreground = pixels far from it; colour =
  nearest palette colour of the foreground median; shape = best IoU against the three
  templates fitted to the foreground's centroid and extent; position = quadrant of the
  centroid (centre if near the middle); size = foreground area.
- video: the same per frame (colour and shape on the middle frame); direction = sign of
  the dominant centroid displacement between the first and last two frames.
- audio: short-time spectrum of the waveform; f0 track = strongest peak per voiced frame;
  pitch = nearest of 220/440/880 Hz on a log scale of the median f0; pattern = slope of
  log f0 (rising/falling), else envelope modulation (pulsing/steady); timbre = energy at
  the 3rd harmonic relative to the fundamental.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from . import data
from .vocab import BACKGROUND_COLORS, FOREGROUND_COLORS, PALETTE, SHAPES, check_kind, parse_prompt

logger = logging.getLogger(__name__)


def _as_array(output: Any) -> np.ndarray:
    if hasattr(output, "convert"):  # PIL image
        return np.asarray(output.convert("RGB"), dtype=np.float32) / 255.0
    if hasattr(output, "detach"):
        output = output.detach().cpu().numpy()
    return np.asarray(output, dtype=np.float32)


def _nearest(colour: np.ndarray, names: tuple[str, ...]) -> str:
    return min(names, key=lambda n: float(np.sum((colour - np.asarray(PALETTE[n])) ** 2)))


def analyse_frame(img: np.ndarray) -> dict[str, Any]:
    """Measure background, foreground colour, shape, centroid and area of an H×W×3 image."""
    img = np.clip(img, 0.0, 1.0)
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.sqrt(((img - bg) ** 2).sum(-1))
    mask = dist > 0.25
    result: dict[str, Any] = {"background": _nearest(bg, BACKGROUND_COLORS), "area": int(mask.sum())}
    if mask.sum() < 4:
        result.update(color=None, shape=None, centroid=None)
        return result
    fg = np.median(img[mask], axis=0)
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    result["color"] = _nearest(fg, FOREGROUND_COLORS)
    result["centroid"] = (float(cx), float(cy))
    # Fit each template at the mask's bounding-box centre and half-extent; keep the best IoU.
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    bcx, bcy = (x0 + x1) / 2, (y0 + y1) / 2
    half = max(x1 - x0, y1 - y0) / 2
    best, best_iou = None, -1.0
    for shape in SHAPES:
        for scale in (0.9, 1.0, 1.12):
            hh = half * scale / (0.9 if shape == "square" else 1.0)
            tmpl = data.shape_mask(shape, bcx, bcy, hh, h) > 0.5 if h == w else None
            if tmpl is None:
                raise ValueError("square frames expected")
            iou = (tmpl & mask).sum() / max(1, (tmpl | mask).sum())
            if iou > best_iou:
                best, best_iou = shape, float(iou)
    result["shape"] = best
    result["shape_iou"] = best_iou
    return result


def _position(cx: float, cy: float, size: int) -> str:
    c = size / 2
    if abs(cx - c) < size * 0.125 and abs(cy - c) < size * 0.125:
        return "center"
    return f"{'top' if cy < c else 'bottom'} {'left' if cx < c else 'right'}"


def check_image(prompt: str, image: Any) -> dict[str, bool]:
    """Per-attribute pass/fail for one H×W×3 image (array in [0, 1] or PIL)."""
    img = _as_array(image)
    want = parse_prompt("image", prompt, warn=False)
    m = analyse_frame(img)
    got: dict[str, Any] = {"color": m["color"], "shape": m["shape"], "background": m["background"]}
    if m["centroid"] is not None:
        cx, cy = m["centroid"]
        got["position"] = _position(cx, cy, img.shape[0])
        # Threshold between the small and large areas of the rendered shapes (in pixels at 32×32).
        got["size"] = "large" if m["area"] > 85 * (img.shape[0] / 32) ** 2 else "small"
    return {k: got.get(k) == v for k, v in want.items()}


def check_video(prompt: str, frames: Any) -> dict[str, bool]:
    """Per-attribute pass/fail for one F×H×W×3 video (array in [0, 1])."""
    vid = _as_array(frames)
    want = parse_prompt("video", prompt, warn=False)
    ms = [analyse_frame(f) for f in vid]
    mid = ms[len(ms) // 2]
    got: dict[str, Any] = {"color": mid["color"], "shape": mid["shape"], "background": mid["background"]}
    cents = [m["centroid"] for m in ms]
    if all(c is not None for c in cents[:2] + cents[-2:]):
        start = np.mean(cents[:2], axis=0)
        end = np.mean(cents[-2:], axis=0)
        dx, dy = end - start
        # A real crossing moves ~14 px; require a clear move, not jitter.
        if max(abs(dx), abs(dy)) > 4:
            got["direction"] = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
    return {k: got.get(k) == v for k, v in want.items()}


def analyse_audio(wave: np.ndarray, sr: int = data.SAMPLE_RATE) -> dict[str, Any]:
    """f0 track, pitch class, pattern and timbre of a mono waveform."""
    import librosa

    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    n_fft, hop = 2048, 256
    spec = np.abs(librosa.stft(wave, n_fft=n_fft, hop_length=hop))
    freqs = librosa.fft_frequencies(sr=sr, n_fft=n_fft)
    rms = librosa.feature.rms(y=wave, frame_length=1024, hop_length=hop)[0][: spec.shape[1]]
    band = (freqs >= 80) & (freqs <= 2000)
    peak_bins = np.argmax(spec[band], axis=0)
    f0 = freqs[band][peak_bins]
    loud = rms > 0.25 * (rms.max() + 1e-9)
    result: dict[str, Any] = {"pitch": None, "pattern": None, "timbre": None}
    if loud.sum() < 5:
        return result
    t = np.arange(len(f0))[loud]
    logf = np.log2(f0[loud])
    med = float(np.median(logf))
    result["f0_median_hz"] = 2**med
    result["pitch"] = min(data.PITCH_HZ, key=lambda p: abs(np.log2(data.PITCH_HZ[p]) - med))
    # Octaves per second of the f0 track (robust fit: median of pairwise-ish slopes via polyfit on trimmed).
    secs = t * hop / sr
    slope = float(np.polyfit(secs, logf, 1)[0]) if np.ptp(secs) > 0.3 else 0.0
    result["octaves_per_second"] = slope
    # Envelope modulation over the middle 80 % of the clip (skips fades).
    core = rms[int(0.1 * len(rms)) : int(0.9 * len(rms))]
    modulation = float(np.percentile(core, 10) / (np.percentile(core, 90) + 1e-9))
    result["envelope_min_over_max"] = modulation
    if slope > 0.4:
        result["pattern"] = "rising"
    elif slope < -0.4:
        result["pattern"] = "falling"
    elif modulation < 0.35:
        result["pattern"] = "pulsing"
    else:
        result["pattern"] = "steady"
    # Timbre: energy near 3·f0 relative to f0, over loud frames.
    ratios = []
    for j in np.nonzero(loud)[0]:
        f = f0[j]
        if 3 * f > sr / 2 - 200:
            continue
        e1 = spec[np.abs(freqs - f) < f * 0.06, j].max(initial=0.0)
        e3 = spec[np.abs(freqs - 3 * f) < f * 0.15, j].max(initial=0.0)
        ratios.append(e3 / (e1 + 1e-9))
    if ratios:
        result["harmonic3_ratio"] = float(np.median(ratios))
        result["timbre"] = "square" if result["harmonic3_ratio"] > 0.12 else "sine"
    return result


def check_audio(prompt: str, audio: Any) -> dict[str, bool]:
    """Per-attribute pass/fail for one mono waveform at 16 kHz."""
    want = parse_prompt("audio", prompt, warn=False)
    got = analyse_audio(_as_array(audio))
    return {k: got.get(k) == v for k, v in want.items()}


CHECKERS = {"image": check_image, "video": check_video, "audio": check_audio}


def check(kind: str, prompt: str, output: Any) -> dict[str, bool]:
    """Per-attribute adherence of one sample (image H×W×3, video F×H×W×3, audio samples) to ``prompt``.

    Only attributes the prompt names are checked. Example:
        >>> check("image", "a red circle", render)  # doctest: +SKIP
        {'color': True, 'shape': True}
    """
    return CHECKERS[check_kind(kind)](prompt, output)
