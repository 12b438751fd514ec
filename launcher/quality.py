"""Quality of an accelerated output against the baseline output of the same seed."""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"outputs differ in shape: {a.shape} vs {b.shape}")
    data_range = 2.0 if min(a.min(), b.min()) < 0 else 1.0  # audio in [-1, 1], pixels in [0, 1]
    return a, b, data_range


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical outputs)."""
    a, b, data_range = _pair(a, b)
    if np.array_equal(a, b):
        return float("inf")
    return float(peak_signal_noise_ratio(a, b, data_range=data_range))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity: images H×W×3, videos F×H×W×3 (mean over frames), audio 1-D."""
    a, b, data_range = _pair(a, b)
    if a.ndim == 4:
        return float(np.mean([ssim(x, y) for x, y in zip(a, b)]))
    spatial = a.shape[:2] if a.ndim == 3 else a.shape
    win = min(7, min(spatial) - (1 - min(spatial) % 2))  # odd and no larger than the signal
    return float(
        structural_similarity(
            a, b, data_range=data_range, win_size=max(win, 3), channel_axis=-1 if a.ndim == 3 else None
        )
    )
